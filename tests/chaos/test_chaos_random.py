"""Seeded random faults: in each round one operation (create, backup, restore, resize) is started and, after
a random delay, one process (the server, hostd, the guest agent or mysqld) is SIGKILLed; the killed daemon
is started again (hostd restarts a dead guest, the agent a dead mysqld). After every round the system must
converge: the operation's instance ACTIVE (or ERROR with a fault), its backup COMPLETED (or FAILED with a
fault), no task left running, exactly one container and one volume per instance, no stored object for a
failed backup. A writer keeps inserting rows with known ids into one instance the whole time; at the end
every acknowledged row is there.

The plan comes from the seed (REDDWARF_CHAOS_SEED, printed on failure), so a failing run can be replayed.
`make test` runs 4 rounds (the plan's first four pair every operation with a victim, so every operation and
every victim come once); `make chaos` runs 24 (every operation with every victim at least once)."""
from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pymysql
import pytest

from reddwarf.common import states
from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc
from tests.chaos.test_chaos import Writer, mysqld_pid
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.server import launch, stop_process, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]

OPS = ("create", "backup", "restore", "resize")
VICTIMS = ("server", "hostd", "agent", "mysqld")
SEED = int(os.environ.get("REDDWARF_CHAOS_SEED", "20261125"))
FIXED = ((1, "alpha"), (2, "beta"), (3, "gamma"))  # in every backup: a restore must bring exactly these


def plan(seed: int, rounds: int) -> list[tuple[str, str, float]]:
    """The first four rounds pair a shuffled list of operations with a shuffled list of victims (so any run
    of 4+ rounds has every operation and every victim); then the other twelve (operation, victim) pairs in
    a shuffled order (so 16+ rounds have every pair); then random pairs. Each with a random delay."""
    rng = random.Random(seed)
    ops, victims = list(OPS), list(VICTIMS)
    rng.shuffle(ops)
    rng.shuffle(victims)
    pairs = list(zip(ops, victims, strict=True))
    rest = [(o, v) for o in OPS for v in VICTIMS if (o, v) not in pairs]
    rng.shuffle(rest)
    pairs += rest
    while len(pairs) < rounds:
        pairs.append((rng.choice(OPS), rng.choice(VICTIMS)))
    return [(op, v, round(rng.uniform(0.0, 3.0), 2)) for op, v in pairs[:rounds]]


def retrying(fn: Callable[[], object]) -> object:
    """A call to the API while the server is being restarted: retried until it answers."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) \
                    or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@dataclass
class Chaos:
    c: Cluster
    seed: int
    server_proc: subprocess.Popen[bytes] | None = None  # replacements of the fixture's processes
    hostd_proc: subprocess.Popen[bytes] | None = None
    hostd_log: object = None
    log: list[str] = field(default_factory=list)

    @property
    def backups(self) -> database_pb2_grpc.BackupsStub:
        return database_pb2_grpc.BackupsStub(self.c.channel)

    def say(self, what: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {what}")

    def where(self) -> str:
        return f"seed {self.seed}; rounds so far:\n  " + "\n  ".join(self.log)

    # -- reading state, tolerant of a server being restarted -----------------------------------------
    def instance(self, name: str) -> database_pb2.Instance:
        return retrying(lambda: self.c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name),
                                                             metadata=self.c.md))  # type: ignore[return-value]

    def backup(self, name: str) -> database_pb2.Backup:
        return retrying(lambda: self.backups.GetBackup(database_pb2.GetBackupRequest(name=name),
                                                       metadata=self.c.md))  # type: ignore[return-value]

    def settle_instance(self, name: str, timeout: float = 300) -> database_pb2.Instance:
        deadline = time.monotonic() + timeout
        while True:
            i = self.instance(name)
            if not i.task and (i.status == database_pb2.INSTANCE_STATUS_ACTIVE and self.answers(i) or i.status == database_pb2.INSTANCE_STATUS_ERROR):
                if i.status == database_pb2.INSTANCE_STATUS_ERROR:
                    assert i.fault.message, f"{name} in ERROR without a fault; {self.where()}"
                return i
            assert time.monotonic() < deadline, \
                f"{name} did not settle: {states.from_pb(states.InstanceStatus, i.status)} task={i.task} " \
                f"step={i.task_step}; {self.where()}"
            time.sleep(0.5)

    @staticmethod
    def answers(i: database_pb2.Instance) -> bool:
        """ACTIVE is only believed once mysqld takes a login (a guest that just died still looks ACTIVE
        until its heartbeats expire)."""
        if not i.endpoints or not i.health.accepting_connections:
            return False
        ep = i.endpoints[0]
        try:
            pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop",
                            connect_timeout=2).close()
            return True
        except pymysql.MySQLError:
            return False

    def settle_backup(self, name: str, timeout: float = 300) -> database_pb2.Backup:
        deadline = time.monotonic() + timeout
        while True:
            b = self.backup(name)
            if b.status in (database_pb2.BACKUP_STATUS_COMPLETED, database_pb2.BACKUP_STATUS_FAILED):
                if b.status == database_pb2.BACKUP_STATUS_FAILED:
                    assert b.fault.message, f"{name} FAILED without a fault; {self.where()}"
                return b
            assert time.monotonic() < deadline, f"{name} did not settle: {b.status}; {self.where()}"
            time.sleep(0.5)

    # -- the victims ------------------------------------------------------------------------------------
    def init_pid(self, iid: str, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            out = subprocess.run(["lxc-info", "-P", str(self.c.hostd.lxc_path), "-n", f"{self.c.hostd.prefix}{iid}",
                                  "-p", "-H"], capture_output=True, text=True, check=False).stdout.strip()
            if out.isdigit() and int(out) > 0:
                return int(out)
            assert time.monotonic() < deadline, f"no running container for {iid}; {self.where()}"
            time.sleep(0.1)

    def kill(self, victim: str, iid: str) -> str:
        if victim == "server":
            proc = self.server_proc or self.c.server.proc
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            s = self.c.server
            self.server_proc, log = launch(s.state_dir, s.api, s.agent, s.enroll, {})
            wait_ready(s.api, s.admin_files, self.server_proc, log)
            return "server killed and started again"
        if victim == "hostd":
            hproc = self.hostd_proc or self.c.hostd.proc
            os.killpg(hproc.pid, signal.SIGKILL)
            hproc.wait()
            if self.hostd_log is None:
                self.hostd_log = open(self.c.hostd.log_path, "ab")  # noqa: SIM115 - closed in stop()
            # the same host at the same address with the same state
            self.hostd_proc = subprocess.Popen(self.c.hostd.proc.args, stdout=self.hostd_log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
            return "hostd killed and started again"
        pid = self.init_pid(iid)
        if victim == "agent":
            os.kill(pid, signal.SIGKILL)  # PID 1 of the guest: the container stops; hostd starts it again
            return f"agent (pid {pid}) of {iid} killed"
        deadline = time.monotonic() + 60
        while not (mpid := mysqld_pid(pid)):
            assert time.monotonic() < deadline, f"no mysqld under the agent of {iid}; {self.where()}"
            time.sleep(0.1)
            pid = self.init_pid(iid)
        os.kill(mpid, signal.SIGKILL)
        return f"mysqld (pid {mpid}) of {iid} killed"

    def stop(self) -> None:
        for p in (self.server_proc, self.hostd_proc):
            if p is not None:
                stop_process(p)
        if self.hostd_log is not None:
            self.hostd_log.close()  # type: ignore[attr-defined]

    # -- the invariants -------------------------------------------------------------------------------
    def check_host_matches(self) -> None:
        """A container and a volume for every ACTIVE instance; nothing that belongs to no instance (an
        instance in ERROR may keep its container for inspection or have had it cleaned up)."""
        active, known = set(), set()
        token = ""
        while True:
            page = retrying(lambda t=token: self.c.instances.ListInstances(
                database_pb2.ListInstancesRequest(page_size=100, page_token=t), metadata=self.c.md))
            for i in page.instances:  # type: ignore[attr-defined]
                known.add(i.id)
                if i.status == database_pb2.INSTANCE_STATUS_ACTIVE:
                    active.add(i.id)
            token = page.next_page_token  # type: ignore[attr-defined]
            if not token:
                break
        prefix = self.c.hostd.prefix
        containers = {p.name[len(prefix):] for p in self.c.hostd.lxc_path.glob(f"{prefix}*")}
        volumes = {p.name[:-len(".img")] for p in self.c.hostd.storage_path.glob("*.img")}
        for what, have in (("containers", containers), ("volumes", volumes)):
            assert active <= have <= known, \
                f"{what} {sorted(have)} vs instances {sorted(known)} (active {sorted(active)}); {self.where()}"

    def check_store(self, failed: list[str]) -> None:
        store = self.c.server.state_dir / "backups"
        names = [p.name for p in store.rglob("*") if p.is_file()]
        partial = [n for n in names if n.endswith(".partial")]
        assert not partial, f"uploads left half-written in the store: {partial}; {self.where()}"
        for bid in failed:
            assert not [n for n in names if bid in n], f"failed backup {bid} left bytes in the store; {self.where()}"

    def fixed_rows(self, inst: database_pb2.Instance) -> tuple[tuple[int, str], ...]:
        ep = inst.endpoints[0]
        with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop",
                             connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute("SELECT id, v FROM fixed ORDER BY id")
            return tuple(cur.fetchall())

    def delete(self, name: str) -> None:
        retrying(lambda: self.c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=name),
                                                         metadata=self.c.md))
        deadline = time.monotonic() + 180
        while True:
            try:
                self.c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=self.c.md)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            assert time.monotonic() < deadline, f"{name} was not deleted; {self.where()}"
            time.sleep(0.5)


def new_instance(c: Cluster, display: str, restore_from: str = "") -> database_pb2.Instance:
    req = database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name=display, flavor="tiny", volume=database_pb2.Volume(size_gb=1)), restore_from_backup=restore_from)
    if not restore_from:
        req.databases.append(common_pb2.Database(database="shop"))
        req.users.append(common_pb2.User(user="app", password="app-pw-123", databases=["shop"]))
    return c.instances.CreateInstance(req, metadata=c.md)


@pytest.fixture
def chaos_plan(request: pytest.FixtureRequest) -> list[tuple[str, str, float]]:
    return plan(SEED, 24 if request.config.getoption("--chaos-full") else 4)


def test_seeded_random_kills_during_operations_converge_and_lose_no_row(tmp_path, chaos_plan):
    with start_cluster(tmp_path) as c:
        ch = Chaos(c, SEED)
        writer: Writer | None = None
        try:
            # An instance that lives through every round, with a writer on it and a first backup.
            anchor = ch.settle_instance(new_instance(c, "anchor").name)
            assert anchor.status == database_pb2.INSTANCE_STATUS_ACTIVE, anchor.fault.message
            ep = anchor.endpoints[0]
            with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop",
                                 autocommit=True) as conn, conn.cursor() as cur:
                cur.execute("CREATE TABLE rows_ (id INT PRIMARY KEY) ENGINE=InnoDB")
                cur.execute("CREATE TABLE fixed (id INT PRIMARY KEY, v VARCHAR(10)) ENGINE=InnoDB")
                cur.executemany("INSERT INTO fixed VALUES (%s, %s)", FIXED)
            writer = Writer(anchor)
            writer.start()
            first = ch.backups.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
                display_name="base", instance=anchor.name)), metadata=c.md)
            completed = [ch.settle_backup(first.name)]
            assert completed[0].status == database_pb2.BACKUP_STATUS_COMPLETED, completed[0].fault.message
            failed: list[str] = []
            flavors = itertools.cycle(("small", "tiny"))

            for n, (op, victim, delay) in enumerate(chaos_plan, 1):
                ch.say(f"round {n}: {op}, kill {victim} after {delay:.2f}s")
                anchor = ch.settle_instance(anchor.name)
                assert anchor.status == database_pb2.INSTANCE_STATUS_ACTIVE, f"anchor in ERROR: {anchor.fault.message}; {ch.where()}"
                if op == "create":
                    target = new_instance(c, f"c{n}")
                elif op == "restore":
                    target = new_instance(c, f"r{n}", restore_from=completed[-1].name)
                elif op == "resize":
                    flavor = next(flavors)
                    c.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(name=anchor.name, flavor=flavor),
                                               metadata=c.md)
                    target = anchor
                else:
                    b = ch.backups.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
                        display_name=f"b{n}", instance=anchor.name)), metadata=c.md)
                    target = anchor
                time.sleep(delay)
                ch.say("  " + ch.kill(victim, target.id))

                if op == "backup":
                    done_b = ch.settle_backup(b.name)
                    ch.say(f"  backup {states.from_pb(states.BackupStatus, done_b.status)} {done_b.fault.message}")
                    (completed if done_b.status == database_pb2.BACKUP_STATUS_COMPLETED else failed).append(
                        done_b if done_b.status == database_pb2.BACKUP_STATUS_COMPLETED else done_b.id)
                done = ch.settle_instance(target.name)
                ch.say(f"  {target.display_name}: {states.from_pb(states.InstanceStatus, done.status)} "
                       f"{done.fault.message}")
                if op == "resize" and done.status == database_pb2.INSTANCE_STATUS_ACTIVE:
                    assert done.flavor == f"flavors/{flavor}", f"{done.flavor} after resize; {ch.where()}"
                if op == "restore" and done.status == database_pb2.INSTANCE_STATUS_ACTIVE:
                    assert done.restored_from and ch.fixed_rows(done) == FIXED, ch.where()
                ch.check_host_matches()
                ch.check_store(failed)
                if target.name != anchor.name:
                    ch.delete(target.name)  # keeps two cores from carrying every round's instance
                    ch.check_host_matches()

            anchor = ch.settle_instance(anchor.name)
            assert anchor.status == database_pb2.INSTANCE_STATUS_ACTIVE, f"{anchor.fault.message}; {ch.where()}"
            writer.stop.set()
            writer.join(15)
            ep = anchor.endpoints[0]
            with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop",
                                 connect_timeout=5) as conn, conn.cursor() as cur:
                cur.execute("SELECT id FROM rows_")
                stored = {r[0] for r in cur.fetchall()}
            lost = set(writer.acked) - stored
            assert writer.acked and not lost, f"{len(lost)} acknowledged rows lost; {ch.where()}"
            # Every backup that says COMPLETED restores: the newest, into a fresh instance.
            restored = ch.settle_instance(new_instance(c, "last", restore_from=completed[-1].name).name)
            assert restored.status == database_pb2.INSTANCE_STATUS_ACTIVE and ch.fixed_rows(restored) == FIXED, ch.where()
            for name in (restored.name, anchor.name):
                ch.delete(name)
            ch.check_host_matches()
            assert not list(c.hostd.lxc_path.glob(f"{c.hostd.prefix}*")), ch.where()
            print(f"\n{len(writer.acked)} rows acknowledged, 0 lost; {ch.where()}")
        finally:
            if writer is not None:
                writer.stop.set()
                writer.join(15)
            ch.stop()


def test_the_plan_is_seeded_and_covers_every_operation_and_victim():
    a, b = plan(7, 4), plan(7, 4)  # the bounded run of `make test`
    assert a == b and plan(8, 4) != a
    for seed in range(50):  # whatever the seed, the bounded run has every operation and every victim
        four = plan(seed, 4)
        assert {op for op, _, _ in four} == set(OPS) and {v for _, v, _ in four} == set(VICTIMS)
    assert {(op, v) for op, v, _ in plan(7, 16)} == {(op, v) for op in OPS for v in VICTIMS}
    assert len(plan(7, 24)) == 24
    assert all(0.0 <= d <= 3.0 for _, _, d in a)
