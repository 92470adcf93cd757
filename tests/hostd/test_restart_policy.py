"""hostd's bookkeeping on its own, over a stand-in driver: the restart policy (which containers it starts
again, how it backs off, how state written before the policy existed is read) and a create cut off inside
the driver (the real containers are in test_hostd_service.py)."""
from __future__ import annotations

import json

import pytest

from reddwarf.hostd.containers import Bootstrap, ContainerStatus, Limits
from reddwarf.hostd.host import REVIVE_MAX_DELAY, CreateContainer, Host
from reddwarf.hostd.settings import Settings
from reddwarf.hostd.state import ContainerRecord


class Containers:
    """Only what the policy touches: status and start, recorded."""

    name = "fake"

    def __init__(self, states: dict[str, str]) -> None:
        self.states = states
        self.started: list[str] = []

    def status(self, cid: str) -> ContainerStatus:
        return ContainerStatus(self.states[cid], 1 if self.states[cid] == "RUNNING" else 0)

    def start(self, cid: str) -> ContainerStatus:
        self.started.append(cid)
        return self.status(cid)  # stays as the test set it: a container that keeps dying

    # for create/delete: a driver that can be made to die half-way through a create
    crash_next_create = False

    def create(self, spec: object) -> None:
        cid = spec.id  # type: ignore[attr-defined]
        self.states[cid] = "STOPPED"
        if self.crash_next_create:
            self.crash_next_create = False
            raise KeyboardInterrupt("hostd killed inside lxc-copy")  # not an error the host would handle

    def list_names(self) -> list[str]:
        return list(self.states)

    def destroy(self, cid: str) -> None:
        self.states.pop(cid, None)


def record(cid: str, desired: str) -> ContainerRecord:
    return ContainerRecord(id=cid, limits=Limits(memory_mb=64, cpu_shares=2, max_processes=8), network_mode="host",
                           address="127.0.0.1", port=1, template="t", datadir="/var/lib/mysql", volume_id="",
                           fingerprint="f", desired=desired)


def host(tmp_path, containers: Containers, records: list[ContainerRecord], legacy: bool = False) -> Host:
    settings = Settings(state_dir=str(tmp_path))
    rows = {r.id: r.to_dict() for r in records}
    if legacy:
        for row in rows.values():
            row.pop("desired")
    (tmp_path / "state.json").write_text(json.dumps({"containers": rows, "volumes": {}}))
    return Host(settings, containers, None, None, "t")  # type: ignore[arg-type]


def test_only_containers_meant_to_run_are_started_again_with_backoff(tmp_path):
    c = Containers({"dead": "STOPPED", "parked": "STOPPED", "fine": "RUNNING"})
    h = host(tmp_path, c, [record("dead", "running"), record("parked", "stopped"), record("fine", "running")])
    assert h.revive(now=100.0) == ["dead"]
    assert h.revive(now=100.5) == []          # backing off (1 s)
    assert h.revive(now=101.1) == ["dead"]    # then 2 s
    assert h.revive(now=102.9) == []
    assert h.revive(now=103.2) == ["dead"]
    assert c.started == ["dead"] * 3          # "parked" was stopped on purpose, "fine" runs
    c.states["dead"] = "RUNNING"
    h.revive(now=103.2 + REVIVE_MAX_DELAY + 1)  # up long enough: the backoff is forgotten
    c.states["dead"] = "STOPPED"
    assert h.revive(now=103.2 + REVIVE_MAX_DELAY + 1.5) == ["dead"]


def test_state_from_before_the_policy_keeps_what_each_container_is_doing(tmp_path):
    c = Containers({"up": "RUNNING", "down": "STOPPED"})
    h = host(tmp_path, c, [record("up", ""), record("down", "")], legacy=True)
    assert h.state.containers["up"].desired == "running"
    assert h.state.containers["down"].desired == "stopped"
    assert h.revive(now=1.0) == []
    saved = json.loads((tmp_path / "state.json").read_text())["containers"]
    assert saved["up"]["desired"] == "running" and saved["down"]["desired"] == "stopped"


def test_a_create_cut_off_inside_the_driver_stays_ours_and_is_finished_by_the_retry(tmp_path):
    c = Containers({})
    h = host(tmp_path, c, [])
    req = CreateContainer(id="half", limits=Limits(memory_mb=64, cpu_shares=2, max_processes=8),
                          bootstrap=Bootstrap("127.0.0.1:1", "ca", "tok", "half"))
    c.crash_next_create = True
    with pytest.raises(KeyboardInterrupt):
        h.create_container(req)
    # what a restarted hostd reads: the container is managed, not an unmanaged orphan
    again = Host(h.settings, c, None, None, "t")  # type: ignore[arg-type]
    views, unmanaged = again.list_containers()
    assert [v.record.id for v in views] == ["half"] and unmanaged == []
    assert again.create_container(req).record.id == "half"  # the server's retry, same parameters
    again.delete_container("half")
    assert again.list_containers() == ([], []) and "half" not in c.states
