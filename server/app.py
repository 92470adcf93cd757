"""The control server's shared objects, built once in main.py and handed to every servicer.

Modules fill the optional slots as they are wired (see main.wire); nothing reaches for globals.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.pki import CertificateAuthority, TlsFiles

if TYPE_CHECKING:
    from .settings import Settings


@dataclass
class App:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    ca: CertificateAuthority
    tls: TlsFiles  # the server's own identity (spiffe://reddwarf/server/<name>), also used to dial hostd
    registry: Any = None   # server.agents.AgentRegistry: live guest-agent streams
    hosts: Any = None      # server.hosts: hostd client pool
    tasks: Any = None      # server.tasks: durable task engine
    events: Any = None     # server.events: instance event bus (WatchInstance)
    backups: Any = None    # server.backups: backup store/sink
    extras: dict[str, Any] = field(default_factory=dict)
