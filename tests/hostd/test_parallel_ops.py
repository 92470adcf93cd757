"""hostd runs operations on different instances at the same time, and still one at a time per container or
volume: through the real servicer and Host over the fake drivers (no root), with driver steps that can only
finish when another call is inside the driver too (a barrier), so overlap is shown by behaviour, not timing.
And what instances share is never handed out twice: ports, bridge addresses, isolated id ranges, the state
file's records."""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from reddwarf.hostd import idmap, network
from reddwarf.hostd.containers import Bootstrap, ContainerSpec, ContainerStatus, Limits
from reddwarf.hostd.fake import FakeContainerDriver, FakeVolumeDriver, stop_all
from reddwarf.hostd.host import CreateContainer, Host
from reddwarf.hostd.service import HostAgentServicer
from reddwarf.hostd.settings import Settings
from reddwarf.hostd.state import ContainerRecord, HostState
from reddwarf.v1 import common_pb2, host_pb2

LIMITS = Limits(memory_mb=64, cpu_shares=256, max_processes=64)
MEET_SECONDS = 20  # generous: a barrier that is never met fails the test (BrokenBarrierError), it never passes


class Meeting:
    """Driver steps that wait, inside the driver, for `parties` calls to be there at once."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=MEET_SECONDS)
        self.met: list[str] = []

    def wait(self, what: str) -> None:
        self.barrier.wait()
        self.met.append(what)


class MeetingContainers(FakeContainerDriver):
    meeting: Meeting | None = None
    inside: dict[str, int]
    most_inside: dict[str, int]

    def _enter(self, cid: str) -> None:
        with self._lock:
            self.inside[cid] = self.inside.get(cid, 0) + 1
            self.most_inside[cid] = max(self.most_inside.get(cid, 0), self.inside[cid])

    def _leave(self, cid: str) -> None:
        with self._lock:
            self.inside[cid] -= 1

    def create(self, spec: ContainerSpec) -> None:
        self._enter(spec.id)
        try:
            if self.meeting is not None:
                self.meeting.wait(spec.id)
            super().create(spec)
        finally:
            self._leave(spec.id)

    def start(self, cid: str) -> ContainerStatus:
        self._enter(cid)
        try:
            time.sleep(0.05)  # long enough for a second call on the same container to arrive meanwhile
            return ContainerStatus("RUNNING", 1)
        finally:
            self._leave(cid)

    def stop(self, cid: str, timeout: int) -> ContainerStatus:
        self._enter(cid)
        try:
            time.sleep(0.05)
            return ContainerStatus("STOPPED")
        finally:
            self._leave(cid)


class MeetingVolumes(FakeVolumeDriver):
    meeting: Meeting | None = None

    def create(self, vid: str, size_gb: int):  # type: ignore[no-untyped-def]
        if self.meeting is not None:
            self.meeting.wait(vid)
        return super().create(vid, size_gb)


@pytest.fixture
def settings(tmp_path):
    s = Settings(host_id="t", state_dir=str(tmp_path / "state"), lxc_path=str(tmp_path / "lxc"),
                 storage_path=str(tmp_path / "vols"), container_prefix="rdp-", agent_init_cmd="sleep 60",
                 network_mode="host", port_min=42000, port_max=42999)
    yield s
    stop_all(s.lxc_path, s.container_prefix)


def make_host(settings: Settings) -> tuple[Host, MeetingContainers, MeetingVolumes]:
    containers, volumes = MeetingContainers(settings), MeetingVolumes(settings)
    containers.inside, containers.most_inside = {}, {}
    return Host(settings, containers, volumes, None, "fake"), containers, volumes


def create_request(cid: str, volume_id: str = "") -> host_pb2.CreateContainerRequest:
    return host_pb2.CreateContainerRequest(container=host_pb2.Container(
        id=cid, volume_id=volume_id, network_mode=host_pb2.NETWORK_MODE_HOST,
        limits=common_pb2.Limits(memory_mb=64, cpu_shares=256, max_processes=64),
        bootstrap=host_pb2.AgentBootstrap(server_address="127.0.0.1:1", ca_pem="CA", enrollment_token="tok",
                                          instance_id=cid)))


def create(cid: str, mode: str = "host") -> CreateContainer:
    return CreateContainer(id=cid, limits=LIMITS, network_mode=mode,
                           bootstrap=Bootstrap("127.0.0.1:1", "CA", "tok", cid))


async def test_two_creates_on_one_hostd_overlap_in_the_driver(settings):
    """Each driver step returns only once the other create is inside the driver too: with hostd's old single
    lock the second never got there and the first gave up (a broken barrier)."""
    host, containers, volumes = make_host(settings)
    servicer = HostAgentServicer(host)
    volumes.meeting = Meeting(2)
    made = await asyncio.gather(*(servicer.CreateVolume(host_pb2.CreateVolumeRequest(
        volume=host_pb2.HostVolume(id=v, size_gb=1)), None) for v in ("va", "vb")))
    assert sorted(v.id for v in made) == ["va", "vb"] and sorted(volumes.meeting.met) == ["va", "vb"]
    containers.meeting = Meeting(2)
    out = await asyncio.gather(servicer.CreateContainer(create_request("ca", "va"), None),
                               servicer.CreateContainer(create_request("cb", "vb"), None))
    assert sorted(containers.meeting.met) == ["ca", "cb"]
    assert sorted(c.id for c in out) == ["ca", "cb"] and out[0].port != out[1].port
    # Both were recorded whole, each with its own volume attached.
    saved = HostState.load(settings.state_file)
    assert {c: r.volume_id for c, r in saved.containers.items()} == {"ca": "va", "cb": "vb"}
    assert {v: r.attached_to for v, r in saved.volumes.items()} == {"va": "ca", "vb": "cb"}


async def test_calls_on_one_container_still_run_one_after_the_other(settings):
    host, containers, _ = make_host(settings)
    servicer = HostAgentServicer(host)
    for cid in ("one", "other"):
        await servicer.CreateContainer(create_request(cid), None)
    calls = []
    for _ in range(3):
        calls += [servicer.StartContainer(host_pb2.ContainerRef(id="one"), None),
                  servicer.StopContainer(host_pb2.StopContainerRequest(id="one", timeout_seconds=1), None),
                  servicer.StartContainer(host_pb2.ContainerRef(id="other"), None)]
    await asyncio.gather(*calls)
    assert containers.most_inside["one"] == 1 and containers.most_inside["other"] == 1


@pytest.mark.parametrize("mode", ["host", "bridge"])
def test_concurrent_creates_never_get_the_same_port_or_address(settings, monkeypatch, mode):
    """20 creates at once, with the picks slowed down so that unguarded picks would collide."""
    settings = replace(settings, network_mode=mode)  # the fake driver makes no bridge: addresses only
    host, _, _ = make_host(settings)
    real_free, real_address = network.port_is_free, network.allocate_address

    def slow_free(port: int, address: str = "0.0.0.0") -> bool:
        time.sleep(0.002)
        return real_free(port, address)

    def slow_address(cidr: str, taken):  # type: ignore[no-untyped-def]
        time.sleep(0.01)
        return real_address(cidr, taken)

    monkeypatch.setattr(network, "port_is_free", slow_free)
    monkeypatch.setattr(network, "allocate_address", slow_address)
    with ThreadPoolExecutor(20) as pool:
        views = list(pool.map(lambda n: host.create_container(create(f"c{n}", mode)), range(20)))
    picks = [(v.record.address, v.record.port) for v in views]
    assert len(set(picks)) == 20
    saved = HostState.load(settings.state_file)
    assert sorted((r.address, r.port) for r in saved.containers.values()) == sorted(picks)


def test_isolated_id_ranges_are_never_handed_out_twice(tmp_path):
    registry = str(tmp_path / "idmaps")
    owners = []
    for n in range(16):
        owner = tmp_path / f"c{n}"
        owner.mkdir()
        (owner / "config").write_text("")
        owners.append(str(owner))
    with ThreadPoolExecutor(16) as pool:
        bases = list(pool.map(lambda o: idmap.allocate(o, registry), owners))
    assert len(set(bases)) == 16 and all(idmap.is_isolated(b) for b in bases)
    assert [idmap.allocate(o, registry) for o in owners] == bases  # each owner keeps its own


def test_state_writes_from_many_threads_all_land_in_the_file(tmp_path):
    state = HostState(str(tmp_path / "state.json"))
    stop = threading.Event()
    seen_errors: list[BaseException] = []

    def reader() -> None:  # iterates while writers add: a snapshot, never "changed size during iteration"
        while not stop.is_set():
            try:
                sum(1 for _ in state.containers.values())
            except BaseException as exc:  # noqa: BLE001 - reported below
                seen_errors.append(exc)
                return

    def put(n: int) -> None:
        state.put_container(ContainerRecord(id=f"c{n}", limits=LIMITS, network_mode="host", address="127.0.0.1",
                                            port=n, template="t", datadir="/d", volume_id="", fingerprint="f"))

    t = threading.Thread(target=reader)
    t.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(64)))
    finally:
        stop.set()
        t.join()
    assert not seen_errors
    with open(state.path) as f:
        assert sorted(json.load(f)["containers"]) == sorted(f"c{n}" for n in range(64))
    assert not os.path.exists(state.path + ".tmp")
