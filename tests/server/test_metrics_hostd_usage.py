"""hostd's ListUsage behind the server's beancounter series: every managed container's usage in one call,
with one whose cgroup cannot be read left out rather than failing the others. (Its real flows, over gRPC
against the fake and LXC drivers, run in test_metrics_prometheus.py.)"""
from __future__ import annotations

import json

from reddwarf.hostd.containers import Beancounter, ContainerStatus, Limits, Usage
from reddwarf.hostd.host import Host
from reddwarf.hostd.service import usage_pb
from reddwarf.hostd.settings import Settings
from reddwarf.hostd.state import ContainerRecord


class Containers:
    name = "fake"

    def __init__(self) -> None:
        self.broken = {"c-broken"}

    def status(self, cid: str) -> ContainerStatus:
        return ContainerStatus("RUNNING", 1)

    def start(self, cid: str) -> ContainerStatus:
        return self.status(cid)

    def list_names(self) -> list[str]:
        return ["c-ok", "c-broken", "c-other"]

    def usage(self, cid: str, limits: Limits) -> Usage:
        if cid in self.broken:
            raise FileNotFoundError(f"/sys/fs/cgroup/memory/lxc/{cid}/memory.usage_in_bytes")
        mem = limits.memory_mb << 20
        return Usage(id=cid, beancounters=(Beancounter("memory", 1234, 2345, mem, mem, 3),), cpu_usage_ns=5)


def record(cid: str) -> ContainerRecord:
    return ContainerRecord(id=cid, limits=Limits(memory_mb=64, cpu_shares=2, max_processes=8), network_mode="host",
                           address="127.0.0.1", port=1, template="t", datadir="/var/lib/mysql", volume_id="",
                           fingerprint="f", desired="running")


def test_list_usage_reports_every_readable_container_and_skips_a_broken_one(tmp_path):
    rows = {c: record(c).to_dict() for c in ("c-ok", "c-broken", "c-other")}
    (tmp_path / "state.json").write_text(json.dumps({"containers": rows, "volumes": {}}))
    host = Host(Settings(state_dir=str(tmp_path)), Containers(), None, None, "t")  # type: ignore[arg-type]
    got = {u.id: usage_pb(u) for u in host.all_usage()}
    assert set(got) == {"c-ok", "c-other"}
    mem = got["c-ok"].beancounters[0]
    assert (mem.resource, mem.held, mem.maxheld, mem.limit, mem.failcnt) == ("memory", 1234, 2345, 64 << 20, 3)
    assert got["c-ok"].cpu_usage_ns == 5
