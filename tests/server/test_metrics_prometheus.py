"""A real Prometheus (Debian's package) scrapes a real server's /metrics over TLS with the deployment's
monitor certificate, using the shipped example configuration and alert rules, while an instance runs; PromQL
over its HTTP API answers questions about that instance, and forgets it once it is deleted.

Two clusters: the fake drivers (agents as processes; seconds, no root), and LXC with MariaDB (slow, root)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from reddwarf.common import states
from reddwarf.common.pki import TlsFiles
from reddwarf.v1 import database_pb2
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.mariadb import free_port

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (`make setup` installs "
                                "Debian's prometheus package)")


@contextmanager
def running_prometheus(work: Path, target: str, files: TlsFiles) -> Iterator[str]:
    """Prometheus on a free loopback port with its own config and storage under `work`, from the shipped
    example with the target, the monitor certificate and the rules file filled in; stopped at the end."""
    cfg: dict[str, Any] = yaml.safe_load((RULES / "prometheus.example.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(RULES / "reddwarf-alerts.yml")]
    job = cfg["scrape_configs"][0]
    job["static_configs"] = [{"targets": [target]}]
    job["tls_config"].update(ca_file=str(files.ca), cert_file=str(files.cert), key_file=str(files.key))
    work.mkdir(parents=True, exist_ok=True)
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - handed to the child
    assert PROMETHEUS is not None
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             f"--web.console.templates={work}", f"--web.console.libraries={work}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{(work / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def api(url: str, path: str, **params: str) -> Any:
    q = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{q}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def query_until(url: str, promql: str, timeout: float = 60) -> list[dict[str, Any]]:
    """The instant query's result once it is not empty."""
    deadline = time.monotonic() + timeout
    while True:
        result: list[dict[str, Any]] = api(url, "query", query=promql)["result"]
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no answer to {promql} within {timeout}s")
        time.sleep(0.5)


def wait_status(c: Cluster, name: str, wanted: str, timeout: float = 240) -> database_pb2.Instance:
    deadline = time.monotonic() + timeout
    while True:
        i = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md)
        st = states.from_pb(states.InstanceStatus, i.status)
        if st == wanted:
            return i
        assert st != "ERROR", i.fault.message
        assert time.monotonic() < deadline, f"instance still {st} ({i.task_step}) after {timeout}s"
        time.sleep(0.5)


CLUSTERS = [pytest.param("fake", id="fake"),
            pytest.param("lxc", id="lxc", marks=[pytest.mark.slow, pytest.mark.skipif(
                os.geteuid() != 0, reason="needs root: LXC, loop devices")])]


@pytest.fixture(scope="module", params=CLUSTERS)
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # TLS on loopback too, so the real scraper proves the TLS path; the state re-read every second.
    env = {"REDDWARF_METRICS_TLS": "on", "REDDWARF_METRICS_REFRESH_SECONDS": "1",
           "REDDWARF_METRICS_USAGE_SECONDS": "1"}
    with start_cluster(tmp_path_factory.mktemp("metrics"), server_env=env, driver=request.param) as c:
        yield c


@pytest.fixture(scope="module")
def prometheus(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    assert cluster.server.monitor_files is not None
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), cluster.server.metrics,
                            cluster.server.monitor_files) as url:
        yield url


@pytest.fixture(scope="module")
def instance(cluster: Cluster) -> Iterator[database_pb2.Instance]:
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name="watched", flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=cluster.md)
    try:
        yield wait_status(cluster, inst.name, "ACTIVE")
    finally:
        try:
            cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                cluster.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=cluster.md)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    break
            time.sleep(0.5)


@pytest.mark.dependency(name="scraped")
def test_prometheus_scrapes_the_server_over_tls_and_loads_the_rules(prometheus):
    target = query_until(prometheus, 'up{job="reddwarf"} == 1')
    assert target[0]["value"][1] == "1"
    groups = {g["name"]: g for g in api(prometheus, "rules")["groups"]}
    assert {"reddwarf-alerts", "reddwarf-recording"} <= groups.keys()
    assert all(r["health"] == "ok" for g in groups.values() for r in g["rules"]), groups


@pytest.mark.dependency(name="answered", depends=["scraped"])
def test_promql_answers_about_the_running_instance(cluster, prometheus, instance):
    up = query_until(prometheus, f'reddwarf_instance_up{{instance="{instance.id}"}} == 1')
    assert up[0]["metric"]["tenant"] == cluster.tenant
    # (the status comes from the state DB snapshot, up to metrics_refresh_seconds behind the heartbeat)
    query_until(prometheus, f'reddwarf_instance_status{{instance="{instance.id}",status="ACTIVE"}} == 1')
    # the host's beancounters, polled from hostd
    memory = query_until(prometheus, f'reddwarf_beancounter_held{{instance="{instance.id}",resource="memory"}} > 0')
    assert float(memory[0]["value"][1]) > 0
    limit = query_until(prometheus, f'reddwarf_beancounter_limit{{instance="{instance.id}",resource="memory"}}')
    assert float(limit[0]["value"][1]) > float(memory[0]["value"][1])
    if cluster.hostd.driver == "lxc":  # MariaDB's own figures (the fake datastore reports none)
        query_until(prometheus, f'reddwarf_guest_datadir_size_bytes{{instance="{instance.id}"}} > 0')
        query_until(prometheus, f'reddwarf_guest_buffer_pool_size_bytes{{instance="{instance.id}"}} > 0')
        query_until(prometheus, f'reddwarf_guest_queries_total{{instance="{instance.id}"}} > 0')
    # what it took to get there: the create task and the calls
    created = query_until(prometheus, 'reddwarf_task_duration_seconds_count{kind="create_instance",outcome="succeeded"}')
    assert float(created[0]["value"][1]) >= 1
    calls = query_until(prometheus, 'reddwarf_api_calls_total{method="/reddwarf.v1.Instances/CreateInstance",code="OK"}')
    assert float(calls[0]["value"][1]) >= 1
    assert float(query_until(prometheus, "reddwarf_agent_streams")[0]["value"][1]) >= 1
    # queries per second, from the shipped recording rule
    query_until(prometheus, f'reddwarf:guest_queries:rate1m{{instance="{instance.id}"}}')


@pytest.mark.dependency(depends=["answered"])
def test_a_deleted_instance_leaves_prometheus_with_no_series(cluster, prometheus, instance):
    cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=instance.name), metadata=cluster.md)
    deadline = time.monotonic() + 120
    promql = f'{{__name__=~"reddwarf_.+", instance="{instance.id}"}}'
    while api(prometheus, "query", query=promql)["result"]:
        assert time.monotonic() < deadline, api(prometheus, "query", query=promql)["result"]
        time.sleep(0.5)
