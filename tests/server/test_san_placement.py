"""The scheduler with SAN nodes, on a real state DB (SQLite, migrated by Alembic): a SAN node never gets a
container, a host with iscsi volumes is bounded by the SAN nodes' room (not its own disk), the SAN node with the
most room holds a new LUN, and running out says which of them ran out."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.errors import ResourceExhausted
from reddwarf.common.states import HostState
from reddwarf.server import db, models
from reddwarf.server.hosts import place, place_storage


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/state.db"
    db.upgrade(url)
    engine = db.make_engine(url)
    factory = db.session_factory(engine)
    with factory() as s, s.begin():
        db.seed(s)
        s.add(models.Tenant(id="t1"))
    yield factory
    engine.dispose()


def add_host(s: Session, hid: str, mode: str = "compute", volume_driver: str = "loop", memory_mb: int = 8192,
             storage_gb: int = 0, state: str = HostState.UP) -> None:
    s.add(models.Host(id=hid, address=f"{hid}:1", state=state, mode=mode, volume_driver=volume_driver,
                      memory_mb_total=memory_mb, storage_gb_total=storage_gb, memory_overcommit=1.0,
                      storage_overcommit=1.0))


def add_instance(s: Session, iid: str, host: str, storage_host: str | None, size_gb: int) -> None:
    s.add(models.Instance(id=iid, tenant_id="t1", display_name=iid, flavor_id="tiny", volume_size_gb=size_gb,
                          datastore="mariadb", datastore_version="10.11", host_id=host, storage_host_id=storage_host,
                          volume_driver="iscsi" if storage_host else "loop"))


def test_a_san_node_never_gets_a_container_even_with_the_most_memory(sessions):
    with sessions() as s, s.begin():
        add_host(s, "san1", mode="storage", volume_driver="iscsi", memory_mb=1 << 20, storage_gb=1000)
        add_host(s, "c1", volume_driver="iscsi", memory_mb=4096)
    with sessions() as s:
        assert place(s, 512, 10) == "c1"


def test_an_iscsi_host_is_bounded_by_san_room_not_its_own_disk(sessions):
    with sessions() as s, s.begin():
        add_host(s, "san1", mode="storage", volume_driver="iscsi", storage_gb=20)
        add_host(s, "c1", volume_driver="iscsi", storage_gb=0)
        add_host(s, "loop1", volume_driver="loop", storage_gb=5, memory_mb=1024)
    with sessions() as s:
        assert place(s, 512, 15) == "c1"  # its own disk is 0 GB; the SAN node has 20
    with sessions() as s, s.begin():
        add_instance(s, "i1", "c1", "san1", 15)
    with sessions() as s, pytest.raises(ResourceExhausted) as e:
        place(s, 512, 10)  # 5 GB left on the SAN node, 5 GB on the loop host
    assert e.value.violations[0][0] == "instance.volume.size_gb"


def test_the_san_node_with_the_most_room_holds_the_lun(sessions):
    with sessions() as s, s.begin():
        add_host(s, "san1", mode="storage", volume_driver="iscsi", storage_gb=100)
        add_host(s, "san2", mode="storage", volume_driver="iscsi", storage_gb=60)
        add_host(s, "san3", mode="storage", volume_driver="iscsi", storage_gb=500, state=HostState.DOWN)
        add_host(s, "c1", volume_driver="iscsi")
        add_instance(s, "i1", "c1", "san1", 50)
    with sessions() as s:
        assert place_storage(s, 10) == "san2"  # 60 free against san1's 50; san3 is down
        with pytest.raises(ResourceExhausted) as e:
            place_storage(s, 61)
    assert e.value.violations[0][0] == "instance.volume.size_gb"


def test_no_san_node_up_is_named(sessions):
    with sessions() as s, s.begin():
        add_host(s, "c1", volume_driver="iscsi")
    with sessions() as s, pytest.raises(ResourceExhausted) as e:
        place_storage(s, 1)
    assert e.value.violations[0][0] == "storage_host" and "no SAN node is up" in e.value.message
