"""`make demo-fleet`: a small Red Dwarf fleet on this machine, and a MySQL instance whose data is on the SAN.

    python -m reddwarf.client.demo_fleet up     # bridge + 3 namespaces, server, 2 compute hostd, 1 SAN hostd
    python -m reddwarf.client.demo_fleet down   # deletes the instance, stops everything, removes every trace

Each host is its own network namespace with one veth on a bridge the demo creates: compute hosts "h-a" and
"h-b" (hostd with the iscsi volume driver and the user-space initiator, qemu-storage-daemon; containers in host
network mode, so MariaDB answers on its host's address) and the SAN node "h-san" (hostd in storage mode, with
its own tgtd). The server runs on the machine and reaches the hosts over the bridge; the hosts' agents reach it
on the bridge's address. Processes enter only the network namespace (nsenter --net), so their mounts and files
are the machine's and `down` can clean them from here.

State lives in /var/lib/reddwarf/demo-fleet (override with REDDWARF_DEMO_FLEET_DIR; keep it short: the
initiator's QMP socket path under it has a 108-byte limit). `up` records the bridge, namespaces and pids in
that directory, so `down` removes exactly what `up` made, also after a failed or half-finished `up`.
This is separate from `make demo` (one host, loop volumes), which stays the default.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pymysql

from reddwarf.client.daemons import Daemons, say
from reddwarf.common import states
from reddwarf.common.pki import TlsFiles
from reddwarf.common.tls import sync_channel
from reddwarf.hostd import qsd
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, common_pb2, database_pb2, database_pb2_grpc

ROOT = Path(os.environ.get("REDDWARF_DEMO_FLEET_DIR", "/var/lib/reddwarf/demo-fleet"))
PROCS = Daemons(ROOT, "demo-fleet", "make demo-fleet-stop")
spawn, wait_for, pid_of, alive, stop = PROCS.spawn, PROCS.wait_for, PROCS.pid, PROCS.alive, PROCS.stop
# Beside `make demo`'s 8778-8782, so both can run at once (REDDWARF_DEMO_FLEET_PORT moves all four).
_BASE = int(os.environ.get("REDDWARF_DEMO_FLEET_PORT", "8783"))
API_PORT, AGENT_PORT, ENROLL_PORT, HOSTD_PORT = _BASE, _BASE + 1, _BASE + 2, _BASE + 3
TENANT = "fleetdemo"
DB_USER, DB_PASSWORD, DB_NAME = "demo", "demo-password-123", "demo"
COMPUTES = ("a", "b")
SAN = "san"
ISCSI_PORT = 3260


@dataclass(frozen=True)
class Net:
    """What `up` made on the machine, written to net.json before it is made (so `down` finds a half-made one)."""

    bridge: str
    subnet: str
    namespaces: dict[str, str]  # key ("a", "b", "san") -> namespace name
    control_port: int  # the SAN tgtd's management port

    @property
    def addresses(self) -> dict[str, str]:
        hosts = list(ipaddress.ip_network(self.subnet).hosts())
        return {"gw": str(hosts[0]), **{k: str(hosts[i]) for i, k in enumerate(self.namespaces, start=1)}}

    def argv(self, key: str, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.namespaces[key]}", "--", *argv]


def ip(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def veth(net: Net, key: str) -> str:
    return f"{net.bridge}{key}"[:15]


def free_subnet() -> str:
    """A /24 in 10.208.0.0/13 that no interface on the machine uses."""
    used = ip(["-4", "-o", "addr"], check=False).stdout
    for _ in range(200):
        net = f"10.{208 + random.randrange(8)}.{random.randrange(256)}"
        if f" {net}." not in used:
            return f"{net}.0/24"
    raise SystemExit("demo-fleet: no free /24 in 10.208.0.0/13")


def net_file() -> Path:
    return ROOT / "net.json"


def load_net() -> Net | None:
    try:
        d = json.loads(net_file().read_text())
    except (OSError, ValueError):
        return None
    return Net(d["bridge"], d["subnet"], d["namespaces"], d["control_port"])


def make_net() -> Net:
    tag = f"{random.randrange(16**4):04x}"
    net = Net(bridge=f"rdfd{tag}", subnet=free_subnet(),
              namespaces={k: f"rdfd{tag}{k}" for k in (SAN, *COMPUTES)}, control_port=10000 + random.randrange(9999))
    net_file().write_text(json.dumps({"bridge": net.bridge, "subnet": net.subnet, "namespaces": net.namespaces,
                                      "control_port": net.control_port}))
    addrs, plen = net.addresses, ipaddress.ip_network(net.subnet).prefixlen
    say(f"network: bridge {net.bridge} {addrs['gw']}/{plen}; "
        + ", ".join(f"{k} {addrs[k]} (netns {ns})" for k, ns in net.namespaces.items()))
    ip(["link", "add", net.bridge, "type", "bridge"])
    ip(["addr", "add", f"{addrs['gw']}/{plen}", "dev", net.bridge])
    ip(["link", "set", net.bridge, "up"])
    for key, ns in net.namespaces.items():
        ip(["netns", "add", ns])
        ip(["link", "add", veth(net, key), "type", "veth", "peer", "name", "eth0", "netns", ns])
        ip(["link", "set", veth(net, key), "master", net.bridge, "up"])
        ip(["-n", ns, "addr", "add", f"{addrs[key]}/{plen}", "dev", "eth0"])
        ip(["-n", ns, "link", "set", "eth0", "up"])
        ip(["-n", ns, "link", "set", "lo", "up"])
    return net


def ready(log: Path, name: str) -> bool:
    if "reddwarf-hostd ready" in log.read_text(errors="replace"):
        return True
    if not alive(name):
        raise SystemExit(f"demo-fleet: {name} exited:\n{log.read_text(errors='replace')[-2000:]}")
    return False


def server_env(net: Net) -> dict[str, str]:
    gw = net.addresses["gw"]
    return {"REDDWARF_STATE_DIR": str(ROOT / "server"), "REDDWARF_API_LISTEN": f"127.0.0.1:{API_PORT}",
            "REDDWARF_AGENT_LISTEN": f"{gw}:{AGENT_PORT}", "REDDWARF_ENROLL_LISTEN": f"{gw}:{ENROLL_PORT}"}


def host_tls(admin: admin_pb2_grpc.AdminStub, host_id: str) -> TlsFiles:
    """A host certificate the server issued and recorded, as enrollment does, so fencing can revoke it."""
    d = ROOT / f"{host_id}-tls"
    files = TlsFiles(d / "host.pem", d / "host.key", d / "ca.pem")
    if files.key.exists():
        return files
    cert = admin.IssueCertificate(admin_pb2.IssueCertificateRequest(role="host", id=host_id, days=30))
    pem = cert.certificate_pem
    cut = pem.index("-----BEGIN", pem.index("-----END CERTIFICATE-----"))
    d.mkdir(parents=True, exist_ok=True)
    files.cert.write_text(pem[:cut])
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pem[cut:])
    files.ca.write_text(cert.ca_pem)
    return files


def hostd_argv(net: Net, key: str, files: TlsFiles) -> list[str]:
    addr = net.addresses[key]
    host_id = f"h-{key}"
    base = [sys.executable, "-m", "reddwarf.hostd.main", "serve", "--host-id", host_id,
            "--listen-address", f"{addr}:{HOSTD_PORT}", "--state-dir", str(ROOT / key / "state"),
            "--lxc-path", str(ROOT / key / "lxc"), "--storage-path", str(ROOT / key / "volumes"),
            "--cert-path", str(files.cert), "--key-path", str(files.key), "--ca-path", str(files.ca),
            "--crl-path", str(ROOT / "server/pki/crl.pem"), "--container-prefix", f"rdfd{key}-",
            "--port-min", "13306", "--port-max", "13506"]
    if key == SAN:
        return net.argv(key, [*base, "--mode", "storage", "--iscsi-portal", f"{addr}:{ISCSI_PORT}",
                              "--iscsi-control-port", str(net.control_port)])
    # Host network mode: a container is its host's processes on its host's address (no per-host NAT bridge).
    return net.argv(key, ["env", "REDDWARF_HOSTD_NETWORK_MODE=host", *base, "--volume-driver", "iscsi",
                          "--iscsi-initiator", "userspace", "--advertise-address", addr])


def cli(args: list[str], files: TlsFiles, token: str = "") -> str:
    env = {**os.environ, "REDDWARF_ENDPOINT": f"127.0.0.1:{API_PORT}", "REDDWARF_CA": str(files.ca),
           "REDDWARF_CERT": str(files.cert), "REDDWARF_KEY": str(files.key), "REDDWARF_CONFIG": "/dev/null/none", "COLUMNS": "150"}
    if token:
        env["REDDWARF_TOKEN"] = token
    res = subprocess.run([sys.executable, "-m", "reddwarf.client.cli", *args], capture_output=True, text=True,
                         env=env, timeout=60, check=False)
    return res.stdout + res.stderr


def up() -> int:
    if os.geteuid() != 0:
        raise SystemExit("demo-fleet: needs root (network namespaces, LXC, tgtd, FUSE and loop devices)")
    for tool in ("tgtd", "nsenter", "lxc-start"):
        if shutil.which(tool) is None:
            raise SystemExit(f"demo-fleet: {tool} is missing; run `make setup`")
    if not qsd.available():
        raise SystemExit("demo-fleet: qemu-storage-daemon with iSCSI (qemu-block-extra) is missing; run `make setup`")
    ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(ROOT, 0o700)
    net = load_net() or make_net()
    addrs = net.addresses
    py = sys.executable
    if not (ROOT / "server" / "admin.token").exists():
        say("initialising the control server (CA, state database, catalog, admin)")
        res = subprocess.run([py, "-m", "reddwarf.server.main", "init"], env={**os.environ, **server_env(net)},
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"demo-fleet: reddwarf-server init failed:\n{res.stdout}{res.stderr}")
    admin_files = TlsFiles(ROOT / "server/admin/admin.pem", ROOT / "server/admin/admin.key",
                           ROOT / "server/admin/ca.pem")
    if not alive("server"):
        say(f"starting reddwarf-server: API 127.0.0.1:{API_PORT}, agents and enrollment on {addrs['gw']}")
        spawn("server", [py, "-m", "reddwarf.server.main", "serve"], server_env(net))
    admin = admin_pb2_grpc.AdminStub(sync_channel(f"127.0.0.1:{API_PORT}", admin_files))
    wait_for("the server", lambda: admin.ListHosts(admin_pb2.ListHostsRequest(), timeout=2) is not None, 60)
    for key in (SAN, *COMPUTES):
        name = f"hostd-{key}"
        if not alive(name):
            what = "storage mode, its own tgtd" if key == SAN else "compute, iscsi volumes, user-space initiator"
            say(f"starting hostd h-{key} in netns {net.namespaces[key]} on {addrs[key]}:{HOSTD_PORT} ({what})")
            spawn(name, hostd_argv(net, key, host_tls(admin, f"h-{key}")))
    for key in (SAN, *COMPUTES):
        log = ROOT / f"hostd-{key}.log"
        # The first hostd start on a machine builds the instance template (shared by all): a few minutes.
        wait_for(f"hostd h-{key}", functools.partial(ready, log, f"hostd-{key}"))
        admin.RegisterHost(admin_pb2.RegisterHostRequest(
            host=admin_pb2.Host(id=f"h-{key}", address=f"{addrs[key]}:{HOSTD_PORT}")))
    try:
        admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=TENANT, display_name=TENANT)))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    token_file = ROOT / "tenant.token"
    if not token_file.exists():
        tok = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{TENANT}", description="demo-fleet"))
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tok.secret)
    token = token_file.read_text().strip()
    md = (("authorization", f"Bearer {token}"),)
    client_files = TlsFiles(ROOT / "server/admin/client.pem", ROOT / "server/admin/client.key",
                            ROOT / "server/admin/ca.pem")
    instances = database_pb2_grpc.InstancesStub(sync_channel(f"127.0.0.1:{API_PORT}", client_files))
    existing = [i for i in instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances
                if i.display_name == "fleet-db"]
    if existing:
        inst = existing[0]
    else:
        say("creating instance fleet-db (flavor tiny, 1 GB volume on the SAN, database demo, user demo)")
        inst = instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="fleet-db", flavor="tiny",
                                           volume=database_pb2.Volume(size_gb=1)),
            databases=[common_pb2.Database(database=DB_NAME)],
            users=[common_pb2.User(user=DB_USER, password=DB_PASSWORD, databases=[DB_NAME])],
            request_id="de770000-0000-4000-8000-0000000f1ee7"), metadata=md)
    started, last = time.monotonic(), ""
    while True:
        inst = instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=md)
        status = states.from_pb(states.InstanceStatus, inst.status)
        line = f"{status} {inst.task_step}".strip()
        if line != last:
            say(f"  {time.monotonic() - started:5.1f}s  {line}")
            last = line
        if status == "ACTIVE" and not inst.task:
            break
        if status == "ERROR":
            raise SystemExit(f"demo-fleet: instance failed: {inst.fault.message}")
        if time.monotonic() - started > 900:
            raise SystemExit("demo-fleet: instance did not become ACTIVE in 15 minutes")
        time.sleep(0.3)
    ep = inst.endpoints[0]
    with pymysql.connect(host=ep.host, port=ep.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME) as conn, \
            conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS hello (id INT PRIMARY KEY, said VARCHAR(64))")
        cur.execute("REPLACE INTO hello VALUES (1, %s)", ("stored on a SAN LUN",))
        conn.commit()
        cur.execute("SELECT VERSION(), (SELECT said FROM hello WHERE id = 1)")
        row = cur.fetchone()
        assert row is not None  # a SELECT without FROM always returns a row
    say(f"instance {inst.id} is ACTIVE on {inst.host.removeprefix('hosts/')} ({ep.host}:{ep.port}) "
        f"and answers: MariaDB {row[0]}, {row[1]!r}")
    print("\n$ reddwarf admin host list\n" + cli(["admin", "host", "list"], admin_files))
    print(f"$ reddwarf admin host show h-{SAN}\n" + cli(["admin", "host", "show", f"h-{SAN}"], admin_files))
    print(f"$ reddwarf instance show {inst.id}\n" + cli(["instance", "show", inst.id], client_files, token))
    openrc = ROOT / "admin-openrc.sh"
    openrc.write_text("\n".join([
        "# source me: the fleet demo's admin credentials for the reddwarf CLI",
        f"export REDDWARF_ENDPOINT=127.0.0.1:{API_PORT}", f"export REDDWARF_CA={admin_files.ca}",
        f"export REDDWARF_CERT={admin_files.cert}", f"export REDDWARF_KEY={admin_files.key}", ""]))
    os.chmod(openrc, 0o600)
    print(f"""Red Dwarf fleet is up.
  hosts:     h-a {addrs['a']}, h-b {addrs['b']} (compute), h-san {addrs[SAN]} (SAN, iSCSI portal :{ISCSI_PORT})
  mysql:     mariadb -h {ep.host} -P {ep.port} -u {DB_USER} -p{DB_PASSWORD} {DB_NAME}
  admin CLI: . {openrc}; .venv/bin/reddwarf admin host list
  migrate:   . {openrc}; .venv/bin/reddwarf admin instance migrate {inst.id}
  logs:      {ROOT}/*.log
  stop:      make demo-fleet-stop
""")
    return 0


def netns_pids(ns: str) -> list[int]:
    """Every process in one of the demo's namespaces (all of them the demo's: it made the namespace)."""
    try:
        ino = os.stat(f"/var/run/netns/{ns}").st_ino
    except OSError:
        return []
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{d}/ns/net").st_ino == ino:
                    pids.append(int(d))
    return pids


def delete_instances() -> None:
    token_file = ROOT / "tenant.token"
    if not (alive("server") and token_file.exists()):
        return
    files = TlsFiles(ROOT / "server/admin/client.pem", ROOT / "server/admin/client.key", ROOT / "server/admin/ca.pem")
    md = (("authorization", f"Bearer {token_file.read_text().strip()}"),)
    stub = database_pb2_grpc.InstancesStub(sync_channel(f"127.0.0.1:{API_PORT}", files))
    try:
        for inst in stub.ListInstances(database_pb2.ListInstancesRequest(), metadata=md, timeout=10).instances:
            say(f"deleting instance {inst.display_name} ({inst.id})")
            with contextlib.suppress(grpc.RpcError):
                stub.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=md, timeout=30)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and stub.ListInstances(database_pb2.ListInstancesRequest(), metadata=md,
                                                                 timeout=10).instances:
            time.sleep(0.5)
    except grpc.RpcError as exc:
        say(f"  could not delete through the API ({exc.code().name}); removing by hand")


def down() -> int:
    if not ROOT.exists():
        say("nothing to stop")
        return 0
    net = load_net()
    delete_instances()
    for name in ("server", *(f"hostd-{k}" for k in (*COMPUTES, SAN))):
        stop(name)
    # Whatever a crashed run or a failed delete left, host by host: initiator sessions (qemu-storage-daemon and
    # its FUSE export), containers, mounts, loop devices, container cgroups.
    for key in COMPUTES:
        run_dir = ROOT / key / "state" / "iscsi"
        if run_dir.is_dir():
            ini = qsd.UserspaceInitiator(str(run_dir))
            for vid in os.listdir(run_dir):
                with contextlib.suppress(Exception):
                    ini.logout(vid)
        lxc = ROOT / key / "lxc"
        for cfg in glob.glob(f"{lxc}/*/config"):
            name = os.path.basename(os.path.dirname(cfg))
            subprocess.run(["lxc-stop", "-P", str(lxc), "-n", name, "-k"], capture_output=True, timeout=60, check=False)
            subprocess.run(["lxc-destroy", "-P", str(lxc), "-n", name, "-f"], capture_output=True, timeout=60,
                           check=False)
            for top in glob.glob(f"/sys/fs/cgroup/*/lxc.*.{glob.escape(name)}"):
                for d, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
                    with contextlib.suppress(OSError):
                        os.rmdir(d)
    if net is not None:
        # The SAN node's tgtd outlives its hostd (by design: a hostd restart keeps the sessions); remove its
        # targets and stop it.
        subprocess.run([sys.executable, "-m", "reddwarf.hostd.main", "stop-target", "--host-id", f"h-{SAN}",
                        "--state-dir", str(ROOT / SAN / "state"), "--iscsi-control-port", str(net.control_port),
                        "--iscsi-portal", f"{net.addresses[SAN]}:{ISCSI_PORT}"],
                       capture_output=True, timeout=60, check=False)
        for ns in net.namespaces.values():
            for pid in netns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    loops = [ln.split(":")[0] for ln in subprocess.run(["losetup", "-a"], capture_output=True, text=True,
                                                       check=False).stdout.splitlines() if str(ROOT) in ln]
    with open("/proc/mounts") as f:
        mounts = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(ROOT))]
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, timeout=30, check=False)
    for dev in loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)
    if net is not None:
        for key, ns in net.namespaces.items():
            ip(["netns", "del", ns], check=False)
            ip(["link", "del", veth(net, key)], check=False)
        ip(["link", "del", net.bridge], check=False)
    shutil.rmtree(ROOT, ignore_errors=True)
    say("demo fleet stopped and removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddwarf-demo-fleet")
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    return up() if args.command == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
