"""The proof-restore sandbox (agent/sandbox.py) from inside and from the host: a user namespace of its own,
no network, and memory, cpu and pids limits that hold and are gone after the run.

The sandbox runs a probe instead of verify (sandbox.json's "probe"); the proof restores themselves, with
mariadbd inside these limits, are in tests/backup/test_hostile_backup.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from reddwarf.agent import sandbox

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, cgroups")]


@pytest.fixture
def stage() -> Iterator[str]:
    parent = tempfile.mkdtemp(prefix="reddwarf-test-sandbox-", dir="/var/tmp")
    try:
        yield sandbox.new_stage(parent)
    finally:
        subprocess.run(["rm", "-rf", parent], check=False)


async def look(stage: str, limits: sandbox.Limits | None = None, uid: int = sandbox.SANDBOX_UID,
               **probe: Any) -> tuple[int, list[dict[str, Any]], int]:
    res, ooms = await sandbox.launch(stage, {"uid": uid, "hide": [], "probe": {"paths": [], **probe}},
                                     limits or sandbox.Limits(), 60)
    lines = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert sandbox.cgroup_name(stage) not in sandbox.leftover_cgroups(), "the cgroups go with the run"
    assert sandbox.leftovers(os.path.dirname(stage)) == [], "and so does every process of it"
    with open("/proc/self/mountinfo") as f:
        assert stage not in f.read(), "its mounts were in its own namespace only"
    return res.returncode, lines, ooms


def _host_address() -> str:
    """An address of this host other than loopback (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source address
        return str(s.getsockname()[0])


async def test_inside_the_sandbox_root_is_a_mapped_range_and_no_address_is_reachable(stage: str) -> None:
    listeners = []
    targets = []
    for addr in ("127.0.0.1", _host_address()):
        srv = socket.create_server((addr, 0))
        listeners.append(srv)
        targets.append(f"{addr}:{srv.getsockname()[1]}")
    try:
        for t in targets:  # teeth: from the host both answer
            host, _, port = t.rpartition(":")
            socket.create_connection((host, int(port)), timeout=2).close()
        rc, out, _ = await look(stage, connect=targets)
    finally:
        for srv in listeners:
            srv.close()
    assert rc == 0
    seen = out[0]
    assert seen["uid_map"] == seen["gid_map"] == [["0", str(sandbox.IDMAP_BASE), str(sandbox.IDMAP_SIZE)]]
    assert seen["uid"] == sandbox.INNER_UID and int(seen["cap_eff"], 16) == 0
    assert seen["interfaces"] == ["lo"]
    assert all(r != "connected" for r in seen["reach"].values()), seen["reach"]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the sandbox's seccomp filter is for x86_64 only")
async def test_a_seccomp_filter_refuses_namespaces_mounts_keys_ptrace_and_perf(stage: str) -> None:
    rc, out, _ = await look(stage, threads=50)
    assert rc == 0
    seen = out[0]
    assert seen["seccomp"] == "2"  # a filter
    assert seen["syscalls"] == {"unshare(CLONE_NEWUSER)": "EPERM", "clone(CLONE_NEWUSER)": "EPERM",
                                "keyctl": "EPERM", "mount": "EPERM", "ptrace": "EPERM",
                                "perf_event_open": "EPERM"}, seen["syscalls"]
    assert seen["threads"] == 50  # threads (clone3 refused with ENOSYS: libc falls back to clone) still start


def test_the_seccomp_program_jumps_land_on_its_returns() -> None:
    prog = sandbox.seccomp_program()
    for pc, (code, jt, jf, _k) in enumerate(prog):
        if code & 0x07 == 0x05:  # BPF_JMP: both targets inside the program
            assert pc + 1 + jt < len(prog) and pc + 1 + jf < len(prog)
    assert prog[-1][0] == 0x06 and len(prog) < 256


async def test_the_memory_limit_kills_a_process_that_goes_over_it(stage: str) -> None:
    small = sandbox.Limits(memory_mb=64)
    rc, out, ooms = await look(stage, small, alloc_mb=16)
    assert rc == 0 and out[-1] == {"allocated_mb": 16} and ooms == 0  # teeth: under the limit it works
    rc, out, ooms = await look(stage, small, alloc_mb=256)
    assert rc != 0 and ooms >= 1
    assert len(out) == 1 and "allocated_mb" not in out[0], out


async def test_the_pids_limit_caps_how_many_threads_the_sandbox_may_start(stage: str) -> None:
    _, out, _ = await look(stage, sandbox.Limits(pids=48), threads=200)
    capped = out[0]["threads"]
    assert 0 < capped < 48
    _, out, _ = await look(stage, sandbox.Limits(pids=512), threads=200)
    assert out[0]["threads"] == 200


def _cgroup_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/cgroup") as f:
        return {ctrl: path for _, ctrls, path in (ln.rstrip("\n").split(":", 2) for ln in f)
                for ctrl in ctrls.split(",")}


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


async def test_from_the_host_the_sandbox_runs_in_its_cgroups_with_the_limits_set(stage: str) -> None:
    if not os.path.isdir("/sys/fs/cgroup/memory"):
        pytest.skip("reads cgroup v1 files; this host has cgroup v2")
    limits = sandbox.Limits(memory_mb=300, cpu_shares=200, cpu_quota_pct=50, pids=100)
    task = asyncio.create_task(look(stage, limits, hold_s=20))
    found: dict[str, Any] = {}
    try:
        for _ in range(1000):
            for pid in sandbox.leftovers(os.path.dirname(stage)):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"--probe" in f.read():
                        found = {"pid": pid, "cg": _cgroup_of(pid)}
                        with open(f"/proc/{pid}/status") as f:
                            found["uid"] = [ln for ln in f if ln.startswith("Uid:")][0].split()[1:]
            if found:
                break
            await asyncio.sleep(0.02)
        assert found, "the probe never showed up"
        name = "/" + sandbox.cgroup_name(stage)
        assert found["cg"]["memory"] == found["cg"]["cpu"] == found["cg"]["pids"] == name, found
        base = "/sys/fs/cgroup"
        assert int(_read(f"{base}/memory{name}/memory.limit_in_bytes")) == 300 * 1024 * 1024
        assert _read(f"{base}/cpu{name}/cpu.shares") == "200"
        assert _read(f"{base}/cpu{name}/cpu.cfs_quota_us") == "50000"
        assert _read(f"{base}/pids{name}/pids.max") == "100"
        assert found["uid"] == [str(sandbox.SANDBOX_UID)] * 4
        # The sandbox cannot lift its own limit: the files belong to the host's root, not to its range.
        assert os.stat(f"{base}/memory{name}/memory.limit_in_bytes").st_uid == 0
    finally:
        for pid in sandbox.leftovers(os.path.dirname(stage)):
            os.kill(pid, 9)
        await task
    assert not os.path.exists(f"/sys/fs/cgroup/memory/{sandbox.cgroup_name(stage)}")


@pytest.mark.parametrize("uid", [0, 1000, sandbox.IDMAP_BASE, sandbox.IDMAP_BASE + sandbox.IDMAP_SIZE])
async def test_the_sandbox_refuses_a_uid_outside_its_range_or_its_root(stage: str, uid: int) -> None:
    rc, out, _ = await look(stage, uid=uid)
    assert rc != 0 and out == []


def test_cgroups_left_by_a_killed_server_are_emptied_and_removed(stage: str) -> None:
    name = sandbox.cgroup_name(stage)
    dirs = sandbox.make_cgroups(name, sandbox.Limits())
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        for d in dirs:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(left.pid))
        sandbox.clear(os.path.dirname(stage))
        assert left.wait(10) == -9
        assert name not in sandbox.leftover_cgroups() and not any(os.path.exists(d) for d in dirs)
    finally:
        if left.poll() is None:
            left.kill()
            left.wait()
        sandbox.remove_cgroups(name)
