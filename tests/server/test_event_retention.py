"""The event history is kept for the configured time and no longer: a real server with a retention of a
couple of seconds prunes what it recorded, and one with recording off records nothing."""
from __future__ import annotations

import time
import uuid

from reddwarf.v1 import admin_pb2, admin_pb2_grpc, observe_pb2, observe_pb2_grpc
from tests.fixtures.server import start_server
from tests.fixtures.waiting import until


def admin_events(server) -> list[observe_pb2.Event]:  # type: ignore[no-untyped-def]
    with server.channel(server.admin_files) as ch:
        return list(observe_pb2_grpc.EventsStub(ch).ListEvents(observe_pb2.ListEventsRequest(page_size=1000)).events)


def create_tenant(server) -> str:  # type: ignore[no-untyped-def]
    tid = f"r{uuid.uuid4().hex[:6]}"
    with server.channel(server.admin_files) as ch:
        admin_pb2_grpc.AdminStub(ch).CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
    return tid


def test_events_past_the_retention_are_pruned(tmp_path):
    # 3 s of retention (in days), pruned every half second
    env = {"REDDWARF_EVENT_RETENTION_DAYS": str(3 / 86400), "REDDWARF_EVENT_PRUNE_SECONDS": "0.5"}
    with start_server(tmp_path, extra_env=env) as server:
        tid = create_tenant(server)
        recorded = until(lambda: admin_events(server), lambda es: any(tid in e.summary for e in es), timeout=10,
                         what="the CreateTenant event")
        assert recorded
        t0 = time.monotonic()
        until(lambda: admin_events(server), lambda es: not any(tid in e.summary for e in es), timeout=15,
              what="the event pruned")
        assert time.monotonic() - t0 >= 1.0  # kept for a while, not dropped at once


def test_with_recording_off_nothing_is_recorded(tmp_path):
    with start_server(tmp_path, extra_env={"REDDWARF_EVENTS_ENABLED": "false"}) as server:
        create_tenant(server)
        time.sleep(0.5)  # longer than the writer's flush interval
        assert admin_events(server) == []
