"""Datastore versions, real: MariaDB 10.11 runs in the Debian 12 template, MariaDB 11.8 in the Debian 13 one
(built by hostd on the first 11.8 create and cached per machine, like the bookworm template)."""
from __future__ import annotations

import os

import pymysql
import pytest

from reddwarf.common import parameters
from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc
from tests.provisioning.test_e2e import wait_status, wait_task

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]


def test_the_catalog_offers_10_11_and_11_8(cluster) -> None:
    ds = database_pb2_grpc.CatalogStub(cluster.channel).GetDatastore(
        database_pb2.GetDatastoreRequest(name="datastores/mariadb"), metadata=cluster.md)
    assert ds.default_version == "10.11"
    assert [v.version for v in ds.versions] == ["10.11", "11.8"]


def test_an_instance_on_11_8_runs_mariadb_11_8(cluster) -> None:
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="v118", flavor="tiny", volume=database_pb2.Volume(size_gb=1),
                                       datastore="mariadb", datastore_version="11.8"),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password="s3cret-pw", databases=["shop"])]), metadata=cluster.md)
    try:
        # The first 11.8 create on a machine builds the trixie template (~2 min); later ones reuse it.
        up = wait_status(cluster, inst.name, timeout=900)
        assert up.datastore_version == "11.8"
        # The catalog shows the exact packages of the template the host made the container from.
        ds = database_pb2_grpc.CatalogStub(cluster.channel).GetDatastore(
            database_pb2.GetDatastoreRequest(name="datastores/mariadb"), metadata=cluster.md)
        v118 = {v.version: v for v in ds.versions}["11.8"]
        assert v118.package_versions["mariadb-server"].startswith("1:11.8.")
        assert v118.package_versions["python3"].startswith("3.13.")
        ep = up.endpoints[0]
        with pymysql.connect(host=ep.host, port=ep.port, user="app", password="s3cret-pw", database="shop",
                             connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            assert cur.fetchone()[0].startswith("11.8.")
            cur.execute("CREATE TABLE t (id INT PRIMARY KEY)")
            cur.execute("INSERT INTO t VALUES (1)")
            conn.commit()
    finally:
        cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)
        wait_task(cluster, inst, timeout=300)


def test_11_8_rules_differ_from_10_11_only_where_mariadb_changed() -> None:
    old, new = parameters.rules_for("mariadb", "10.11"), parameters.rules_for("mariadb", "11.8")
    assert set(old) - set(new) == {"innodb_change_buffering"}  # the change buffer is gone since 11.0
    assert set(new) <= set(old)
    assert "utf8mb4_uca1400_ai_ci" in new["collation_server"].allowed
    assert "utf8mb4_uca1400_ai_ci" not in old["collation_server"].allowed
    with pytest.raises(Exception) as exc:
        parameters.validate("mariadb", "11.8", {"innodb_change_buffering": "all"}, None, "values")
    assert "innodb_change_buffering" in str(exc.value)
