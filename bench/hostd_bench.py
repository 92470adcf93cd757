"""hostd overhead: a container created and started from the template, and a volume created and attached,
through a real reddwarf-hostd process over mTLS gRPC — next to the raw tools doing the same work in the
same run (lxc-copy + lxc-start; truncate + mkfs.ext4 + loop mount).

    python -m bench.hostd_bench [rounds]

Prints a markdown section. Needs root; uses its own lxcpath, storage dir, CA and a free port, and removes
everything it made.
"""
from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

from reddwarf.common import tls
from reddwarf.common.pki import CertificateAuthority
from reddwarf.hostd import template
from reddwarf.hostd.settings import Settings
from reddwarf.v1 import common_pb2, host_pb2, host_pb2_grpc

SLEEPER = "/bin/sleep 3600"  # PID 1 stand-in on both sides: this measures the host, not the guest agent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(argv), capture_output=True, check=check, timeout=300)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Hostd:
    def __init__(self, root: str) -> None:
        self.root = root
        ca = CertificateAuthority.init(os.path.join(root, "pki"))
        host_files = ca.write_identity(os.path.join(root, "host"), "host", "host", "bench")
        self.client_files = ca.write_identity(os.path.join(root, "client"), "server", "server", "bench")
        self.prefix = f"rdb{uuid.uuid4().hex[:4]}-"
        self.lxc_path = os.path.join(root, "lxc")
        self.address = f"127.0.0.1:{free_port()}"
        ports = free_port()
        self.log_path = os.path.join(root, "hostd.log")
        args = [sys.executable, "-m", "reddwarf.hostd.main", "serve", "--host-id", "bench",
                "--listen-address", self.address, "--state-dir", os.path.join(root, "state"),
                "--lxc-path", self.lxc_path, "--storage-path", os.path.join(root, "volumes"),
                "--cert-path", str(host_files.cert), "--key-path", str(host_files.key),
                "--ca-path", str(host_files.ca), "--container-prefix", self.prefix,
                "--port-min", str(ports), "--port-max", str(ports + 200), "--agent-init-cmd", SLEEPER,
                "--crl-path", str(ca.dir / "crl.pem")]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 1200  # first start on a machine builds the template
        while "reddwarf-hostd ready" not in open(self.log_path, errors="replace").read():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("hostd did not start:\n" + open(self.log_path).read()[-3000:])
            time.sleep(0.2)
        self.channel = tls.sync_channel(self.address, self.client_files, tls.host_peer("bench"))
        self.stub = host_pb2_grpc.HostAgentStub(self.channel)

    def create_start(self, cid: str, ca_pem: str = "") -> None:
        spec = host_pb2.Container(
            id=cid, limits=common_pb2.Limits(memory_mb=256, cpu_shares=1024, max_processes=256),
            bootstrap=host_pb2.AgentBootstrap(server_address="127.0.0.1:1", ca_pem=ca_pem or "x",
                                              enrollment_token="bench", instance_id=cid),
            network_mode=host_pb2.NETWORK_MODE_HOST)
        self.stub.CreateContainer(host_pb2.CreateContainerRequest(container=spec), timeout=300)
        self.stub.StartContainer(host_pb2.ContainerRef(id=cid), timeout=300)

    def create_container(self, cid: str) -> None:
        spec = host_pb2.Container(
            id=cid, limits=common_pb2.Limits(memory_mb=256, cpu_shares=1024, max_processes=256),
            bootstrap=host_pb2.AgentBootstrap(server_address="127.0.0.1:1", ca_pem="x",
                                              enrollment_token="bench", instance_id=cid),
            network_mode=host_pb2.NETWORK_MODE_HOST)
        self.stub.CreateContainer(host_pb2.CreateContainerRequest(container=spec), timeout=300)

    def volume_attach(self, vid: str, cid: str) -> None:
        self.stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=vid, size_gb=1)),
                               timeout=300)
        self.stub.AttachVolume(host_pb2.AttachVolumeRequest(id=vid, container_id=cid), timeout=300)

    def delete(self, cid: str, vid: str | None) -> None:
        self.stub.DeleteContainer(host_pb2.ContainerRef(id=cid), timeout=300)
        if vid:
            self.stub.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid), timeout=300)

    def close(self) -> None:
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def raw_container(tpl_path: str, tpl: str, lxc_path: str, name: str) -> None:
    sh("lxc-copy", "-P", tpl_path, "-n", tpl, "-p", lxc_path, "-N", name, "-s", "-B", "overlayfs")
    with open(os.path.join(lxc_path, name, "config"), "a") as f:
        f.write(f"lxc.net.0.type = none\nlxc.apparmor.profile = unconfined\nlxc.init.cmd = {SLEEPER}\n")
    sh("lxc-start", "-P", lxc_path, "-n", name)
    sh("lxc-wait", "-P", lxc_path, "-n", name, "-s", "RUNNING", "-t", "10")


def raw_destroy(lxc_path: str, name: str) -> None:
    sh("lxc-stop", "-P", lxc_path, "-n", name, "-k", check=False)
    sh("lxc-destroy", "-P", lxc_path, "-n", name, "-f", check=False)


def raw_volume(root: str, vid: str) -> str:
    img, mnt = os.path.join(root, f"{vid}.img"), os.path.join(root, f"{vid}.mnt")
    sh("truncate", "-s", "1G", img)
    sh("mkfs.ext4", "-q", "-F", img)
    os.makedirs(mnt, exist_ok=True)
    sh("mount", "-o", "loop", img, mnt)
    return mnt


def raw_volume_delete(root: str, vid: str) -> None:
    img, mnt = os.path.join(root, f"{vid}.img"), os.path.join(root, f"{vid}.mnt")
    sh("umount", "-d", mnt, check=False)
    shutil.rmtree(mnt, ignore_errors=True)
    if os.path.exists(img):
        os.unlink(img)


def main() -> int:
    if os.geteuid() != 0:
        print("## containers and volumes: hostd vs raw tools\n\nSkipped: needs root (LXC, loop devices).")
        return 0
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    settings = Settings()
    tpl = template.build_template(settings)  # cached by recipe hash: both sides start from the same one
    root = tempfile.mkdtemp(prefix="rdbench-hostd-", dir="/var/tmp")
    raw_lxc = os.path.join(root, "raw-lxc")
    os.makedirs(raw_lxc)
    results: dict[str, list[float]] = {k: [] for k in ("hostd_ct", "raw_ct", "hostd_vol", "raw_vol")}
    hostd = Hostd(root)
    try:
        for i in range(rounds):
            cid = f"b{uuid.uuid4().hex[:8]}"
            results["hostd_ct"].append(timed(lambda: hostd.create_start(cid)))  # noqa: B023
            hostd.delete(cid, None)
            name = f"rdbraw{uuid.uuid4().hex[:6]}"
            try:
                results["raw_ct"].append(timed(lambda: raw_container(settings.template_lxc_path, tpl,  # noqa: B023
                                                                     raw_lxc, name)))  # noqa: B023
            finally:
                raw_destroy(raw_lxc, name)
            cid, vid = f"b{uuid.uuid4().hex[:8]}", f"v{i}{uuid.uuid4().hex[:6]}"
            hostd.create_container(cid)
            try:
                results["hostd_vol"].append(timed(lambda: hostd.volume_attach(vid, cid)))  # noqa: B023
            finally:
                hostd.delete(cid, vid)
            try:
                results["raw_vol"].append(timed(lambda: raw_volume(root, vid)))  # noqa: B023
            finally:
                raw_volume_delete(root, vid)
    finally:
        hostd.close()
        subprocess.run(["umount", "-R", "-l", os.path.join(root, "state")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    def med(k: str) -> float:
        return statistics.median(results[k])

    print("## containers and volumes: hostd vs raw lxc-copy/lxc-start and truncate/mkfs/mount\n")
    print(f"Median of {rounds} rounds, seconds. hostd: a real `reddwarf-hostd` over mTLS gRPC "
          "(validation, state file, port allocation, FirstBoot incl. copying the agent code, cgroup limits). "
          "Raw: the same tools by hand with no bookkeeping.\n")
    print("| operation | hostd (s) | raw (s) | overhead |")
    print("|---|---:|---:|---:|")
    for label, ours, raw, what in (
            ("container create + start from template", "hostd_ct", "raw_ct", "lxc-copy -s + lxc-start"),
            ("1 GiB volume create + attach", "hostd_vol", "raw_vol", "truncate + mkfs.ext4 + mount -o loop")):
        print(f"| {label} (raw: {what}) | {med(ours):.2f} | {med(raw):.2f} | {med(ours) / med(raw):.2f}x |")
    print("\nTarget: hostd within 2x of the raw tools (its extra work is bookkeeping, not I/O).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
