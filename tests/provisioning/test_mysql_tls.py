"""Client TLS to an instance's MySQL, end to end through the real system (server, hostd, an LXC container
with the guest agent and MariaDB): an instance created with require_secure_transport and
access.allowed_cidrs serves TLS with a certificate from the tenant-facing MySQL CA that a real client
verifies (CA from GetInstanceCa, the instance's address as the name); a plain connection is refused; its
user exists only at the allowed networks; a bad CIDR is refused naming its field."""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time

import grpc
import pymysql
import pytest
from cryptography import x509

from reddwarf.v1 import common_pb2, database_pb2
from tests.fixtures.cluster import start_cluster
from tests.fixtures.errors import field_violations as fields
from tests.provisioning.test_e2e import create, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]

# The client reaches a host-mode instance from 127.0.0.1, a bridged one from the bridge's private network.
ALLOWED = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("mysqltls")) as c:
        yield c


def test_a_bad_cidr_is_refused_naming_its_field(cluster) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        create(cluster, "bad-cidr", access=database_pb2.InstanceAccess(allowed_cidrs=["10.0.0.0/8", "10.0.0.1/24"]))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "access.allowed_cidrs[1]" in fields(exc.value)


def test_instance_serves_verified_tls_and_refuses_plain_connections(cluster, tmp_path) -> None:
    inst = create(cluster, "tls", databases=[common_pb2.Database(database="shop")],
                  users=[common_pb2.User(user="app", password="s3cret-pw", databases=["shop"])],
                  access=database_pb2.InstanceAccess(allowed_cidrs=ALLOWED, require_secure_transport=True))
    try:
        inst = wait_status(cluster, inst.name)
        ep = inst.endpoints[0]
        ca = cluster.instances.GetInstanceCa(database_pb2.GetInstanceCaRequest(name=inst.name), metadata=cluster.md)
        assert ca.server_name == ep.host and ca.port == ep.port
        # Not the deployment's internal CA: the tenant-facing one.
        assert ca.ca_pem.encode() != cluster.server.ca.cert_pem
        assert "MySQL" in x509.load_pem_x509_certificate(ca.ca_pem.encode()).subject.rfc4514_string()
        ca_file = tmp_path / "mysql-ca.pem"
        ca_file.write_text(ca.ca_pem)

        # pymysql with the CA and hostname checking.
        ctx = ssl.create_default_context(cafile=str(ca_file))
        ctx.check_hostname = True
        with pymysql.connect(host=ca.server_name, port=ep.port, user="app", password="s3cret-pw", database="shop",
                             ssl=ctx, connect_timeout=10) as conn, conn.cursor() as cur:
            cur.execute("SHOW STATUS LIKE 'Ssl_version'")
            assert cur.fetchone()[1].startswith("TLS")
            cur.execute("SHOW DATABASES")
            assert {r[0] for r in cur.fetchall()} == {"shop", "information_schema"}
            cur.execute("SELECT @@tmpdir")
            assert cur.fetchone()[0].startswith("/var/lib/mysql/")
        # The real mariadb client, verifying the server certificate.
        if shutil.which("mariadb"):
            done = subprocess.run(
                ["mariadb", "--no-defaults", f"--host={ca.server_name}", f"--port={ep.port}", "--user=app",
                 "--ssl", f"--ssl-ca={ca_file}", "--ssl-verify-server-cert", "-N", "-e",
                 "SHOW STATUS LIKE 'Ssl_cipher'"],
                env={**os.environ, "MYSQL_PWD": "s3cret-pw"}, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            assert done.stdout.split()[0] == "Ssl_cipher" and len(done.stdout.split()) == 2
        # A plain connection with the very password that just worked over TLS is refused (MariaDB 10.11 answers
        # a non-TLS login under require_secure_transport with "access denied", 1045).
        with pytest.raises(pymysql.err.OperationalError) as refused:
            pymysql.connect(host=ca.server_name, port=ep.port, user="app", password="s3cret-pw",
                            ssl_disabled=True, connect_timeout=10)
        assert refused.value.args[0] in (1045, 4151)
        # The user exists only at the allowed networks.
        users = cluster.users.ListUsers(database_pb2.ListUsersRequest(parent=inst.name), metadata=cluster.md).users
        assert sorted(u.host for u in users if u.user == "app") == sorted(
            ["127.0.0.0/255.0.0.0", "10.0.0.0/255.0.0.0", "172.16.0.0/255.240.0.0", "192.168.0.0/255.255.0.0"])
    finally:
        wait_status(cluster, inst.name, wanted=("ACTIVE", "ERROR"))
        cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                cluster.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=cluster.md)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
                break
            time.sleep(0.5)
