"""Guest logs and the event history through the real server, against the fake hostd (the fake datastore
writes its statements into its own logs): list/enable/disable/tail/save a log, read the saved copy back
from the backup store, and the history of who changed what — redacted, per tenant, filtered and paged.

One instance is shared by the module and the steps are chained with pytest-dependency."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import grpc
import httpx
import pytest

from reddwarf.server import db
from reddwarf.server.backup_store import LocalStore
from reddwarf.server.keys import TenantKeys, ensure_kek
from reddwarf.v1 import common_pb2, database_pb2, observe_pb2, observe_pb2_grpc
from tests.fixtures.cluster import Cluster
from tests.fixtures.errors import field_violations
from tests.fixtures.gateway import start_gateway
from tests.fixtures.waiting import until

from .test_instance_flows import wait_active


def logs(c: Cluster) -> observe_pb2_grpc.LogsStub:
    return observe_pb2_grpc.LogsStub(c.channel)


def events(c: Cluster) -> observe_pb2_grpc.EventsStub:
    return observe_pb2_grpc.EventsStub(c.channel)


def tail(c: Cluster, name: str, **kw: object) -> str:
    return "".join(ch.data for ch in logs(c).TailLog(observe_pb2.TailLogRequest(name=name, **kw), metadata=c.md))


@pytest.fixture(scope="module")
def inst(cluster: Cluster) -> database_pb2.Instance:
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="logged", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        users=[common_pb2.User(user="app", password="Hunter2-secret")], request_id="5c0ffee0-0000-4000-8000-00000000100d"),
        metadata=(*cluster.md, ("x-request-id", "rid-create-1")))


@pytest.mark.dependency(name="up")
def test_the_instance_comes_up(cluster, inst):
    wait_active(cluster, inst.name)


@pytest.mark.dependency(depends=["up"])
def test_the_error_and_slow_logs_are_on_and_the_general_log_off(cluster, inst):
    got = {g.log: g for g in logs(cluster).ListLogs(observe_pb2.ListLogsRequest(parent=inst.name),
                                                    metadata=cluster.md).logs}
    assert {n: (g.type, g.status) for n, g in got.items()} == {
        "error": ("SYS", "Enabled"), "slow_query": ("USER", "Enabled"), "general": ("USER", "Disabled")}
    assert got["error"].name == f"{inst.name}/logs/error" and got["error"].size_bytes > 0
    assert all(g.max_bytes > 0 for g in got.values())
    assert "ready for connections" in tail(cluster, f"{inst.name}/logs/error")


@pytest.mark.dependency(depends=["up"])
def test_bad_log_names_and_values_are_refused_with_the_field(cluster, inst):
    c = cluster
    for name, field in [(f"{inst.name}/logs/../../etc/shadow", "name"), (f"{inst.name}/logs/audit", "name"),
                        ("instances//logs/error", "name"), (f"{inst.name}/logz/error", "name")]:
        with pytest.raises(grpc.RpcError) as e:
            logs(c).GetLog(observe_pb2.GetLogRequest(name=name), metadata=c.md)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert field in field_violations(e.value), name
    with pytest.raises(grpc.RpcError) as e:
        logs(c).DisableLog(observe_pb2.DisableLogRequest(name=f"{inst.name}/logs/error"), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in field_violations(e.value)
    for lqt in (-1.0, 3601.0):
        with pytest.raises(grpc.RpcError) as e:
            logs(c).EnableLog(observe_pb2.EnableLogRequest(name=f"{inst.name}/logs/slow_query", long_query_time=lqt),
                              metadata=c.md)
        assert "long_query_time" in field_violations(e.value)
    with pytest.raises(grpc.RpcError) as e:
        logs(c).EnableLog(observe_pb2.EnableLogRequest(name=f"{inst.name}/logs/general", long_query_time=1),
                          metadata=c.md)
    assert "long_query_time" in field_violations(e.value)
    with pytest.raises(grpc.RpcError) as e:
        tail(c, f"{inst.name}/logs/error", lines=10001)
    assert "lines" in field_violations(e.value)
    # another tenant's instance does not exist for it
    with pytest.raises(grpc.RpcError) as e:
        logs(c).ListLogs(observe_pb2.ListLogsRequest(parent=inst.name), metadata=c.other_tenant_md())
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # nothing was switched by the refused calls
    general = logs(c).GetLog(observe_pb2.GetLogRequest(name=f"{inst.name}/logs/general"), metadata=c.md)
    assert general.status == "Disabled"


@pytest.mark.dependency(name="general", depends=["up"])
def test_enabling_the_general_log_records_statements_and_tail_follows_them(cluster, inst):
    c = cluster
    name = f"{inst.name}/logs/general"
    assert logs(c).EnableLog(observe_pb2.EnableLogRequest(name=name), metadata=c.md).status == "Enabled"
    c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
        parent=inst.name, database=common_pb2.Database(database="seen_in_log")), metadata=c.md)
    assert "create_database seen_in_log" in tail(c, name, lines=5)

    # follow: a stream that gets what is appended after it started
    got: list[str] = []
    call = logs(c).TailLog(observe_pb2.TailLogRequest(name=name, lines=1, follow=True), metadata=c.md)
    try:
        it = iter(call)
        got.append(next(it).data)
        c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
            parent=inst.name, database=common_pb2.Database(database="appended_later")), metadata=c.md)
        for chunk in it:
            got.append(chunk.data)
            if "appended_later" in "".join(got):
                break
    finally:
        call.cancel()
    assert "create_database appended_later" in "".join(got)
    assert logs(c).DisableLog(observe_pb2.DisableLogRequest(name=name), metadata=c.md).status == "Disabled"
    c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
        parent=inst.name, database=common_pb2.Database(database="not_logged")), metadata=c.md)
    assert "not_logged" not in tail(c, name, lines=100)


@pytest.mark.dependency(depends=["up"])
def test_only_a_few_follows_per_instance_at_once(cluster, inst):
    c = cluster
    req = observe_pb2.TailLogRequest(name=f"{inst.name}/logs/error", lines=1, follow=True)
    calls = [logs(c).TailLog(req, metadata=c.md) for _ in range(4)]
    try:
        for call in calls:
            next(iter(call))  # each is streaming
        with pytest.raises(grpc.RpcError) as e:
            next(iter(logs(c).TailLog(req, metadata=c.md)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "follow" in field_violations(e.value)
    finally:
        for call in calls:
            call.cancel()
    # once they are gone (the server sees the cancels), following works again
    def follow_once() -> str | grpc.StatusCode:
        call = logs(c).TailLog(req, metadata=c.md)
        try:
            return next(iter(call)).data
        except grpc.RpcError as err:
            return err.code()
        finally:
            call.cancel()
    until(follow_once, lambda got: isinstance(got, str), timeout=10, what="a follow after the others ended")


@pytest.mark.dependency(depends=["general"])
def test_a_saved_log_reads_back_from_the_backup_store(cluster, inst):
    c = cluster
    saved = logs(c).SaveLog(observe_pb2.SaveLogRequest(name=f"{inst.name}/logs/general"), metadata=c.md)
    assert saved.object_id.startswith("log-") and saved.size_bytes > 0 and len(saved.sha256) == 64

    async def read_back() -> bytes:
        sd = c.server.state_dir
        sessions = db.session_factory(db.make_engine(c.server.db_url))
        store = LocalStore(str(sd / "backups"), TenantKeys(sessions, ensure_kek(str(sd / "backup-kek.key"), sessions)))
        return b"".join([chunk async for chunk in store.open_reader(saved.object_id)])

    data = asyncio.run(read_back())
    assert len(data) == saved.size_bytes
    assert b"create_database seen_in_log" in data and b"create_database appended_later" in data
    assert tail(c, f"{inst.name}/logs/general", from_start=True).encode() == data


# -- the event history ----------------------------------------------------------------------------------

def list_events(c: Cluster, md: tuple[tuple[str, str], ...] | None = None, **kw: object) -> list[observe_pb2.Event]:
    out: list[observe_pb2.Event] = []
    token = ""
    while True:
        page = events(c).ListEvents(observe_pb2.ListEventsRequest(page_token=token, **kw),
                                    metadata=md if md is not None else c.md)
        out += page.events
        token = page.next_page_token
        if not token:
            return out


@pytest.mark.dependency(depends=["up"])
def test_the_create_is_recorded_with_its_caller_request_id_and_no_secret(cluster, inst):
    c = cluster
    evs = until(lambda: list_events(c, kind="api", resource=inst.name),
                lambda es: any(e.method.endswith("/CreateInstance") for e in es), timeout=10, what="create event")
    create = next(e for e in evs if e.method == "/reddwarf.v1.Instances/CreateInstance")
    assert (create.code, create.request_id, create.tenant, create.resource) == \
        ("OK", "rid-create-1", c.tenant, inst.name)
    # the certificate's identity and the token's id, never its secret
    assert create.actor.startswith("spiffe://reddwarf/client/") and " token/" in create.actor
    assert c.token not in create.actor
    summary = json.loads(create.summary)
    assert summary["instance"]["display_name"] == "logged"
    assert summary["users"][0]["password"] == "<redacted>"
    everything = list_events(c)
    assert all("Hunter2-secret" not in e.SerializeToString().decode(errors="replace") for e in everything)


@pytest.mark.dependency(depends=["up"])
def test_status_changes_are_recorded_build_to_active(cluster, inst):
    evs = list_events(cluster, kind="status", resource=inst.name)
    assert [(e.previous_status, e.status) for e in evs][:2] == [("", "BUILD"), ("BUILD", "ACTIVE")]
    # the first one happened inside the create call: it carries its request id
    assert evs[0].request_id == "rid-create-1"
    assert [e.id for e in list_events(cluster, kind="status", resource=inst.id)] == [e.id for e in evs]  # bare id


@pytest.mark.dependency(depends=["up"])
def test_a_refused_change_is_recorded_with_its_code(cluster, inst):
    c = cluster
    with pytest.raises(grpc.RpcError):
        c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
            parent=inst.name, database=common_pb2.Database(database="bad`name")), metadata=c.md)
    def refused(es: list[observe_pb2.Event]) -> list[observe_pb2.Event]:
        return [e for e in es if e.method == "/reddwarf.v1.Databases/CreateDatabase" and e.code != "OK"]
    evs = until(lambda: list_events(c, kind="api", resource=inst.name), refused, timeout=10, what="refused event")
    bad = refused(evs)[-1]
    assert bad.code == "INVALID_ARGUMENT" and "database" in bad.detail and "bad`name" in bad.summary
    assert bad.request_id.startswith("req-")  # none given: the server made one


@pytest.mark.dependency(depends=["up"])
def test_tenants_see_only_their_own_events_and_admins_all(cluster, inst):
    c = cluster
    other_tenant, other_token = c.new_tenant()
    other_md = (("authorization", f"Bearer {other_token}"),)
    assert list_events(c, other_md) == []
    with pytest.raises(grpc.RpcError) as e:
        events(c).ListEvents(observe_pb2.ListEventsRequest(tenant=c.tenant), metadata=other_md)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "tenant" in field_violations(e.value)
    admin = observe_pb2_grpc.EventsStub(c.server.channel(c.server.admin_files))
    mine = admin.ListEvents(observe_pb2.ListEventsRequest(tenant=c.tenant, page_size=1000)).events
    assert mine and {e.tenant for e in mine} == {c.tenant}
    # the admin's own CreateTenant/CreateToken calls are in the history, under the admin tenant
    every = until(lambda: admin.ListEvents(observe_pb2.ListEventsRequest(page_size=1000, kind="api")).events,
                  lambda es: any(e.method.endswith("/CreateTenant") and other_tenant in e.summary for e in es),
                  timeout=10, what="CreateTenant event")
    assert any(e.method.endswith("/CreateToken") and e.tenant == "admin" for e in every)
    assert all("secret" not in json.loads(e.summary or "{}") or json.loads(e.summary)["secret"] == "<redacted>"
               for e in every)


@pytest.mark.dependency(depends=["up"])
def test_paging_and_filters(cluster, inst):
    c = cluster
    everything = list_events(c)
    paged = list_events(c, page_size=2)
    assert [e.id for e in paged] == [e.id for e in everything] and len(paged) > 4
    assert [e.id for e in everything] == sorted(e.id for e in everything)
    first = events(c).ListEvents(observe_pb2.ListEventsRequest(page_size=2), metadata=c.md)
    with pytest.raises(grpc.RpcError) as e:  # a token is bound to its filter
        events(c).ListEvents(observe_pb2.ListEventsRequest(page_size=2, kind="api", page_token=first.next_page_token),
                             metadata=c.md)
    assert "page_token" in field_violations(e.value)
    with pytest.raises(grpc.RpcError) as e:
        events(c).ListEvents(observe_pb2.ListEventsRequest(kind="gossip"), metadata=c.md)
    assert "kind" in field_violations(e.value)
    mid = everything[len(everything) // 2].time
    later = list_events(c, since=mid)
    assert later and all(e.time.ToDatetime() >= mid.ToDatetime() for e in later)
    earlier = list_events(c, until=mid)
    assert {e.id for e in earlier} | {e.id for e in later} == {e.id for e in everything}
    with pytest.raises(grpc.RpcError) as e:
        events(c).ListEvents(observe_pb2.ListEventsRequest(since=mid, until=everything[0].time), metadata=c.md)
    assert "since" in field_violations(e.value)
    assert list_events(c, resource=f"instances/{uuid.uuid4()}") == []


# -- the CLI -------------------------------------------------------------------------------------------

def cli(c: Cluster, *args: str) -> CliResult:
    from typer.testing import CliRunner

    from reddwarf.client import cli as cli_module
    cli_module.State.factory = None
    f = c.server.client_files
    env = {"REDDWARF_ENDPOINT": c.server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
           "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": c.token, "REDDWARF_CONFIG": "/nonexistent",
           "COLUMNS": "200"}
    r = CliRunner().invoke(cli_module.app, list(args), env=env)
    return CliResult(r.exit_code, r.output)


@dataclass
class CliResult:
    code: int
    output: str


@pytest.mark.dependency(depends=["up"])
def test_cli_logs_events_and_top(cluster, inst):
    c = cluster
    r = cli(c, "instance", "log", "list", "logged")  # by display name
    assert r.code == 0, r.output
    assert "slow_query" in r.output and "Enabled" in r.output and "general" in r.output
    r = cli(c, "--json", "instance", "log", "show", inst.id, "error")
    assert r.code == 0 and json.loads(r.output)["type"] == "SYS"
    r = cli(c, "instance", "log", "tail", inst.id, "error", "--lines", "5")
    assert r.code == 0 and "ready for connections" in r.output
    t0 = time.monotonic()
    r = cli(c, "instance", "log", "tail", inst.id, "error", "--follow", "--timeout", "2")
    assert r.code == 0 and "ready for connections" in r.output, r.output  # --timeout ends a follow, not an error
    assert time.monotonic() - t0 >= 2
    r = cli(c, "instance", "log", "disable", inst.id, "error")
    assert r.code == 2 and r.output.strip().splitlines()[-1].startswith("error: INVALID_ARGUMENT")
    r = cli(c, "instance", "log", "enable", inst.id, "slow_query", "--long-query-time", "0.5")
    assert r.code == 0 and "0.5" in r.output
    r = cli(c, "--json", "instance", "log", "save", inst.id, "slow_query")
    assert r.code == 0 and json.loads(r.output)["object_id"].startswith("log-")

    r = cli(c, "--json", "event", "list", "--instance", "logged", "--kind", "status")
    assert r.code == 0, r.output
    assert [e["status"] for e in json.loads(r.output)][:2] == ["BUILD", "ACTIVE"]
    r = cli(c, "event", "list", "--instance", inst.id, "--limit", "3")
    assert r.code == 0 and "id" in r.output
    r = cli(c, "event", "list", "--since", "yesterday")
    assert r.code == 2 and "--since" in r.output

    r = cli(c, "instance", "top", "--once", "--interval", "0.5")
    assert r.code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.strip().startswith("logged"))
    assert "ACTIVE" in row


# -- Trove's /log through the REST gateway, read by unmodified python-troveclient ---------------------------

@pytest.mark.dependency(depends=["up"])
def test_troveclient_log_list_show_enable_disable_publish(cluster, inst):
    from keystoneauth1 import session, token_endpoint
    from troveclient.osc.v1 import database_logs
    from troveclient.v1 import client

    c = cluster
    with start_gateway(c.server.api, c.server.gateway_files) as base:
        trove = client.Client(session=session.Session(auth=token_endpoint.Token(f"{base}/v1.0/{c.tenant}", c.token)))
        listed = {g.name: g for g in trove.instances.log_list(inst.id)}
        assert set(listed) == {"error", "slow_query", "general"}
        row = {col: getattr(listed["error"], col.lower()) for col in database_logs.ListDatabaseLogs.columns}
        assert (row["Type"], row["Status"], row["Published"]) == ("SYS", "Enabled", 0) and row["Pending"] > 0
        assert trove.instances.log_show(inst.id, "general").status == "Disabled"
        assert trove.instances.log_action(inst.id, "general", enable=True).status == "Enabled"
        published = trove.instances.log_action(inst.id, "error", publish=True)
        assert published.status == "Published" and published.published > 0 and published.prefix.startswith("log-")
        assert trove.instances.log_action(inst.id, "general", disable=True).status == "Disabled"
        from troveclient import exceptions
        with pytest.raises(exceptions.BadRequest):
            trove.instances.log_action(inst.id, "error", disable=True)
        with pytest.raises(exceptions.BadRequest):
            trove.instances.log_action(inst.id, "../../etc/passwd")
        r = httpx.post(f"{base}/v1.0/{c.tenant}/instances/{inst.id}/log", headers={"X-Auth-Token": c.token},
                       json={"name": "general", "enable": 1, "disable": 1})
        assert r.status_code == 400 and "enable" in r.json()["badRequest"]["message"]
        r = httpx.post(f"{base}/v1.0/{c.tenant}/instances/{inst.id}/log", headers={"X-Auth-Token": c.token},
                       json={"name": "general", "rotate": 1})
        assert r.status_code == 400 and "rotate" in r.json()["badRequest"]["message"]
        assert trove.instances.log_show(inst.id, "general").status == "Disabled"  # refused bodies changed nothing
        r = httpx.post(f"{base}/v1.0/{c.tenant}/instances/{inst.id}/log",
                       headers={"X-Auth-Token": c.token, "X-Request-Id": "rest-req-42"}, json={"name": "general"})
        assert r.status_code == 200 and r.json()["log"]["name"] == "general"
        r = httpx.post(f"{base}/v1.0/{c.tenant}/instances/{inst.id}/databases",
                       headers={"X-Auth-Token": c.token, "X-Request-Id": "rest-req-43"},
                       json={"databases": [{"name": "via_rest"}]})
        assert r.status_code == 202
    # the gateway's calls are in the history like any other API call
    evs = until(lambda: list_events(c, kind="api", resource=inst.name),
                lambda es: any(e.method == "/reddwarf.v1.Logs/SaveLog" for e in es), timeout=10, what="SaveLog event")
    assert any(e.actor.startswith("spiffe://reddwarf/gateway/") for e in evs)
    rest = until(lambda: list_events(c, kind="api", resource=inst.name),
                 lambda es: any(e.request_id == "rest-req-43" for e in es), timeout=10, what="the REST call's event")
    assert next(e for e in rest if e.request_id == "rest-req-43").method == "/reddwarf.v1.Databases/CreateDatabase"
