"""`reddwarf-hostd`: the host daemon. `serve` (default) runs HostAgent over mTLS for the control server;
`build-template` builds (or rebuilds with --force) the instance OS template and exits.

Settings: a JSON file (--config), then REDDWARF_HOSTD_* environment, then flags."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from reddwarf.common.log import setup as setup_logging
from reddwarf.common.tls import SERVER_OPTIONS, RevocationList, server_credentials
from reddwarf.v1 import host_pb2_grpc

from . import cgroups, template
from .containers import ContainerDriver
from .host import Host
from .loop import LoopDriver
from .lxc import LxcDriver
from .openvz import OpenVzDriver
from .service import HostAgentServicer, ServerOnly
from .settings import Settings

log = logging.getLogger("reddwarf.hostd")


def load_settings(args: argparse.Namespace, env: dict[str, str]) -> Settings:
    settings = Settings.from_file(args.config) if args.config else Settings()
    names = {f.name: f for f in dataclasses.fields(Settings)}
    changes: dict[str, Any] = {}
    for name, f in names.items():
        value = env.get(f"REDDWARF_HOSTD_{name.upper()}")
        flag = getattr(args, name, None)
        value = flag if flag is not None else value
        if value is None or name == "bridge":
            continue
        if f.type == "bool" and isinstance(value, str):
            changes[name] = value.strip().lower() in ("1", "true", "yes", "on")
        else:
            changes[name] = int(value) if f.type == "int" else value
    if "host_id" in changes and "state_dir" not in changes and not args.config:
        changes["state_dir"] = ""  # re-derive from the new host id
    return dataclasses.replace(settings, **changes)


def build_host(settings: Settings) -> Host:
    layout = cgroups.detect()
    containers: ContainerDriver
    if settings.container_driver == "openvz":
        # OpenVZ containers come from vzctl's own OS templates (cached by vzctl), not from our LXC build.
        containers, name = OpenVzDriver(settings), settings.template or "debian-12-x86_64"
    elif settings.container_driver == "lxc":
        name = template.build_template(settings)  # cached by recipe hash: only the first start builds
        containers = LxcDriver(settings, layout)
    else:
        raise SystemExit(f"container driver {settings.container_driver!r} is not one of lxc, openvz")
    if settings.volume_driver != "loop":
        raise SystemExit(f"volume driver {settings.volume_driver!r} is not available on this host")
    return Host(settings, containers, LoopDriver(settings), layout, name)


async def revive_loop(servicer: HostAgentServicer, every: float) -> None:
    """Keeps containers that should run running (a dead guest agent takes its container down with it)."""
    while True:
        await asyncio.sleep(every)
        try:
            now = time.monotonic()
            # Status reads without the mutation lock (they would hold up every create); starts under it.
            for cid in await asyncio.to_thread(servicer.host.due_for_revival, now):
                await servicer.run_locked(servicer.host.revive_one, cid, now)
        except Exception:  # noqa: BLE001 - the loop outlives any one failure
            log.exception("revive pass failed")


async def serve(settings: Settings) -> None:
    if not (settings.cert_path and settings.key_path and settings.ca_path):
        raise SystemExit("hostd needs --cert-path, --key-path and --ca-path (its mTLS identity)")
    host = await asyncio.to_thread(build_host, settings)
    views, unmanaged = host.list_containers()
    vols, unmanaged_vols = host.list_volumes()
    if unmanaged or unmanaged_vols:
        # Reconciliation reports, never destroys: an operator decides what an unknown container is.
        log.warning("unmanaged resources found", extra={"containers": ",".join(unmanaged),
                                                        "volumes": ",".join(unmanaged_vols)})
    with open(settings.ca_path, "rb") as f:
        ca = f.read()
    with open(settings.cert_path, "rb") as f:
        cert = f.read()
    with open(settings.key_path, "rb") as f:
        key = f.read()
    server = grpc.aio.server(interceptors=[ServerOnly(RevocationList(settings.crl_path or None, ca))],
                             options=SERVER_OPTIONS)
    servicer = HostAgentServicer(host)
    host_pb2_grpc.add_HostAgentServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(settings.listen_address, server_credentials(cert, key, ca))
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("hostd serving", extra={"host": settings.host_id, "listen": settings.listen_address,
                                     "containers": len(views), "volumes": len(vols)})
    print(f"reddwarf-hostd ready listen={settings.listen_address} port={port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(revive_loop(servicer, settings.revive_seconds)) \
        if settings.revive_seconds > 0 else None
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    # Containers keep running across a hostd restart: the daemon is the control plane, not the data plane.
    await server.stop(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddwarf-hostd")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "build-template"])
    parser.add_argument("--config", help="JSON settings file")
    parser.add_argument("--force", action="store_true", help="rebuild the template even if it exists")
    for name in ("host_id", "listen_address", "state_dir", "lxc_path", "template_lxc_path", "storage_path",
                 "cert_path", "key_path", "ca_path", "crl_path", "advertise_address", "container_prefix",
                 "port_min", "port_max", "log_level", "agent_init_cmd", "revive_seconds"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name)
    args = parser.parse_args(argv)
    settings = load_settings(args, dict(os.environ))
    setup_logging("reddwarf-hostd", settings.log_level, host=settings.host_id)
    if args.command == "build-template":
        print(template.build_template(settings, force=args.force))
        return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
