"""ListInstances pages by key (the last row's created_at and id in the signed page token): every live
instance exactly once, in order, at any depth, ties on created_at broken by id, and rows created or deleted
while a client pages shift no page. The time per page at 10,000 instances is bench/list_bench.py's."""
from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
import sqlalchemy as sa

from bench.list_bench import seed
from reddwarf.server import models
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, database_pb2, database_pb2_grpc
from tests.fixtures.server import start_server

N = 120


@pytest.fixture
def listed(tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    with start_server(tmp_path, {"REDDWARF_DB_URL": url}) as server:
        seed(url, N)
        engine = sa.create_engine(url)
        with engine.begin() as c:  # ten pairs of instances created in the same microsecond: ties broken by id
            t = models.Instance.__table__
            for i in range(0, 20, 2):
                same = c.execute(sa.select(t.c.created_at).where(t.c.display_name == f"db-{i}")).scalar_one()
                c.execute(t.update().where(t.c.display_name == f"db-{i + 1}").values(created_at=same))
        admin_pb2_grpc.AdminStub(server.channel(server.admin_files)).ListTenants(admin_pb2.ListTenantsRequest())
        with server.channel(server.admin_files) as ch:
            yield database_pb2_grpc.InstancesStub(ch), engine
        engine.dispose()


def order(engine: sa.Engine) -> list[str]:
    t = models.Instance.__table__
    with engine.connect() as c:
        return list(c.execute(sa.select(t.c.id).where(t.c.deleted_at.is_(None))
                              .order_by(t.c.created_at, t.c.id)).scalars())


def test_every_instance_once_in_order_and_the_token_carries_the_key(listed):
    stub, engine = listed
    names, token, pages = [], "", 0
    while True:
        resp = stub.ListInstances(database_pb2.ListInstancesRequest(page_size=7, page_token=token))
        names += [i.id for i in resp.instances]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert names == order(engine) and len(names) == N
    assert pages == -(-N // 7)


def test_rows_created_or_deleted_while_paging_shift_no_page(listed):
    stub, engine = listed
    first = stub.ListInstances(database_pb2.ListInstancesRequest(page_size=50))
    seen = [i.id for i in first.instances]
    t = models.Instance.__table__
    with engine.begin() as c:
        # Deleted: five rows already served; created: one sorting before every row served.
        c.execute(t.update().where(t.c.id.in_(seen[:5])).values(deleted_at=dt.datetime(2026, 2, 1), status="DELETED"))
        row = c.execute(sa.select(t).where(t.c.id == seen[0])).mappings().one()
        c.execute(t.insert().values({**row, "id": str(uuid.uuid4()), "display_name": "late",
                                     "created_at": dt.datetime(2025, 1, 1), "deleted_at": None, "status": "ACTIVE",
                                     "request_id": None}))
    rest, token = [], first.next_page_token
    while token:
        resp = stub.ListInstances(database_pb2.ListInstancesRequest(page_size=50, page_token=token))
        rest += [i.id for i in resp.instances]
        token = resp.next_page_token
    assert not set(rest) & set(seen)  # an OFFSET repeats a served row after the insert before them...
    assert seen + rest == [i for i in order_all(engine) if i in set(seen) | set(rest)]
    assert len(seen) + len(rest) == N  # ...and skips unserved ones after the deletes (50 + 66 of 120)


def order_all(engine: sa.Engine) -> list[str]:
    t = models.Instance.__table__
    with engine.connect() as c:
        return list(c.execute(sa.select(t.c.id).order_by(t.c.created_at, t.c.id)).scalars())


def test_a_token_with_a_status_filter_pages_by_offset_and_a_forged_one_is_refused(listed):
    stub, _ = listed
    status = stub.ListInstances(database_pb2.ListInstancesRequest(page_size=1)).instances[0].status  # derived
    first = stub.ListInstances(database_pb2.ListInstancesRequest(page_size=30, status=status))
    second = stub.ListInstances(database_pb2.ListInstancesRequest(
        page_size=30, status=status, page_token=first.next_page_token))
    assert len(first.instances) == 30 and second.instances
    assert not {i.id for i in first.instances} & {i.id for i in second.instances}
    token = stub.ListInstances(database_pb2.ListInstancesRequest(page_size=5)).next_page_token
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(grpc.RpcError) as e:
        stub.ListInstances(database_pb2.ListInstancesRequest(page_size=5, page_token=forged))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in e.value.details()
