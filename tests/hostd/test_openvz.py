"""OpenVZ driver: this kernel has no OpenVZ (no vzctl, no /proc/user_beancounters), so these tests inject a
recording runner that plays a tiny vzctl/vzlist, check the exact commands the driver would run, and parse
samples from the OpenVZ documentation (tests/hostd/data/README.md)."""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from reddwarf.common.errors import FailedPrecondition, InvalidArgument, NotFound
from reddwarf.common.runner import Result
from reddwarf.hostd.containers import Bootstrap, ContainerSpec, Limits, NetworkPlan, VolumeMount
from reddwarf.hostd.openvz import OpenVzDriver, ctid_for, parse_beancounters, parse_vzlist_json, ubc_args
from reddwarf.hostd.settings import Settings

DATA = Path(__file__).parent / "data"
LIMITS = Limits(memory_mb=512, cpu_shares=1024, max_processes=128, swap_mb=256, cpu_limit_millicores=1500,
                max_open_files=4096, io_weight=500, io_iops=300, io_bytes_per_sec=10 * 1024 * 1024)


class FakeVz:
    """Records argv and answers like vzctl/vzlist would for the containers it has 'created'."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.cts: dict[int, dict] = {}

    def __call__(self, argv, *, timeout=None, check=True, **_kw) -> Result:
        argv = list(argv)
        self.calls.append(argv)
        out, rc = "", 0
        if argv[0] == "vzlist":
            ids = [int(a) for a in argv[3:]]
            cts = [c for i, c in self.cts.items() if not ids or i in ids]
            rc = 1 if ids and not cts else 0
            out = json.dumps(cts)
        elif argv[:2] == ["vzctl", "create"]:
            self.cts[int(argv[2])] = {"ctid": int(argv[2]), "name": argv[argv.index("--name") + 1],
                                      "status": "stopped", "ip": []}
        elif argv[1] == "start":
            self.cts[int(argv[2])]["status"] = "running"
        elif argv[1] == "stop":
            self.cts[int(argv[2])]["status"] = "stopped"
        elif argv[1] == "destroy":
            del self.cts[int(argv[2])]
        elif argv[1] == "exec2":
            out = "ran: " + argv[3]
        return Result(tuple(argv), rc, out, "", 0.0)

    def vzctl(self) -> list[str]:
        return [shlex.join(c) for c in self.calls if c[0] == "vzctl"]


@pytest.fixture
def vz(tmp_path):
    fake = FakeVz()
    drv = OpenVzDriver(Settings(container_prefix="rdt-"), fake, beancounters_path=str(tmp_path / "ubc"),
                       private_root=str(tmp_path / "private"), conf_dir=str(tmp_path / "conf"), diskspace_gb=4)
    return fake, drv, tmp_path


def spec(cid: str = "abc", mount: VolumeMount | None = None) -> ContainerSpec:
    boot = Bootstrap("127.0.0.1:9000", "CA PEM", "tok-secret", cid, 5)
    return ContainerSpec(cid, LIMITS, boot, NetworkPlan("host", "127.0.0.1", 33061), "debian-12-x86_64",
                         mount=mount)


def test_limits_map_onto_ubc_cpu_and_io_parameters():
    args = ubc_args(LIMITS, 4)
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs == {
        "--physpages": "0:131072",         # 512 MiB in 4 KiB pages
        "--swappages": "0:65536",          # 256 MiB
        "--privvmpages": "196608:216268",  # RAM+swap, limit 10 % above the barrier
        "--numproc": "128:128",
        "--cpuunits": "1000",              # cgroup's default 1024 shares ~ vzctl's default 1000 units
        "--cpulimit": "150",               # 1.5 CPUs = 150 %
        "--diskspace": "4G:5G",
        "--numfile": "4096:4096",
        "--ioprio": "3",
        "--iolimit": "10485760",
        "--iopslimit": "300",
    }


def test_unset_optional_limits_are_left_out_and_cpulimit_zero_means_unlimited():
    pairs = dict(zip(*[iter(ubc_args(Limits(memory_mb=64, cpu_shares=2, max_processes=8), 1))] * 2, strict=True))
    assert pairs["--cpulimit"] == "0" and pairs["--cpuunits"] == "8"
    assert not {"--numfile", "--ioprio", "--iolimit", "--iopslimit"} & pairs.keys()


def test_create_runs_vzctl_create_then_set_save_and_writes_firstboot_into_the_private_area(vz):
    fake, drv, tmp = vz
    ct = ctid_for("rdt-abc")
    drv.create(spec())
    cmds = fake.vzctl()
    assert cmds[0] == f"vzctl create {ct} --ostemplate debian-12-x86_64 --name rdt-abc --hostname rdt-abc"
    assert cmds[1] == f"vzctl set {ct} {shlex.join(ubc_args(LIMITS, 4))} --ipadd 127.0.0.1 --save"
    agent = json.loads((tmp / "private" / str(ct) / "etc/reddwarf/agent.json").read_text())
    assert agent["instance_id"] == "abc" and agent["mysql_port"] == 33061
    assert oct((tmp / "private" / str(ct) / "etc/reddwarf/agent.json").stat().st_mode & 0o777) == "0o600"
    unit = tmp / "private" / str(ct) / "etc/systemd/system/reddwarf-agent.service"
    assert "ExecStart=/opt/reddwarf/venv/bin/python -m reddwarf.agent.main --config /etc/reddwarf/agent.json" \
        in unit.read_text()
    assert "Environment=PYTHONPATH=/opt/reddwarf/lib" in unit.read_text()
    wants = tmp / "private" / str(ct) / "etc/systemd/system/multi-user.target.wants/reddwarf-agent.service"
    assert os.readlink(wants) == "/etc/systemd/system/reddwarf-agent.service"
    assert (tmp / "private" / str(ct) / "opt/reddwarf/lib/reddwarf/agent/main.py").exists()
    drv.create(spec())  # idempotent: exists, so nothing more is run
    assert len(fake.vzctl()) == 2


def test_lifecycle_commands_and_states(vz):
    fake, drv, _ = vz
    ct = ctid_for("rdt-abc")
    assert drv.status("abc").state == "ABSENT"
    drv.create(spec())
    assert drv.status("abc").state == "STOPPED"
    assert drv.start("abc").state == "RUNNING"
    assert drv.exec("abc", ["sh", "-c", "echo hi; id"], 10).stdout == b"ran: sh -c 'echo hi; id'"
    drv.set_limits("abc", LIMITS, None)
    assert drv.stop("abc", 0).state == "STOPPED"
    drv.destroy("abc")
    assert drv.status("abc").state == "ABSENT"
    assert fake.vzctl()[2:] == [f"vzctl start {ct} --wait",
                                f"vzctl exec2 {ct} 'sh -c '\"'\"'echo hi; id'\"'\"''",
                                f"vzctl set {ct} {shlex.join(ubc_args(LIMITS, 4))} --save",
                                f"vzctl stop {ct} --fast",
                                f"vzctl stop {ct} --fast", f"vzctl destroy {ct}"]
    drv.destroy("abc")  # absent: nothing run
    assert len(fake.vzctl()) == 8


def test_missing_container_is_not_found_and_exec_needs_it_running(vz):
    _, drv, _ = vz
    with pytest.raises(NotFound):
        drv.start("nope")
    drv.create(spec())
    with pytest.raises(FailedPrecondition):
        drv.exec("abc", ["true"], 5)


def test_volume_becomes_a_bind_mount_script_run_at_start(vz):
    _, drv, tmp = vz
    drv.create(spec(mount=VolumeMount("/var/lib/reddwarf/mnt/v1", "/var/lib/mysql")))
    script = tmp / "conf" / f"{ctid_for('rdt-abc')}.mount"
    text = script.read_text()
    assert 'mount -n --bind /var/lib/reddwarf/mnt/v1 "${VE_ROOT}/var/lib/mysql"' in text
    assert os.access(script, os.X_OK)
    with pytest.raises(InvalidArgument) as exc:
        drv.set_mount("abc", VolumeMount("/x", '/var/lib/mysql"; rm -rf /'))
    assert exc.value.violations[0][0] == "datadir"
    assert "rm -rf" not in script.read_text()
    drv.destroy("abc")
    assert not script.exists()


def test_parses_the_documented_user_beancounters_sample():
    rows = parse_beancounters((DATA / "user_beancounters.txt").read_text())
    assert list(rows) == [123]
    ct = rows[123]
    assert "dummy" not in ct and len(ct) == 20
    assert (ct["numproc"].held, ct["numproc"].maxheld, ct["numproc"].barrier, ct["numproc"].limit) == (20, 26, 65, 65)
    assert ct["privvmpages"].limit == 53575 and ct["numiptent"].maxheld == 16


def test_usage_reports_beancounters_in_bytes_and_counts(vz):
    _, drv, tmp = vz
    drv.create(spec())
    ct = ctid_for("rdt-abc")
    sample = (DATA / "user_beancounters.txt").read_text().replace("123:", f"{ct}:")
    sample = sample.replace("numproc              20         26         65         65          0",
                            "numproc              20         65         65         65          7")
    (tmp / "ubc").write_text(sample)
    usage = drv.usage("abc", LIMITS)
    mem, nproc = usage.counter("memory"), usage.counter("numproc")
    assert (mem.held, mem.maxheld) == (2267 * 4096, 2399 * 4096)
    assert mem.limit == 2147483647  # "unlimited" is not scaled
    assert (nproc.held, nproc.limit, nproc.failcnt) == (20, 65, 7)


def test_parses_vzlist_json_and_lists_only_our_prefix(vz):
    entries = parse_vzlist_json((DATA / "vzlist.json").read_text())
    assert [(e.ctid, e.name, e.status, e.ips) for e in entries] == [
        (123, "", "running", ("10.0.0.123",)), (40511, "rdt-abc", "stopped", ())]
    assert entries[0].ubc["numproc"]["barrier"] == 65
    fake, drv, _ = vz
    fake.cts = {e["ctid"]: e for e in json.loads((DATA / "vzlist.json").read_text())}
    assert drv.list_names() == ["abc"]
