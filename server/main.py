"""`reddwarf-server`: `init` prepares a deployment (CA, the server's certificate, the state database, the
seeded catalog, the admin tenant, token and certificate); `serve` runs the three ports:

  api     public + admin API, mTLS required, callers identified by server/auth.py
  agent   the guest agents' streams, mTLS with instance certificates
  enroll  one-time-token enrollment, server-only TLS (the agent has no certificate yet)

`wire(app)` is the one place that says which servicers and background loops run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from reddwarf.common.log import setup as setup_logging
from reddwarf.common.pki import CertificateAuthority, Identity, TlsFiles
from reddwarf.common.tls import SERVER_OPTIONS, agent_server_options, reloading_server_credentials
from reddwarf.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    database_pb2,
    database_pb2_grpc,
    observe_pb2,
    observe_pb2_grpc,
)

from . import db, models, provisioning
from .admin import AdminServicer, record_certificate
from .api_metrics import ApiMetricsInterceptor
from .app import App
from .audit import AuditInterceptor, EventWriter, prune_loop, record_status_changes
from .auth import (
    ADMIN_TENANT,
    Authenticator,
    AuthInterceptor,
    certificate_revoked,
    hash_secret,
    new_secret,
    token_expiry,
)
from .backup_store import make_store
from .catalog import CatalogServicer
from .event_history import EventsServicer
from .hosts import HostPool
from .keys import TenantKeys, ensure_kek
from .metrics import ServerMetrics, UsagePoller
from .metrics_http import MetricsListener, needs_tls
from .pagination import Paginator
from .provisioning import full_name
from .ratelimit import RateLimiter, RateLimitInterceptor
from .settings import Settings

log = logging.getLogger("reddwarf.server")

AddFn = Callable[[Any, grpc.aio.Server], None]


@dataclass
class Wiring:
    rate_limiter: RateLimiter  # enforced by the API port's interceptor, shown by Catalog.GetLimits
    metrics: ServerMetrics     # served at metrics_listen; fed by the task engine, agent registry and API port
    api: list[tuple[AddFn, Any, str]] = field(default_factory=list)      # (add_fn, servicer, service name)
    agent: list[tuple[AddFn, Any, str]] = field(default_factory=list)
    enroll: list[tuple[AddFn, Any, str]] = field(default_factory=list)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Interceptors of the API port after authentication and rate limiting (they see the principal).
    interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)


def wire(app: App, paginator: Paginator) -> Wiring:
    hosts = HostPool(app)
    st = app.settings
    w = Wiring(RateLimiter.from_settings(st), ServerMetrics(st.heartbeat_expiry_seconds, UsagePoller(hosts)))
    store = make_store(st, TenantKeys(app.sessions, ensure_kek(st.backup_kek_file, app.sessions)))
    w.api.append((database_pb2_grpc.add_CatalogServicer_to_server, CatalogServicer(app, paginator, w.rate_limiter),
                  full_name(database_pb2.DESCRIPTOR, "Catalog")))
    w.api.append((admin_pb2_grpc.add_AdminServicer_to_server, AdminServicer(app, paginator, hosts, store),
                  full_name(admin_pb2.DESCRIPTOR, "Admin")))
    provisioning.register(app, paginator, hosts, store, w)
    wire_events(app, paginator, w)
    return w


def wire_events(app: App, paginator: Paginator, w: Wiring) -> None:
    """The event history: recorded (API changes by an interceptor, status changes by a session hook),
    pruned after its retention, and read through the Events service."""
    st = app.settings
    if st.events_enabled:
        writer = EventWriter(app.sessions)
        record_status_changes(app.sessions)
        w.interceptors.append(AuditInterceptor(writer))
        w.background += [writer.run, lambda: prune_loop(app.sessions, st.event_retention_days,
                                                        st.event_prune_seconds)]
    w.api.append((observe_pb2_grpc.add_EventsServicer_to_server, EventsServicer(app, paginator),
                  full_name(observe_pb2.DESCRIPTOR, "Events")))


def secret_file(path: Path, make: Callable[[], bytes]) -> bytes:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(make())
    return path.read_bytes()


def build_app(settings: Settings) -> App:
    ca = CertificateAuthority.load(settings.pki_dir)
    engine = db.make_engine(settings.db_url)
    tls_dir = settings.server_tls_dir
    return App(settings=settings, engine=engine, sessions=db.session_factory(engine), ca=ca,
               tls=TlsFiles(tls_dir / "server.pem", tls_dir / "server.key", tls_dir / "ca.pem"))


# -- init --------------------------------------------------------------------------------------------
def init(settings: Settings, out: Any = sys.stdout) -> None:
    sd = Path(settings.state_dir)
    sd.mkdir(parents=True, exist_ok=True)
    os.chmod(sd, 0o700)
    ca = CertificateAuthority.ensure(settings.pki_dir)
    db.upgrade(settings.db_url)
    engine = db.make_engine(settings.db_url)
    sessions = db.session_factory(engine)
    secret_file(sd / "secret", lambda: secrets.token_bytes(32))
    ensure_kek(settings.backup_kek_file, sessions)  # wraps the tenants' backup data keys

    def identity(directory: Path, name: str, role: str, id: str) -> TlsFiles:
        files = TlsFiles(directory / f"{name}.pem", directory / f"{name}.key", directory / "ca.pem")
        if not files.cert.exists():
            files = ca.write_identity(directory, name, role, id)
            from cryptography import x509

            from reddwarf.common.pki import identity_from_cert
            not_after = x509.load_pem_x509_certificate(files.cert.read_bytes()).not_valid_after_utc
            with sessions() as s, s.begin():
                record_certificate(s, files.cert.read_bytes(), not_after)
            identity_from_cert(files.cert.read_bytes())
        return files

    renew_server_certificate(ca, sessions, settings)
    admin_files = identity(sd / "admin", "admin", "admin", "admin")
    identity(sd / "admin", "client", "client", "cli")
    identity(sd / "admin", "gateway", "gateway", "gateway")
    # What Prometheus presents to scrape a /metrics listener on TLS (server/metrics_http.py).
    identity(sd / "monitor", "monitor", "monitor", "prometheus")
    # Under the schema lock: servers initialised at once on one database must not both seed the catalog.
    with db.schema_lock(settings.db_url), sessions() as s, s.begin():
        db.seed(s)
        token_path = sd / "admin.token"
        if s.get(models.Tenant, ADMIN_TENANT) is None:
            q = settings.default_quota
            s.add(models.Tenant(id=ADMIN_TENANT, display_name="operators", quota_instances=q.instances,
                                quota_memory_mb=q.memory_mb, quota_volume_gb=q.volume_gb, quota_backups=q.backups,
                                quota_backup_bytes=q.backup_bytes))
            s.flush()
        if not token_path.exists():
            import uuid
            secret = new_secret()
            expires = token_expiry(0, settings.admin_token_ttl_seconds)
            s.add(models.Token(id=str(uuid.uuid4()), tenant_id=ADMIN_TENANT, secret_hash=hash_secret(secret),
                               description="created by reddwarf-server init", admin=True, expires_at=expires))
            fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret + "\n")
            # Never printed: terminals, CI logs and scrollback keep what they are shown.
            print(f"admin token written to {token_path} (mode 0600; expires "
                  f"{expires.isoformat(timespec='seconds') + 'Z' if expires else 'never'})", file=out)
    engine.dispose()
    print(f"state: {settings.db_url}\nCA: {settings.pki_dir}/ca.pem\nadmin certificate: {admin_files.cert}\n"
          f"API: {settings.api_listen}", file=out)


# -- the server's own certificate ----------------------------------------------------------------------
def renew_server_certificate(ca: CertificateAuthority, sessions: Any, settings: Settings) -> bool:
    """(Re-)issues the server's certificate when it is missing, names another identity, lacks the role
    names (one from before certificates named roles), or has a third of its lifetime left. The listeners
    serve the new one from the next handshake on (tls.reloading_server_credentials). True if renewed."""
    tls_dir = settings.server_tls_dir
    files = TlsFiles(tls_dir / "server.pem", tls_dir / "server.key", tls_dir / "ca.pem")
    issued = ca.renew_identity(files, "server", settings.name, days=settings.server_cert_days)
    if issued is None:
        return False
    with sessions() as s, s.begin():
        record_certificate(s, issued.cert_pem, issued.not_after)
    log.info("server certificate issued", extra={"not_after": issued.not_after.isoformat()})
    return True


async def renew_loop(app: App, every: float = 6 * 3600) -> None:
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(renew_server_certificate, app.ca, app.sessions, app.settings)
        except Exception:  # noqa: BLE001 - retried next round; the current certificate keeps serving
            log.exception("server certificate renewal failed")


# -- serve -------------------------------------------------------------------------------------------
def start_metrics(app: App, wiring: Wiring) -> MetricsListener | None:
    """The /metrics listener and the loops that keep its state, when metrics_listen is set."""
    st = app.settings
    if not st.metrics_listen:
        return None
    m = wiring.metrics

    def authorize(ident: Identity) -> str | None:
        return f"certificate of {ident.uri} is revoked" if certificate_revoked(app.sessions, ident.serial) else None
    listener = MetricsListener(st.metrics_listen, m.registry,
                               tls=app.tls if needs_tls(st.metrics_listen, st.metrics_tls) else None,
                               authorize=authorize)
    wiring.background += [lambda: m.refresh_loop(app.sessions, st.metrics_refresh_seconds),
                          lambda: m.usage_loop(app.sessions, st.metrics_usage_seconds)]
    listener.start()
    return listener


async def serve(settings: Settings) -> None:
    app = build_app(settings)
    renew_server_certificate(app.ca, app.sessions, settings)
    paginator = Paginator(secret_file(Path(settings.state_dir) / "secret", lambda: secrets.token_bytes(32)))
    wiring = wire(app, paginator)
    wiring.background.append(lambda: renew_loop(app))

    # Metrics outermost (refused calls are counted too); then auth: the rate limiter keys its buckets by the
    # principal auth found.
    api = grpc.aio.server(interceptors=[ApiMetricsInterceptor(wiring.metrics.api_calls, wiring.metrics.api_seconds),
                                        AuthInterceptor(Authenticator(app.sessions, settings.auth_cache_seconds)),
                                        RateLimitInterceptor(wiring.rate_limiter), *wiring.interceptors],
                             options=SERVER_OPTIONS)
    names = [reflection.SERVICE_NAME, health.SERVICE_NAME]
    for add, servicer, name in wiring.api:
        add(servicer, api)
        names.append(name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, api)
    reflection.enable_server_reflection(names, api)
    api.add_secure_port(settings.api_listen, reloading_server_credentials(app.tls, require_client_auth=True))
    servers = [api]

    if wiring.agent:
        agent = grpc.aio.server(options=agent_server_options(settings.agent_max_message_bytes))
        for add, servicer, _ in wiring.agent:
            add(servicer, agent)
        agent.add_secure_port(settings.agent_listen, reloading_server_credentials(app.tls, require_client_auth=True))
        servers.append(agent)
    if wiring.enroll:
        enroll = grpc.aio.server(options=SERVER_OPTIONS)
        for add, servicer, _ in wiring.enroll:
            add(servicer, enroll)
        # Server-only TLS: the enrolling agent has no certificate yet; its one-time token is the credential.
        enroll.add_secure_port(settings.enroll_listen, reloading_server_credentials(
            app.tls, require_client_auth=False, client_ca=False))
        servers.append(enroll)

    metrics = start_metrics(app, wiring)
    for s in servers:
        await s.start()
    for svc in [""] + names:
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    tasks = [asyncio.create_task(bg(), name=getattr(bg, "__name__", "background")) for bg in wiring.background]
    log.info("serving", extra={"api": settings.api_listen, "agent": settings.agent_listen if wiring.agent else "",
                               "enroll": settings.enroll_listen if wiring.enroll else "",
                               "metrics": settings.metrics_listen})
    # Everything made so far (modules, the schema, the catalog, the servers) lives as long as the process: out of
    # the collector's reach, so a full collection scans only what requests make (it scanned all of it, tens of
    # milliseconds now and then on a busy server: the slowest pages of bench/list_bench.py).
    gc.freeze()
    print(f"reddwarf-server ready api={settings.api_listen}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t is not waiter and t.exception() is not None:
            log.error("background loop died", exc_info=t.exception())
    log.info("stopping")
    await health_servicer.enter_graceful_shutdown()
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(BaseException):
            await t
    await asyncio.gather(*(s.stop(5) for s in servers))
    if metrics is not None:
        await asyncio.to_thread(metrics.stop)
    for fn in wiring.on_stop:
        with contextlib.suppress(Exception):
            await fn()
    app.engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddwarf-server")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "init"])
    parser.add_argument("--config", help="YAML settings file (or REDDWARF_CONFIG)")
    parser.add_argument("--state-dir")
    parser.add_argument("--db-url")
    parser.add_argument("--api-listen")
    parser.add_argument("--agent-listen")
    parser.add_argument("--enroll-listen")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    settings = Settings.load(args.config, overrides=overrides)
    # Read once into the settings; gone from the environment so no process the server starts inherits it.
    os.environ.pop("REDDWARF_S3_SECRET_ACCESS_KEY", None)
    setup_logging("reddwarf-server", settings.log_level)
    if args.command == "init":
        init(settings)
        return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
