"""A fresh tenant on a real server for the client tests, made through the SDK as the admin."""
from __future__ import annotations

import uuid

from reddwarf.client import Client, ClientConfig
from tests.fixtures.server import RunningServer


def new_tenant(server: RunningServer, prefix: str) -> tuple[str, str]:
    """(tenant id, token secret) of a new tenant."""
    channel = server.channel(server.admin_files)
    try:
        admin = Client(ClientConfig(endpoint=server.api), channel=channel)
        tid = f"{prefix}{uuid.uuid4().hex[:6]}"
        admin.create_tenant(tid)
        return tid, admin.create_token(tid).secret
    finally:
        channel.close()
