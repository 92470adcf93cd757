"""`reddwarf-hostd`: the host daemon. `serve` (default) runs HostAgent over mTLS for the control server;
`build-template` builds (or rebuilds with --force) the instance OS template and exits. For enrollment over
SSH (server/host_enrollment.py): `csr` makes this host's key (kept, 0600, if it exists) and prints a CSR for
host/<--host-id>, so the private key never leaves the host; `supervise` runs `serve` detached under a
restarting supervisor (hosts without systemd) and `stop` ends it (hostd/supervise.py). `stop-target`
(storage mode) removes every target of this SAN node's tgtd and stops it (decommissioning; a plain hostd stop
keeps tgtd and its sessions running).

Settings: a JSON file (--config), then REDDWARF_HOSTD_* environment, then flags."""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from reddwarf.common.log import setup as setup_logging
from reddwarf.common.pki import TlsFiles, csr_for_key, make_key_and_csr, write_atomic
from reddwarf.common.tls import SERVER_OPTIONS, RevocationList, reloading_server_credentials
from reddwarf.v1 import host_pb2_grpc

from . import cgroups, san, supervise, template
from .containers import ContainerDriver
from .fake import FakeContainerDriver, FakeVolumeDriver
from .host import Host
from .iscsi_volumes import IscsiVolumeDriver
from .loop import LoopDriver
from .lxc import LxcDriver
from .openvz import OpenVzDriver
from .renewal import CertificateRenewer
from .service import HostAgentServicer, ServerOnly
from .settings import Settings
from .volumes import VolumeDriver

log = logging.getLogger("reddwarf.hostd")
WORKER_THREADS = 64


def load_settings(args: argparse.Namespace, env: dict[str, str]) -> Settings:
    flags = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    return Settings.load(args.config, env, flags)


def build_host(settings: Settings) -> Host:
    if settings.mode == "storage":
        # A SAN node: its own tgtd, LUNs as volumes, no containers (reddwarf.hostd.san).
        tgtd = san.TgtDaemon(settings)
        tgtd.start()
        host = Host(settings, san.NoContainers(), san.SanTargetDriver(settings, tgtd.target), None, "")
        host.reconcile_targets()
        return host
    if settings.mode != "compute":
        raise SystemExit(f"mode {settings.mode!r} is not one of compute, storage")
    # The fake driver touches no cgroup (and need not run where a cgroup hierarchy is readable).
    layout = None if settings.container_driver == "fake" else cgroups.detect()
    containers: ContainerDriver
    if settings.container_driver == "fake":
        # Tests only: agents as plain processes, no root, no template (reddwarf.hostd.fake).
        containers, name = FakeContainerDriver(settings), settings.template or "fake"
    elif settings.container_driver == "openvz":
        # OpenVZ containers come from vzctl's own OS templates (cached by vzctl), not from our LXC build.
        containers, name = OpenVzDriver(settings), settings.template or "debian-12-x86_64"
    elif settings.container_driver == "lxc":
        name = template.build_template(settings)  # cached by recipe hash: only the first start builds
        containers = LxcDriver(settings, layout)
    else:
        raise SystemExit(f"container driver {settings.container_driver!r} is not one of lxc, openvz, fake")
    volumes: VolumeDriver
    if settings.volume_driver == "loop":
        volumes = LoopDriver(settings)
    elif settings.volume_driver == "iscsi":
        volumes = IscsiVolumeDriver(settings)
    elif settings.volume_driver == "fake":
        volumes = FakeVolumeDriver(settings)
    else:
        raise SystemExit(f"volume driver {settings.volume_driver!r} is not available on this host")
    return Host(settings, containers, volumes, layout, name)


async def revive_loop(servicer: HostAgentServicer, every: float) -> None:
    """Keeps containers that should run running (a dead guest agent takes its container down with it)."""
    while True:
        await asyncio.sleep(every)
        try:
            now = time.monotonic()
            # Status reads take no lock; each start holds its container's (Host.revive_one).
            for cid in await asyncio.to_thread(servicer.host.due_for_revival, now):
                await servicer.run_op(servicer.host.revive_one, cid, now)
        except Exception:  # noqa: BLE001 - the loop outlives any one failure
            log.exception("revive pass failed")


async def serve(settings: Settings) -> None:
    if not (settings.cert_path and settings.key_path and settings.ca_path):
        raise SystemExit("hostd needs --cert-path, --key-path and --ca-path (its mTLS identity)")
    # Host operations block a thread each for seconds (lxc-copy, mkfs, lxc-start) and run side by side:
    # asyncio's default pool (cpu count + 4 threads: 6 on a 2-CPU host) would queue a burst of creates, and
    # the reads (GetContainer, ListUsage) behind them.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="hostd-op"))
    host = await asyncio.to_thread(build_host, settings)
    views, unmanaged = host.list_containers()
    vols, unmanaged_vols = host.list_volumes()
    if unmanaged or unmanaged_vols:
        # Reconciliation reports, never destroys: an operator decides what an unknown container is.
        log.warning("unmanaged resources found", extra={"containers": ",".join(unmanaged),
                                                        "volumes": ",".join(unmanaged_vols)})
    with open(settings.ca_path, "rb") as f:
        ca = f.read()
    # Pushed CRLs are kept in the state dir; --crl-path, if given, is a second (read-only) source. With
    # neither holding a current CRL every call but PushRevocations is refused (fail closed).
    revocations = RevocationList(os.path.join(settings.state_dir, "crl.pem"), ca, seed=settings.crl_path or None)
    if revocations.current() is None:
        log.warning("no current revocation list yet: refusing calls until the server pushes one")
    server = grpc.aio.server(interceptors=[ServerOnly(revocations)], options=SERVER_OPTIONS)
    files = TlsFiles(Path(settings.cert_path), Path(settings.key_path), Path(settings.ca_path))
    servicer = HostAgentServicer(host, revocations, CertificateRenewer(files, settings.host_id, settings.state_dir))
    host_pb2_grpc.add_HostAgentServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # A renewed host certificate (the files rewritten in place) is served from the next handshake on.
    port = server.add_secure_port(settings.listen_address, reloading_server_credentials(files))
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


def make_csr(args: argparse.Namespace) -> int:
    """Prints a CSR for host/<host_id> for the key at --key-path, made there first if missing."""
    if not args.key_path or not args.host_id:
        raise SystemExit("csr needs --key-path and --host-id")
    key = Path(args.key_path)
    if key.exists():
        csr = csr_for_key(key.read_bytes(), f"host/{args.host_id}")
    else:
        key_pem, csr = make_key_and_csr(f"host/{args.host_id}")
        key.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(key, key_pem, 0o600)
    sys.stdout.write(csr.decode())
    return 0


def supervise_command(args: argparse.Namespace) -> int:
    if not args.pid_file:
        raise SystemExit(f"{args.command} needs --pid-file")
    pid_file = Path(args.pid_file)
    if args.command == "stop":
        print("stopped" if supervise.stop(pid_file) else "not running")
        return 0
    if not args.config or not args.log_file:
        raise SystemExit("supervise needs --config and --log-file")
    pid = supervise.start([sys.executable, "-m", "reddwarf.hostd.main", "serve", "--config", args.config],
                          pid_file, Path(args.log_file))
    print(f"supervisor pid={pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddwarf-hostd")
    parser.add_argument("command", nargs="?", default="serve",
                        choices=["serve", "build-template", "csr", "supervise", "stop", "stop-target"])
    parser.add_argument("--config", help="JSON settings file")
    parser.add_argument("--force", action="store_true", help="rebuild the template even if it exists")
    parser.add_argument("--pid-file", help="supervise/stop: the supervisor's pid file")
    parser.add_argument("--log-file", help="supervise: where the supervisor and hostd write their output")
    for name in ("host_id", "listen_address", "state_dir", "lxc_path", "template_lxc_path", "storage_path",
                 "cert_path", "key_path", "ca_path", "crl_path", "advertise_address", "container_prefix",
                 "port_min", "port_max", "log_level", "agent_init_cmd", "revive_seconds", "container_driver",
                 "volume_driver", "mode", "iscsi_portal", "iscsi_control_port", "iscsi_initiator_iqn",
                 "iscsi_initiator"):
        parser.add_argument("--" + name.replace("_", "-"), dest=name)
    args = parser.parse_args(argv)
    if args.command == "csr":
        return make_csr(args)
    if args.command in ("supervise", "stop"):
        return supervise_command(args)
    settings = load_settings(args, dict(os.environ))
    setup_logging("reddwarf-hostd", settings.log_level, host=settings.host_id)
    if args.command == "stop-target":
        san.TgtDaemon(settings).stop()
        return 0
    if args.command == "build-template":
        print(template.build_template(settings, force=args.force))
        return 0
    asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
