"""ListInstances paging over 10,000 instances in the state database, on SQLite and on MariaDB: the time of
each page through the real server (mTLS, an admin caller, the views with their tasks), page after page to
the end, beside the raw SQL select of the same page's rows on the same database in the same run.

Run: `.venv/bin/python -m bench.list_bench [--instances 10000] [--page-size 50]`.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from reddwarf.server import models
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, database_pb2, database_pb2_grpc
from tests.fixtures.mariadb import mariadb_server
from tests.fixtures.server import start_server


def seed(url: str, n: int) -> None:
    """n instances over 20 tenants, each with its finished create task; one in ten busy with a backup."""
    engine = sa.create_engine(url)
    # The models' tables (not reflected ones), so their column defaults fill what is not given here.
    t_ten, t_inst, t_task = (models.Tenant.__table__, models.Instance.__table__, models.Task.__table__)
    base = dt.datetime(2026, 1, 1)
    lease_until = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(days=1)
    with engine.begin() as c:
        tenants = [f"bench{i:02d}" for i in range(20)]
        c.execute(t_ten.insert(), [{"id": t, "display_name": t, "quota_instances": n, "quota_memory_mb": 1 << 30,
                                    "quota_volume_gb": 1 << 20, "quota_backups": n, "quota_backup_bytes": 1 << 50,
                                    "created_at": base} for t in tenants])
        for start in range(0, n, 2000):
            rows, task_rows = [], []
            for i in range(start, min(n, start + 2000)):
                iid = str(uuid.UUID(int=i + 1))
                at = base + dt.timedelta(seconds=i)
                rows.append({"id": iid, "tenant_id": tenants[i % 20], "display_name": f"db-{i}", "status": "ACTIVE",
                             "flavor_id": "small", "volume_size_gb": 1, "datastore": "mariadb",
                             "datastore_version": "10.11", "address": "10.0.0.2", "port": 3306,
                             "health": {"serviceState": "SERVICE_STATE_RUNNING", "uptimeSeconds": 5},
                             "health_at": at, "created_at": at, "updated_at": at, "tags": {},
                             "deletion_protection": False})
                task_rows.append({"id": str(uuid.uuid4()), "kind": "create_instance", "resource": f"instances/{iid}",
                                  "tenant_id": tenants[i % 20], "state": "SUCCEEDED", "params": {}, "steps": [],
                                  "lease_owner": None, "lease_expires": None,  # every row the same keys
                                  "created_at": at, "updated_at": at})
                if i % 10 == 0:
                    task_rows.append({"id": str(uuid.uuid4()), "kind": "create_backup",
                                      "resource": f"instances/{iid}", "tenant_id": tenants[i % 20],
                                      "state": "RUNNING", "params": {}, "steps": [],
                                      # running on another server: under its live lease, so this server's
                                      # task engine leaves it alone (unleased, the engine would claim and
                                      # run 1,000 backups of instances that have no host while the pages
                                      # are timed)
                                      "lease_owner": "another-server", "lease_expires": lease_until,
                                      "created_at": at + dt.timedelta(seconds=1),
                                      "updated_at": at + dt.timedelta(seconds=1)})
            c.execute(t_inst.insert(), [{k: v for k, v in r.items() if k in t_inst.c} for r in rows])
            c.execute(t_task.insert(), [{k: v for k, v in r.items() if k in t_task.c} for r in task_rows])
    engine.dispose()


def page_through(server_api: object, stub: database_pb2_grpc.InstancesStub, page_size: int) -> tuple[list[float], int]:
    lat: list[float] = []
    token, seen = "", 0
    while True:
        t = time.perf_counter()
        resp = stub.ListInstances(database_pb2.ListInstancesRequest(page_size=page_size, page_token=token))
        lat.append(time.perf_counter() - t)
        seen += len(resp.instances)
        token = resp.next_page_token
        if not token:
            return lat, seen


def raw_pages(url: str, page_size: int, pages: int) -> list[float]:
    engine = sa.create_engine(url)
    lat = []
    with engine.connect() as c:
        q = sa.text("SELECT * FROM instances WHERE deleted_at IS NULL ORDER BY created_at, id LIMIT :l OFFSET :o")
        for p in range(pages):
            t = time.perf_counter()
            c.execute(q, {"l": page_size + 1, "o": p * page_size}).fetchall()
            lat.append(time.perf_counter() - t)
    engine.dispose()
    return lat


def q(lat: list[float], p: float) -> float:
    s = sorted(lat)
    return s[min(len(s) - 1, int(p * len(s)))] * 1000


@contextmanager
def state_db(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp}/state.db"
        return
    with mariadb_server() as m:
        with m.connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE reddwarf_bench")
        yield m.url("reddwarf_bench")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--page-size", type=int, default=50)
    a = ap.parse_args()
    results = []
    for kind in ("sqlite", "mariadb"):
        with tempfile.TemporaryDirectory(prefix="reddwarf-listbench-", dir="/var/tmp") as tmp, \
                state_db(kind, Path(tmp)) as url, \
                start_server(Path(tmp), {"REDDWARF_DB_URL": url}) as server:
            seed(url, a.instances)
            admin_pb2_grpc.AdminStub(server.channel(server.admin_files)).ListTenants(admin_pb2.ListTenantsRequest())
            with server.channel(server.admin_files) as ch:
                stub = database_pb2_grpc.InstancesStub(ch)
                page_through(server.api, stub, a.page_size)  # warm
                lat, seen = page_through(server.api, stub, a.page_size)
            assert seen == a.instances, (seen, a.instances)
            raw = raw_pages(url, a.page_size, len(lat))
            print(f"{kind}: slowest pages {[round(x * 1000, 1) for x in sorted(lat)[-6:]]} ms", file=sys.stderr)
            results.append((kind, lat, raw))

    print("## Listing: ListInstances paging over 10,000 instances\n")
    print(f"{a.instances:,} instances (one in ten with a running task) in the state database; an admin pages "
          f"through all of them, {a.page_size} a page, through the real server (mTLS, views with their tasks "
          "and configuration). Baseline: the raw SQL select of the same pages' rows on the same database, same "
          "run.\n")
    print("| state DB | pages | p50 per page | p99 per page | raw SQL page p50 / p99 |")
    print("|---|---|---|---|---|")
    for kind, lat, raw in results:
        print(f"| {kind} | {len(lat)} | {q(lat, .5):.1f} ms | {q(lat, .99):.1f} ms | "
              f"{q(raw, .5):.1f} / {q(raw, .99):.1f} ms |")
    print("\nTarget (issue 19): p99 per page under 50 ms on SQLite and on MariaDB.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
