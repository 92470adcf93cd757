"""Limits onto cgroup control files: IO caps go on every disk a container writes to (its volume and the disk
under its root filesystem), on v1 and v2 alike; a cleared cap is written so that it undoes an earlier one."""
from __future__ import annotations

import os

from reddwarf.hostd.cgroups import CgroupLayout, cgroup_values, disk_of
from reddwarf.hostd.containers import Limits

CAPPED = Limits(memory_mb=256, cpu_shares=256, max_processes=64, io_iops=2000, io_bytes_per_sec=64 << 20)


def test_v1_throttles_every_device_and_zero_clears():
    values = cgroup_values(CgroupLayout("v1", root="/nonexistent"), CAPPED, "7:3,254:0")
    bps = [v for k, v in values if k == "blkio.throttle.write_bps_device"]
    assert bps == ["7:3 67108864", "254:0 67108864"]
    assert [v for k, v in values if k == "blkio.throttle.read_iops_device"] == ["7:3 2000", "254:0 2000"]
    cleared = cgroup_values(CgroupLayout("v1", root="/nonexistent"), Limits(memory_mb=256, cpu_shares=256, max_processes=64), "7:3")
    assert ("blkio.throttle.write_bps_device", "7:3 0") in cleared
    assert not [k for k, _ in cgroup_values(CgroupLayout("v1", root="/nonexistent"), CAPPED, "") if "throttle" in k]


def test_v2_io_max_per_device():
    values = [v for k, v in cgroup_values(CgroupLayout("v2", root="/nonexistent"), CAPPED, "7:3,254:0")
              if k == "io.max"]
    assert values == ["7:3 riops=2000 wiops=2000 rbps=67108864 wbps=67108864",
                      "254:0 riops=2000 wiops=2000 rbps=67108864 wbps=67108864"]
    assert "8:0 riops=max wiops=max rbps=max wbps=max" in [
        v for k, v in cgroup_values(CgroupLayout("v2", root="/nonexistent"), Limits(memory_mb=256, cpu_shares=256, max_processes=64), "8:0")]


def test_disk_of_finds_the_whole_disk_or_nothing():
    dev = disk_of("/")
    assert dev and os.path.isdir(f"/sys/dev/block/{dev}")
    assert not os.path.exists(f"/sys/dev/block/{dev}/partition")  # a whole disk, not a partition
    assert disk_of("/proc") == ""  # not on a block device


def test_limits_for_an_init_in_the_root_cgroup_or_gone_are_unavailable_and_write_nothing(tmp_path):
    """A container's init that just died shows the root cgroup (or no /proc entry): hostd must not write the
    host's own limit files, and answers UNAVAILABLE so the resize step retries once the container is back."""
    import subprocess

    import pytest

    from reddwarf.common.errors import Unavailable
    from reddwarf.hostd import cgroups

    for c in ("memory", "pids", "blkio", "cpu", "cpuacct"):
        (tmp_path / c).mkdir()
    layout = cgroups.CgroupLayout("v1", str(tmp_path))
    limits = Limits(memory_mb=256, cpu_shares=256, max_processes=100)
    # This process sits in the root cgroup of every controller here (as an exiting init does).
    root_pid = os.getpid() if all(line.rstrip().endswith(":/") for line in open("/proc/self/cgroup")) else None
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid in [p for p in (root_pid, gone.pid) if p is not None]:
        with pytest.raises(Unavailable):
            cgroups.apply_live(layout, pid, limits)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
