"""`make demo-fleet` and `make demo-fleet-stop` for real (clients/demo_fleet.py): the server, two compute hosts and
a SAN node (REAL tgtd), each in its own network namespace on the demo's bridge; an instance (REAL LXC container,
MariaDB) whose datadir is a LUN reached through the REAL user-space initiator (qemu-storage-daemon). Then the
stop, and a look at the machine: nothing of the demo's may be left."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pymysql
import pytest

from reddwarf.hostd import qsd
from tests.fixtures.mariadb import free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="LXC, tgtd, namespaces, FUSE and loop devices need root"),
    pytest.mark.skipif(shutil.which("tgtd") is None, reason="tgt is not installed"),
    pytest.mark.skipif(not qsd.available(), reason="qemu-storage-daemon with qemu-block-extra is not installed"),
]
REPO = Path(__file__).resolve().parents[2]


def demo(root: Path, port: int, command: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDDWARF_DEMO_FLEET_DIR": str(root), "REDDWARF_DEMO_FLEET_PORT": str(port)}
    return subprocess.run([sys.executable, "-m", "reddwarf.client.demo_fleet", command], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500, check=False)


def leftovers(root: Path, net: dict) -> list[str]:
    """Everything of the demo's still on the machine."""
    found = []
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    found += [f"link {ln.split()[0]}" for ln in links.splitlines() if ln.split()[0].split("@")[0]
              .startswith(net["bridge"])]
    found += [f"netns {ns}" for ns in net["namespaces"].values() if os.path.exists(f"/var/run/netns/{ns}")]
    with open("/proc/mounts") as f:
        found += [f"mount {ln.split()[1]}" for ln in f if str(root) in ln]
    found += [f"loop {ln}" for ln in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
              .splitlines() if str(root) in ln]
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(root) in cmd or f"-C {net['control_port']} " in cmd:
                    found.append(f"process {d}: {cmd[:200]}")
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/lxc.*.rdfd[ab]-*")]
    if root.exists():
        found.append(f"directory {root}")
    return found


def test_the_fleet_demo_serves_sql_from_a_san_volume_and_its_stop_leaves_nothing():
    # A short root: the initiator's QMP socket path under it has a 108-byte limit.
    root = Path(tempfile.mkdtemp(prefix="rdfd", dir="/tmp"))
    port = 20000 + free_port() % 20000
    net = None
    try:
        up = demo(root, port, "up")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        net = json.loads((root / "net.json").read_text())
        out = up.stdout
        assert "answers: MariaDB" in out and "'stored on a SAN LUN'" in out, out
        # host list: both compute hosts and the SAN node, mode, state, its portal
        listing = out.split("$ reddwarf admin host list", 1)[1].split("$ reddwarf admin host show", 1)[0]
        rows = {ln.split()[0]: ln.split() for ln in listing.splitlines() if ln.strip().startswith("h-")}
        assert set(rows) == {"h-a", "h-b", "h-san"}, listing
        assert rows["h-a"][2:5] == ["compute", "UP", "iscsi"] and rows["h-b"][2:5] == ["compute", "UP", "iscsi"]
        assert rows["h-san"][2:5] == ["storage", "UP", "iscsi"]
        san_addr = rows["h-san"][1].rsplit(":", 1)[0]
        assert rows["h-san"][-1] == f"{san_addr}:3260", listing
        show = out.split("$ reddwarf admin host show h-san", 1)[1]
        assert re.search(rf"iscsi portal\s*│\s*{re.escape(san_addr)}:3260", show), show
        inst_show = out.split("$ reddwarf instance show", 1)[1]
        host = re.search(r"│ host\s*│\s*(h-[ab])\s", inst_show)
        assert host and re.search(r"│ volume driver\s*│\s*iscsi\s", inst_show), inst_show
        assert rows[host.group(1)][7] == "1"  # the host it names counts it
        # It answers SQL on its host's address, from outside the demo's process.
        m = re.search(r"mariadb -h (\S+) -P (\d+) -u (\S+) -p(\S+) (\S+)", out)
        assert m and m.group(1) == rows[host.group(1)][1].rsplit(":", 1)[0]
        with pymysql.connect(host=m.group(1), port=int(m.group(2)), user=m.group(3), password=m.group(4),
                             database=m.group(5)) as conn, conn.cursor() as cur:
            cur.execute("SELECT said FROM hello WHERE id = 1")
            assert cur.fetchone() == ("stored on a SAN LUN",)
        # `up` again is idempotent: same instance, nothing new.
        again = demo(root, port, "up")
        assert again.returncode == 0 and "creating instance" not in again.stdout, again.stdout[-2000:]
    finally:
        down = demo(root, port, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert net is not None
    assert leftovers(root, net) == []
