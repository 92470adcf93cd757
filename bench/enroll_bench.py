"""Time to enroll a host: Admin.EnrollHost against a real sshd in a network namespace of its own
(tests/fixtures/sshhost.py), a fresh host (venv and pip install from the cached wheelhouse, key and CSR,
supervised hostd, mTLS wait, registration) and a re-enrollment of it (nothing to install), next to the floor
measured in the same run: the same wheels copied and installed by hand with OpenSSH's scp and ssh.

Run: `.venv/bin/python -m bench.enroll_bench [--rounds 1]` (root; openssh-server installed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reddwarf.server.wheelhouse import Wheelhouse
from reddwarf.v1 import admin_pb2, admin_pb2_grpc
from tests.fixtures.server import start_server
from tests.fixtures.sshhost import SshHost, ssh_host

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / "build" / "test-wheelhouse"
HOSTD_CONFIG = {"container_driver": "fake", "volume_driver": "fake", "state_dir": "{install_dir}/state",
                "lxc_path": "{install_dir}/lxc", "storage_path": "{install_dir}/volumes"}


def by_hand(h: SshHost, wheels: list[Path], dest: str, work: Path) -> float:
    """The floor: scp the wheels, ssh python3 -m venv, ssh pip install --no-index (what enrollment does
    first, without the key, the certificate, the start and the wait)."""
    known = work / "known_hosts"
    known.write_text(f"[{h.address}]:{h.port} {(h.dir / 'ssh_host_ed25519_key.pub').read_text().split(' ')[0]} "
                     f"{(h.dir / 'ssh_host_ed25519_key.pub').read_text().split(' ')[1]}\n")
    opts = ["-i", str(h.client_key), "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "StrictHostKeyChecking=yes"]
    ssh = ["ssh", *opts, "-p", str(h.port), f"root@{h.address}"]
    t = time.monotonic()
    subprocess.run([*ssh, "mkdir", "-p", f"{dest}/wheels"], check=True, timeout=60)
    subprocess.run(["scp", "-q", *opts, "-P", str(h.port), *map(str, wheels), f"root@{h.address}:{dest}/wheels/"],
                   check=True, timeout=600)
    subprocess.run([*ssh, "python3", "-m", "venv", f"{dest}/venv"], check=True, timeout=600)
    subprocess.run([*ssh, f"{dest}/venv/bin/python", "-m", "pip", "install", "-q", "--no-index", "--no-compile",
                    "--disable-pip-version-check", "--find-links", f"{dest}/wheels", "reddwarf"],
                   check=True, timeout=900)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reddwarf-enrollbench-", dir="/var/tmp") as tmp_s:
        tmp = Path(tmp_s)
        t = time.monotonic()
        Wheelhouse(WHEELHOUSE).ensure()   # builds the reddwarf wheel if the sources changed since the last run
        first_s = time.monotonic() - t
        t = time.monotonic()
        wheels = Wheelhouse(WHEELHOUSE).ensure()   # what every enrollment pays: a digest of the sources
        wheelhouse_s = time.monotonic() - t
        size_mb = sum(w.stat().st_size for w in wheels) / 2**20
        cfg = tmp / "hostd.json"
        cfg.write_text(json.dumps(HOSTD_CONFIG))
        env = {"REDDWARF_ENROLL_WHEELHOUSE": str(WHEELHOUSE), "REDDWARF_ENROLL_INSTALL_DIR": str(tmp / "hosts/{host}"),
               "REDDWARF_ENROLL_HOSTD_CONFIG": str(cfg), "REDDWARF_CAPACITY_REFRESH_SECONDS": "3600"}
        fresh: list[float] = []
        again: list[float] = []
        floor: list[float] = []
        with start_server(tmp, env) as server, ssh_host(tmp) as h:
            admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
            for i in range(a.rounds):
                floor.append(by_hand(h, wheels, str(tmp / f"byhand-{i}"), tmp))
                req = admin_pb2.EnrollHostRequest(id=f"bench-{i}", ssh_target=h.target, host_key=h.host_key,
                                                  ssh_private_key=h.client_key.read_bytes(), hostd_port=7500 + i)
                t = time.monotonic()
                admin.EnrollHost(req, timeout=1200)
                fresh.append(time.monotonic() - t)
                for _ in range(3):
                    t = time.monotonic()
                    admin.EnrollHost(req, timeout=1200)
                    again.append(time.monotonic() - t)
    f, g, b = statistics.median(fresh), statistics.median(again), statistics.median(floor)
    print("## Time to enroll a host\n")
    print(f"Admin.EnrollHost against a real OpenSSH sshd in its own network namespace; the host installs "
          f"{len(wheels)} wheels ({size_mb:.0f} MB) from the server's wheelhouse: checking it costs {wheelhouse_s:.2f} s "
          f"per enrollment (a digest of the sources); the first check of this run took {first_s:.2f} s (it rebuilds "
          f"the reddwarf wheel when the sources changed, about 7 s here, and the first run on a machine also fetches "
          f"the dependency wheels once). hostd "
          f"runs the fake drivers (no template build). Median of {a.rounds} fresh host(s) and {len(again)} "
          "re-enrollments.\n")
    print("| measure | seconds | vs floor |")
    print("|---|---:|---:|")
    print(f"| floor: scp the wheels + ssh `python3 -m venv` + ssh `pip install --no-index` by hand | {b:.1f} | 1.0x |")
    print(f"| enroll a fresh host (upload, venv, install, key + CSR, sign, start, mTLS wait, register) | {f:.1f} | "
          f"{f / b:.2f}x |")
    print(f"| re-enroll the same host (nothing to install: new certificate, restart, wait) | {g:.1f} | {g / b:.2f}x |")
    print("\nTarget: a fresh host within 1.5x of installing the same wheels by hand; a re-enrollment in seconds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
