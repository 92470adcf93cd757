"""`make demo`: a whole Red Dwarf on this machine, on the embedded defaults, and a working MySQL instance.

    python -m reddwarf.client.demo up      # server + local hostd + tenant "demo" + instance "demo-db"
    python -m reddwarf.client.demo down    # deletes the instances, stops both daemons, removes the state

State lives in /var/lib/reddwarf/demo (override with REDDWARF_DEMO_DIR). Everything started is recorded
with pid files, so `down` stops exactly what `up` started.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pymysql

from reddwarf.client.daemons import Daemons, say
from reddwarf.common import states
from reddwarf.common.pki import CertificateAuthority, TlsFiles
from reddwarf.common.tls import sync_channel
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, common_pb2, database_pb2, database_pb2_grpc

ROOT = Path(os.environ.get("REDDWARF_DEMO_DIR", "/var/lib/reddwarf/demo"))
PROCS = Daemons(ROOT, "demo")
spawn, wait_for, _alive, _stop = PROCS.spawn, PROCS.wait_for, PROCS.alive, PROCS.stop
API, AGENT, ENROLL, HOSTD = "127.0.0.1:8779", "127.0.0.1:8780", "127.0.0.1:8781", "127.0.0.1:8782"
GATEWAY = "127.0.0.1:8778"
HOST_ID = "local"
TENANT = "demo"
DB_USER, DB_PASSWORD, DB_NAME = "demo", "demo-password-123", "demo"
# The demo's create carries a fixed request id (a UUID, as the server requires): a re-run never makes two.
DEMO_REQUEST_ID = "de770000-0000-4000-8000-00000000de70"


def server_env() -> dict[str, str]:
    return {"REDDWARF_STATE_DIR": str(ROOT / "server"), "REDDWARF_API_LISTEN": API,
            "REDDWARF_AGENT_LISTEN": AGENT, "REDDWARF_ENROLL_LISTEN": ENROLL}


def up() -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(ROOT, 0o700)
    py = sys.executable
    if not (ROOT / "server" / "admin.token").exists():
        say("initialising the control server (CA, state database, catalog, admin)")
        res = subprocess.run([py, "-m", "reddwarf.server.main", "init"], env={**os.environ, **server_env()},
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"demo: reddwarf-server init failed:\n{res.stdout}{res.stderr}")
    admin_files = TlsFiles(ROOT / "server/admin/admin.pem", ROOT / "server/admin/admin.key",
                           ROOT / "server/admin/ca.pem")
    ca = CertificateAuthority.load(ROOT / "server/pki")
    host_tls = ROOT / "hostd-tls"
    # Issued, or re-issued when due or from before certificates named roles; hostd serves the new one.
    ca.renew_identity(TlsFiles(host_tls / "host.pem", host_tls / "host.key", host_tls / "ca.pem"), "host", HOST_ID)
    if not _alive("server"):
        say(f"starting reddwarf-server on {API}")
        spawn("server", [py, "-m", "reddwarf.server.main", "serve"], server_env())
    if not _alive("hostd"):
        say(f"starting reddwarf-hostd on {HOSTD} (the first start builds the instance template: a few minutes)")
        spawn("hostd", [py, "-m", "reddwarf.hostd.main", "serve", "--host-id", HOST_ID, "--listen-address", HOSTD,
                        "--state-dir", str(ROOT / "hostd"), "--lxc-path", str(ROOT / "lxc"),
                        "--storage-path", str(ROOT / "volumes"), "--cert-path", str(host_tls / "host.pem"),
                        "--key-path", str(host_tls / "host.key"), "--ca-path", str(host_tls / "ca.pem"),
                        "--crl-path", str(ROOT / "server/pki/crl.pem")])
    if not _alive("gateway"):
        g = ROOT / "server/admin"
        say(f"starting reddwarf-gateway (Trove v1.0 REST) on {GATEWAY}")
        spawn("gateway", [py, "-m", "reddwarf.client.gateway", "--listen", GATEWAY, "--api", API,
                          "--cert", str(g / "gateway.pem"), "--key", str(g / "gateway.key"), "--ca", str(g / "ca.pem")])
    channel = sync_channel(API, admin_files)
    admin = admin_pb2_grpc.AdminStub(channel)
    wait_for("the server", lambda: admin.ListHosts(admin_pb2.ListHostsRequest(), timeout=2) is not None, 60)
    wait_for("hostd", lambda: "reddwarf-hostd ready" in (ROOT / "hostd.log").read_text(errors="replace"))
    admin.RegisterHost(admin_pb2.RegisterHostRequest(host=admin_pb2.Host(id=HOST_ID, address=HOSTD)))
    token_file = ROOT / "demo.token"
    try:
        admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=TENANT, display_name="demo")))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
    if not token_file.exists():
        tok = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{TENANT}", description="make demo"))
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tok.secret)
    token = token_file.read_text().strip()
    md = (("authorization", f"Bearer {token}"),)
    client_files = TlsFiles(ROOT / "server/admin/client.pem", ROOT / "server/admin/client.key",
                            ROOT / "server/admin/ca.pem")
    tenant_channel = sync_channel(API, client_files)
    instances = database_pb2_grpc.InstancesStub(tenant_channel)
    existing = [i for i in instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances
                if i.display_name == "demo-db"]
    if existing:
        inst = existing[0]
    else:
        say("creating instance demo-db (flavor small, 2 GB volume, database demo, user demo)")
        inst = instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="demo-db", flavor="small", volume=database_pb2.Volume(size_gb=2)),
            databases=[common_pb2.Database(database=DB_NAME)],
            users=[common_pb2.User(user=DB_USER, password=DB_PASSWORD, databases=[DB_NAME])],
            request_id=DEMO_REQUEST_ID), metadata=md)
    started = time.monotonic()
    last = ""
    while True:
        inst = instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=md)
        status = states.from_pb(states.InstanceStatus, inst.status)
        line = f"{status} {inst.task_step}".strip()
        if line != last:
            say(f"  {time.monotonic() - started:5.1f}s  {line}")
            last = line
        if status == "ACTIVE":
            break
        if status == "ERROR":
            raise SystemExit(f"demo: instance failed: {inst.fault.message}")
        if time.monotonic() - started > 900:
            raise SystemExit("demo: instance did not become ACTIVE in 15 minutes")
        time.sleep(0.3)
    ep = inst.endpoints[0]
    with pymysql.connect(host=ep.host, port=ep.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME) as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        row = cur.fetchone()
        assert row is not None  # SELECT VERSION() always returns a row
        version = row[0]
    say(f"instance {inst.id} is ACTIVE and answers: MariaDB {version}")
    openrc = ROOT / "demo-openrc.sh"
    openrc.write_text("\n".join([
        "# source me: the demo tenant's credentials for the reddwarf CLI, the SDK and python-troveclient",
        f"export REDDWARF_ENDPOINT={API}",
        f"export REDDWARF_CA={client_files.ca}",
        f"export REDDWARF_CERT={client_files.cert}",
        f"export REDDWARF_KEY={client_files.key}",
        f"export REDDWARF_TOKEN={token}",
        f"export REDDWARF_TENANT={TENANT}",
        f"export OS_AUTH_TOKEN={token}",
        f"export TROVE_URL=http://{GATEWAY}/v1.0/{TENANT}",
        f"export REDDWARF_DEMO_DB_PASSWORD={shlex.quote(DB_PASSWORD)}",
        ""]))
    os.chmod(openrc, 0o600)
    print(f"""
Red Dwarf is up.
  connect:   . {openrc}; mariadb -h {ep.host} -P {ep.port} -u {DB_USER} -p"$REDDWARF_DEMO_DB_PASSWORD" {DB_NAME}
  gRPC API:  {API} (mTLS; credentials in {openrc})
  CLI:       . {openrc}; .venv/bin/reddwarf instance list
  REST:      curl -H "X-Auth-Token: $REDDWARF_TOKEN" http://{GATEWAY}/v1.0/{TENANT}/instances
  admin:     grpcurl -cacert {admin_files.ca} -cert {admin_files.cert} -key {admin_files.key} -authority server.reddwarf {API} list
  logs:      {ROOT}/server.log, {ROOT}/hostd.log
  stop:      make demo-stop
""")
    return 0


def down() -> int:
    if not ROOT.exists():
        say("nothing to stop")
        return 0
    token_file = ROOT / "demo.token"
    if _alive("server") and _alive("hostd") and token_file.exists():
        files = TlsFiles(ROOT / "server/admin/client.pem", ROOT / "server/admin/client.key",
                         ROOT / "server/admin/ca.pem")
        md = (("authorization", f"Bearer {token_file.read_text().strip()}"),)
        stub = database_pb2_grpc.InstancesStub(sync_channel(API, files))
        for inst in stub.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances:
            say(f"deleting instance {inst.display_name} ({inst.id})")
            try:
                stub.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=md)
            except grpc.RpcError as exc:
                say(f"  {exc.code().name}: {exc.details()}")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and stub.ListInstances(database_pb2.ListInstancesRequest(),
                                                                 metadata=md).instances:
            time.sleep(0.5)
    for name in ("gateway", "server", "hostd"):
        _stop(name)
    # Whatever a crashed run left: containers in the demo's lxcpath, volume mounts, loop devices.
    lxc = ROOT / "lxc"
    if lxc.exists():
        for cfg in lxc.glob("*/config"):
            subprocess.run(["lxc-stop", "-P", str(lxc), "-n", cfg.parent.name, "-k"], capture_output=True, check=False)
            subprocess.run(["lxc-destroy", "-P", str(lxc), "-n", cfg.parent.name, "-f"], capture_output=True,
                           check=False)
    with open("/proc/mounts") as f:
        mounts = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(ROOT))]
    for m in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if str(ROOT) in line:
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True, check=False)
    shutil.rmtree(ROOT, ignore_errors=True)
    say("demo stopped and removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddwarf-demo")
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    return up() if args.command == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
