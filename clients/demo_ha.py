"""`make demo-ha`: Red Dwarf with no single control server: three MariaDB Galera nodes (galera-4, mariabackup SST)
as the state DB, SeaweedFS (`weed server -s3`) as the backup store, two reddwarf-servers on both, one hostd and
an instance.

    python -m reddwarf.client.demo_ha up      # everything above, then prints how to reach each part
    python -m reddwarf.client.demo_ha down    # deletes the instance, stops every process, removes the state

State lives in /var/lib/reddwarf/demo-ha (REDDWARF_DEMO_HA_DIR). Ports are free ones picked at `up` and kept in
ports.json; every process is recorded with a pid file, so `down` stops exactly what `up` started. The Galera
and SeaweedFS launches follow tests/fixtures/galera.py and seaweed.py (tests are not imported by the package).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pymysql

from reddwarf.client.daemons import Daemons, say
from reddwarf.common.pki import CertificateAuthority, TlsFiles
from reddwarf.common.tls import sync_channel
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, database_pb2, database_pb2_grpc

ROOT = Path(os.environ.get("REDDWARF_DEMO_HA_DIR", "/var/lib/reddwarf/demo-ha"))
PROCS = Daemons(ROOT, "demo-ha", wait_seconds=300)
spawn, wait_for, alive, stop = PROCS.spawn, PROCS.wait_for, PROCS.alive, PROCS.stop
PROVIDER = "/usr/lib/galera/libgalera_smm.so"
SST_USER, SST_PASSWORD = "reddwarf_sst", "demo-ha-sst"
DB_USER, DB_PASSWORD, DB_NAME = "reddwarf", "demo-ha-state", "reddwarf"
BUCKET = "reddwarf-backups"
HOST_ID = "ha-local"
TENANT = "demo"
REQUEST_ID = "de770000-0000-4000-8000-0000000000a2"  # the instance's create: a re-run never makes two
NODES = 3
WEED_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
PROCESSES = ("gateway", "hostd", "server1", "server0", "weed", *(f"galera{i}" for i in reversed(range(NODES))))


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:  # held open together, so no two are the same
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def ports() -> dict[str, int]:
    path = ROOT / "ports.json"
    if path.exists():
        loaded: dict[str, int] = json.loads(path.read_text())
        return loaded
    names = [*(f"galera{i}" for i in range(NODES)), *(f"gcomm{i}" for i in range(NODES)),
             *(f"ist{i}" for i in range(NODES)), *(f"sst{i}" for i in range(NODES)),
             *(f"weed.{p}" for p in WEED_PORTS), *(f"server{i}.{k}" for i in range(2)
                                                   for k in ("api", "agent", "enroll", "metrics")),
             "hostd", "gateway"]
    chosen = dict(zip(names, free_ports(len(names)), strict=True))
    path.write_text(json.dumps(chosen))
    return chosen


# ---------------------------------------------------------------------------- Galera
def node_dir(i: int) -> Path:
    return ROOT / "galera" / f"node{i}"


def node_sql(i: int, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = pymysql.connect(unix_socket=str(node_dir(i) / "mysqld.sock"), user="root", password="",
                           autocommit=True, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


def synced(i: int) -> bool:
    rows = node_sql(i, "SHOW GLOBAL STATUS LIKE %s", ("wsrep_local_state_comment",))
    return bool(rows) and rows[0][1] == "Synced"


def galera_cnf(i: int, p: dict[str, int]) -> str:
    d = node_dir(i)
    members = ",".join(f"127.0.0.1:{p[f'gcomm{j}']}" for j in range(NODES))
    options = (f"gmcast.listen_addr=tcp://127.0.0.1:{p[f'gcomm{i}']};ist.recv_addr=127.0.0.1:{p[f'ist{i}']};"
               "gcache.size=32M")
    return "\n".join([
        "[mysqld]", f"datadir={d}/data", f"socket={d}/mysqld.sock", f"port={p[f'galera{i}']}",
        "bind-address=127.0.0.1", "user=root", f"pid-file={d}/mysqld.pid", f"log-error={d}/error.log",
        "innodb_buffer_pool_size=64M", "binlog_format=ROW", "default_storage_engine=InnoDB",
        "innodb_autoinc_lock_mode=2", "wsrep_on=ON", f"wsrep_provider={PROVIDER}",
        f"wsrep_cluster_address=gcomm://{members}", "wsrep_cluster_name=reddwarf-demo-ha",
        f"wsrep_node_name=node{i}", f"wsrep_node_address=127.0.0.1:{p[f'gcomm{i}']}",
        f"wsrep_provider_options=\"{options}\"", "wsrep_sst_method=mariabackup",
        f"wsrep_sst_auth={SST_USER}:{SST_PASSWORD}", f"wsrep_sst_receive_address=127.0.0.1:{p[f'sst{i}']}",
        "", "[sst]", f"socket={d}/mysqld.sock", ""])


def start_galera(p: dict[str, int]) -> None:
    if all(alive(f"galera{i}") for i in range(NODES)):
        return
    for i in range(NODES):
        node_dir(i).mkdir(parents=True, exist_ok=True)
        (node_dir(i) / "my.cnf").write_text(galera_cnf(i, p))
    first = node_dir(0)
    if not (first / "data").exists():
        say("initialising Galera node0 (mariadb-install-db)")
        subprocess.run(["mariadb-install-db", f"--defaults-file={first}/my.cnf", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True, timeout=180)
    say(f"starting Galera node0 on 127.0.0.1:{p['galera0']} (bootstraps the cluster)")
    spawn("galera0", ["mariadbd", f"--defaults-file={first}/my.cnf", "--wsrep-new-cluster"], cwd=first)
    wait_for("Galera node0", lambda: synced(0), 180)
    for host in ("localhost", "127.0.0.1"):
        node_sql(0, "CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", (DB_USER, host, DB_PASSWORD))
        node_sql(0, f"GRANT ALL ON *.* TO '{DB_USER}'@'{host}'")  # names are constants of this module
    node_sql(0, "CREATE USER IF NOT EXISTS %s@'localhost' IDENTIFIED BY %s", (SST_USER, SST_PASSWORD))
    node_sql(0, f"GRANT RELOAD, PROCESS, LOCK TABLES, BINLOG MONITOR ON *.* TO '{SST_USER}'@'localhost'")
    node_sql(0, f"CREATE DATABASE IF NOT EXISTS `{DB_NAME}`")
    for i in range(1, NODES):  # one at a time: two SSTs at once would double the load on a small machine
        (node_dir(i) / "data").mkdir(exist_ok=True)
        say(f"starting Galera node{i} on 127.0.0.1:{p[f'galera{i}']} (joins by mariabackup SST)")
        spawn(f"galera{i}", ["mariadbd", f"--defaults-file={node_dir(i)}/my.cnf"], cwd=node_dir(i))
        wait_for(f"Galera node{i}", functools.partial(synced, i), 300)


def db_url(p: dict[str, int]) -> str:
    hosts = ",".join(f"127.0.0.1:{p[f'galera{i}']}" for i in range(NODES))
    return f"mysql+pymysql://{DB_USER}:{DB_PASSWORD}@{hosts}/{DB_NAME}"


# ---------------------------------------------------------------------------- SeaweedFS
def weed_binary() -> str:
    found = Path(sys.executable).parent / "weed"
    return str(found) if found.exists() else (shutil.which("weed") or "weed")


def s3_keys() -> dict[str, str]:
    path = ROOT / "s3-credentials.json"
    if not path.exists():
        import secrets
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"access_key_id": "RD" + secrets.token_hex(8).upper(),
                       "secret_access_key": secrets.token_urlsafe(24)}, f)
    keys: dict[str, str] = json.loads(path.read_text())
    return keys


def start_seaweed(p: dict[str, int]) -> None:
    if alive("weed"):
        return
    keys = s3_keys()
    data = ROOT / "weed"
    data.mkdir(exist_ok=True)
    cfg = ROOT / "weed-s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "reddwarf", "credentials": [{"accessKey": keys["access_key_id"], "secretKey": keys["secret_access_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    os.chmod(cfg, 0o600)
    w = {k: p[f"weed.{k}"] for k in WEED_PORTS}
    say(f"starting SeaweedFS (weed server -s3) with S3 on 127.0.0.1:{w['s3']}")
    spawn("weed", [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-master.port={w['master']}", f"-master.port.grpc={w['master.grpc']}",
                   f"-volume.port={w['volume']}", f"-volume.port.grpc={w['volume.grpc']}",
                   "-filer", f"-filer.port={w['filer']}", f"-filer.port.grpc={w['filer.grpc']}",
                   "-s3", f"-s3.port={w['s3']}", f"-s3.port.grpc={w['s3.grpc']}", f"-s3.config={cfg}",
                   "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                   "-master.volumeSizeLimitMB=64", "-volume.max=100",
                   f"-filer.localSocket={ROOT / 'filer.sock'}", f"-s3.localSocket={ROOT / 's3.sock'}"])
    import boto3
    from botocore.config import Config
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{w['s3']}", region_name="us-east-1",
                          aws_access_key_id=keys["access_key_id"], aws_secret_access_key=keys["secret_access_key"],
                          config=Config(s3={"addressing_style": "path"}, connect_timeout=2, read_timeout=10,
                                        retries={"max_attempts": 1}))

    def bucket_ready() -> bool:
        try:
            client.head_bucket(Bucket=BUCKET)
        except Exception:  # noqa: BLE001 - not there yet, or weed still starting: make it and look again
            client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="ready-probe", Body=b"ok")
        client.delete_object(Bucket=BUCKET, Key="ready-probe")
        return True

    def probe() -> bool:
        try:
            return bucket_ready()
        except Exception:  # noqa: BLE001 - botocore's errors while weed allocates its first volume
            return False
    wait_for("SeaweedFS", probe, 120)


# ---------------------------------------------------------------------------- the servers, hostd, instance
def server_env(p: dict[str, int], i: int) -> dict[str, str]:
    return {"REDDWARF_STATE_DIR": str(ROOT / "server"), "REDDWARF_DB_URL": db_url(p),
            "REDDWARF_API_LISTEN": f"127.0.0.1:{p[f'server{i}.api']}",
            "REDDWARF_AGENT_LISTEN": f"127.0.0.1:{p[f'server{i}.agent']}",
            "REDDWARF_ENROLL_LISTEN": f"127.0.0.1:{p[f'server{i}.enroll']}",
            "REDDWARF_METRICS_LISTEN": f"127.0.0.1:{p[f'server{i}.metrics']}",
            "REDDWARF_BACKUP_STORE": "s3", "REDDWARF_S3_ENDPOINT": f"http://127.0.0.1:{p['weed.s3']}",
            "REDDWARF_S3_BUCKET": BUCKET, "REDDWARF_S3_CREDENTIALS_FILE": str(ROOT / "s3-credentials.json")}


def answers(stub: admin_pb2_grpc.AdminStub) -> bool:
    return stub.ListHosts(admin_pb2.ListHostsRequest(), timeout=2) is not None


def apis(p: dict[str, int]) -> str:
    return ",".join(f"127.0.0.1:{p[f'server{i}.api']}" for i in range(2))


def up() -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    os.chmod(ROOT, 0o700)
    p = ports()
    start_galera(p)
    start_seaweed(p)
    py = sys.executable
    if not (ROOT / "server" / "admin.token").exists():
        say("initialising the control servers' state on Galera (CA, schema, catalog, admin)")
        res = subprocess.run([py, "-m", "reddwarf.server.main", "init"], env={**os.environ, **server_env(p, 0)},
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"demo-ha: reddwarf-server init failed:\n{res.stdout}{res.stderr}")
    admin_dir = ROOT / "server" / "admin"
    admin_files = TlsFiles(admin_dir / "admin.pem", admin_dir / "admin.key", admin_dir / "ca.pem")
    client_files = TlsFiles(admin_dir / "client.pem", admin_dir / "client.key", admin_dir / "ca.pem")
    for i in range(2):
        if not alive(f"server{i}"):
            say(f"starting reddwarf-server {i} on 127.0.0.1:{p[f'server{i}.api']}")
            spawn(f"server{i}", [py, "-m", "reddwarf.server.main", "serve"], server_env(p, i))
    host_tls = ROOT / "hostd-tls"
    CertificateAuthority.load(ROOT / "server/pki").renew_identity(
        TlsFiles(host_tls / "host.pem", host_tls / "host.key", host_tls / "ca.pem"), "host", HOST_ID)
    hostd = f"127.0.0.1:{p['hostd']}"
    if not alive("hostd"):
        say(f"starting reddwarf-hostd on {hostd}")
        spawn("hostd", [py, "-m", "reddwarf.hostd.main", "serve", "--host-id", HOST_ID, "--listen-address", hostd,
                        "--state-dir", str(ROOT / "hostd"), "--lxc-path", str(ROOT / "lxc"),
                        "--storage-path", str(ROOT / "volumes"), "--cert-path", str(host_tls / "host.pem"),
                        "--key-path", str(host_tls / "host.key"), "--ca-path", str(host_tls / "ca.pem"),
                        "--crl-path", str(ROOT / "server/pki/crl.pem")])
    gateway = f"127.0.0.1:{p['gateway']}"
    if not alive("gateway"):
        say(f"starting reddwarf-gateway on {gateway} over both servers")
        spawn("gateway", [py, "-m", "reddwarf.client.gateway", "--listen", gateway, "--api", apis(p),
                          "--cert", str(admin_dir / "gateway.pem"), "--key", str(admin_dir / "gateway.key"),
                          "--ca", str(admin_dir / "ca.pem")])
    for i in range(2):
        with sync_channel(f"127.0.0.1:{p[f'server{i}.api']}", admin_files) as ch:
            stub = admin_pb2_grpc.AdminStub(ch)
            wait_for(f"reddwarf-server {i}", functools.partial(answers, stub), 120)
    wait_for("hostd", lambda: "reddwarf-hostd ready" in (ROOT / "hostd.log").read_text(errors="replace"), 900)
    with sync_channel(f"127.0.0.1:{p['server0.api']}", admin_files) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        admin.RegisterHost(admin_pb2.RegisterHostRequest(host=admin_pb2.Host(id=HOST_ID, address=hostd)))
        try:
            admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=TENANT)))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        token_file = ROOT / "demo.token"
        if not token_file.exists():
            tok = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{TENANT}", description="demo-ha"))
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tok.secret)
    token = token_file.read_text().strip()
    from reddwarf.client import Client, ClientConfig
    say("creating instance ha-db (flavor tiny, 1 GB) through the SDK over both servers")
    with Client(ClientConfig(endpoint=apis(p), ca=str(client_files.ca), cert=str(client_files.cert),
                             key=str(client_files.key), token=token, timeout=60)) as rd:
        inst = rd.create_instance("ha-db", "tiny", 1, request_id=REQUEST_ID)
        inst = rd.wait_for(inst.id, "ACTIVE", timeout=900)
    openrc = ROOT / "demo-ha-openrc.sh"
    openrc.write_text("\n".join([
        "# source me: the demo tenant's credentials, both servers as endpoints", f"export REDDWARF_ENDPOINT={apis(p)}",
        f"export REDDWARF_CA={client_files.ca}", f"export REDDWARF_CERT={client_files.cert}",
        f"export REDDWARF_KEY={client_files.key}", f"export REDDWARF_TOKEN={token}", ""]))
    os.chmod(openrc, 0o600)
    ep = inst.endpoints[0] if inst.endpoints else None
    galera = "\n".join(f"  Galera node{i}: 127.0.0.1:{p[f'galera{i}']}; as root: mariadb -S {node_dir(i)}/mysqld.sock "
                       f"{DB_NAME}" for i in range(NODES))
    print(f"""
Red Dwarf HA is up.
  servers:   {apis(p)} (gRPC, mTLS; . {openrc}; .venv/bin/reddwarf instance list)
  REST:      curl -H "X-Auth-Token: $REDDWARF_TOKEN" http://{gateway}/v1.0/{TENANT}/instances
{galera}
  SeaweedFS: S3 http://127.0.0.1:{p['weed.s3']} bucket {BUCKET} (keys in {ROOT}/s3-credentials.json), master
             http://127.0.0.1:{p['weed.master']}
  hostd:     {hostd}
  instance:  ha-db {inst.id} {'at ' + ep.host + ':' + str(ep.port) if ep else ''}
  logs:      {ROOT}/*.log
  stop:      make demo-ha-stop
""")
    return 0


def down() -> int:
    if not ROOT.exists():
        say("nothing to stop")
        return 0
    p = ports()
    token_file = ROOT / "demo.token"
    if token_file.exists() and alive("hostd") and any(alive(f"server{i}") for i in range(2)):
        admin = ROOT / "server" / "admin"
        files = TlsFiles(admin / "client.pem", admin / "client.key", admin / "ca.pem")
        md = (("authorization", f"Bearer {token_file.read_text().strip()}"),)
        live = next(i for i in range(2) if alive(f"server{i}"))
        with sync_channel(f"127.0.0.1:{p[f'server{live}.api']}", files) as ch:
            stub = database_pb2_grpc.InstancesStub(ch)
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
    for name in PROCESSES:
        stop(name)
    # What a crashed run may have left: containers in the demo's lxcpath, mounts, loop devices, weed's sockets.
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
    for port in (p[f"weed.{k}"] for k in WEED_PORTS):
        for kind in ("master", "volume", "filer", "s3"):
            Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)
    shutil.rmtree(ROOT, ignore_errors=True)
    say("demo-ha stopped and removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddwarf-demo-ha")
    parser.add_argument("command", choices=["up", "down"])
    args = parser.parse_args(argv)
    return up() if args.command == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
