"""`make demo-ha` for real (clients/demo_ha.py in a directory of its own): three Galera nodes, SeaweedFS, two
servers, a hostd and an ACTIVE instance come up, both servers answer, and `down` leaves nothing behind: no
process, mount, loop device, container or file of the demo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.galera import available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available(), reason="galera-4 / mariabackup not installed")]


def leftovers(root: Path) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(root) in args and "pytest" not in args:
                found.append(f"process {pid}: {args[:200]}")
    found += [f"mount {ln.split()[1]}" for ln in Path("/proc/mounts").read_text().splitlines()
              if ln.split()[1].startswith(str(root))]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    found += [f"loop {ln}" for ln in loops.splitlines() if str(root) in ln]
    if root.exists():
        found.append(f"directory {root}")
    return found


def test_demo_ha_comes_up_and_down_leaving_nothing(tmp_path: Path) -> None:
    root = tmp_path / "demo-ha"
    env = {**os.environ, "REDDWARF_DEMO_HA_DIR": str(root)}
    demo = [sys.executable, "-m", "reddwarf.client.demo_ha"]
    try:
        up = subprocess.run([*demo, "up"], env=env, capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "Red Dwarf HA is up" in up.stdout
        for part in ("servers:", "Galera node0", "Galera node2", "SeaweedFS: S3", "hostd:", "instance:  ha-db"):
            assert part in up.stdout, part
        for name in ("galera0", "galera1", "galera2", "weed", "server0", "server1", "hostd", "gateway"):
            pid = int((root / f"{name}.pid").read_text())
            os.kill(pid, 0)  # running
        # Both servers answer, and share the state: the instance is listed by each.
        servers = next(ln for ln in up.stdout.splitlines() if "servers:" in ln).split()[1].split(",")
        from reddwarf.client import Client, ClientConfig
        admin = root / "server" / "admin"
        token = (root / "demo.token").read_text().strip()
        for api in servers:
            with Client(ClientConfig(endpoint=api, ca=str(admin / "ca.pem"), cert=str(admin / "client.pem"),
                                     key=str(admin / "client.key"), token=token)) as rd:
                assert [i.display_name for i in rd.list_instances()] == ["ha-db"]
        # Running up again changes nothing: the same instance (its create's request id), the same processes.
        again = subprocess.run([*demo, "up"], env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        with Client(ClientConfig(endpoint=",".join(servers), ca=str(admin / "ca.pem"), cert=str(admin / "client.pem"),
                                 key=str(admin / "client.key"), token=token)) as rd:
            assert [i.display_name for i in rd.list_instances()] == ["ha-db"]
    finally:
        down = subprocess.run([*demo, "down"], env=env, capture_output=True, text=True, timeout=600)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert leftovers(root) == []
