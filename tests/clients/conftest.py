"""Client-test fixtures: the in-process fake API, and clients bound to it over an insecure loopback channel."""
from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from reddwarf.client import Client, ClientConfig

from .fake_api import TOKEN, FakeState, fake_api


@pytest.fixture
def api() -> Iterator[tuple[str, FakeState]]:
    with fake_api() as served:
        yield served


@pytest.fixture
def client(api: tuple[str, FakeState]) -> Iterator[Client]:
    endpoint, _ = api
    channel = grpc.insecure_channel(endpoint)
    try:
        yield Client(ClientConfig(endpoint=endpoint, token=TOKEN, timeout=5), channel=channel)
    finally:
        channel.close()
