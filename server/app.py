"""The control server's core objects, built once in main.py (build_app) and handed to every module that
needs them: the settings, the state DB, the CA and the server's own TLS identity.

The provisioning services (task engine, hostd pool, agent registry, event bus) are built in
provisioning.py and passed to the classes that use them as constructor arguments, so every dependency is
typed and visible; nothing reaches for globals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.pki import CertificateAuthority, TlsFiles

if TYPE_CHECKING:
    from .settings import Settings

# What a servicer method is called with. The generated servicer bases type requests and responses on each
# method; the context's own type parameters only matter to streaming reads and writes, which we never do
# through it.
Context = grpc.aio.ServicerContext[Any, Any]


@dataclass
class App:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    ca: CertificateAuthority
    tls: TlsFiles  # the server's own identity (spiffe://reddwarf/server/<name>), also used to dial hostd
