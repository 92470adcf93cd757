"""memcached, the blueprint's second service in the container, end to end on real LXC: requested with the
`reddwarf` CLI (`--memcached`), supervised by the guest agent, reported by health, shown with its endpoint by
the gRPC API, the CLI and the Trove gateway; a key set and read from the host (outside the container)
through that endpoint; its memory follows the flavor on resize. Unknown services are refused by every
surface with the field named and nothing made."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import jsonschema
import pytest

from reddwarf.client import Client
from reddwarf.client.config import load_config
from reddwarf.v1 import common_pb2 as cpb
from reddwarf.v1 import database_pb2 as pb
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC")]


def memcached(host: str, port: int, request: bytes, end: bytes = b"END\r\n") -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while not data.endswith(end):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def memcached_argv(address: str) -> list[str]:
    """The argv of the memcached serving `address` (the container's processes are visible from the host)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv and argv[0].endswith("memcached") and address in argv:
            found.append(argv)
    assert len(found) == 1, found
    return found[0]


def memcached_or_none(host: str, port: int) -> bytes | None:
    try:
        return memcached(host, port, b"get greeting\r\n")
    except OSError:
        return None


def maxbytes(host: str, port: int) -> int:
    for line in memcached(host, port, b"stats settings\r\n").decode().splitlines():
        if line.startswith("STAT maxbytes "):
            return int(line.split()[2])
    raise AssertionError("no maxbytes in stats settings")


def test_memcached_requested_at_create_serves_outside_the_container(flow):
    c, base = flow
    f = c.server.client_files
    env = {**os.environ, "REDDWARF_ENDPOINT": c.server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
           "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": c.token, "REDDWARF_CONFIG": "/nonexistent"}
    rest = httpx.Client(base_url=f"{base}/v1.0/{c.tenant}", headers={"X-Auth-Token": c.token}, timeout=60)
    sdk = Client(load_config(env=env))
    try:
        # Refused everywhere, with the field named, and nothing made.
        r = rest.post("/instances", json={"instance": {"name": "x", "flavorRef": "tiny", "volume": {"size": 1},
                                                       "services": ["redis"]}})
        assert r.status_code == 400 and "instance.services[0]" in r.text, r.text
        r = rest.post("/instances", json={"instance": {"name": "x", "flavorRef": "tiny", "volume": {"size": 1},
                                                       "services": "memcached"}})
        assert r.status_code == 400 and "instance.services" in r.text, r.text
        bad = subprocess.run([sys.executable, "-m", "reddwarf.client.cli", "instance", "create", "x", "--flavor",
                              "tiny", "--service", "memcached", "--service", "memcached", "--no-wait"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "instance.services[1]" in bad.stdout + bad.stderr
        assert rest.get("/instances").json()["instances"] == []

        made = subprocess.run([sys.executable, "-m", "reddwarf.client.cli", "instance", "create", "cache-db",
                               "--flavor", "tiny", "--size", "1", "--database", "shop", "--memcached",
                               "--no-wait", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        iid = json.loads(made.stdout)["id"]
        inst = sdk.wait_for(iid, "ACTIVE", timeout=300)
        inst = until(lambda: sdk.get_instance(iid), lambda i: "memcached" in i.health.services, 60,
                     "memcached in the guest's health")
        assert list(inst.services) == ["memcached"]
        mysql, cache = inst.endpoints
        assert (mysql.service, cache.service, cache.port, cache.host) == ("mysql", "memcached", 11211, mysql.host)

        # The Trove JSON shows it, and the health the guest reports.
        body = rest.get(f"/instances/{iid}").json()["instance"]
        assert body["status"] == "ACTIVE", body
        assert body["services"] == [{"name": "memcached", "address": mysql.host, "port": 11211,
                                     "status": "RUNNING"}]
        assert [a["port"] for a in body["addresses"]] == [mysql.port]  # addresses stay MySQL's
        doc = httpx.get(f"{base}/openapi.json").json()  # and it is the shape the OpenAPI document declares
        declared = doc["paths"]["/v1.0/{tenant}/instances/{instance_id}"]["get"]["responses"]["200"]
        jsonschema.Draft202012Validator({**declared["content"]["application/json"]["schema"],
                                         "components": doc["components"]}).validate({"instance": body})
        shown = subprocess.run([sys.executable, "-m", "reddwarf.client.cli", "instance", "show", "cache-db",
                                "-f", "value", "-c", "services"], env=env, capture_output=True, text=True,
                               timeout=60)
        assert shown.stdout.strip() == f"memcached {mysql.host}:11211 RUNNING", shown

        # From the host, outside the container: set and get through the endpoint.
        assert memcached(cache.host, cache.port, b"set greeting 0 0 5\r\nhello\r\n", b"\r\n") == b"STORED\r\n"
        assert memcached(cache.host, cache.port, b"get greeting\r\n") == b"VALUE greeting 0 5\r\nhello\r\nEND\r\n"
        assert maxbytes(cache.host, cache.port) == 32 * 2**20  # tiny: 256 MB / 8
        # It listens on the instance's own address only, TCP only (read from the host's process table).
        argv = memcached_argv(cache.host)
        assert argv[argv.index("-l") + 1] == cache.host and argv[argv.index("-U") + 1] == "0", argv

        # A resize gives it the new flavor's share (a cache: it starts empty).
        sdk.resize_flavor(iid, "small")
        until(lambda: sdk.get_instance(iid), lambda i: i.flavor.endswith("small") and i.task == "", 300)
        assert until(lambda: maxbytes(cache.host, cache.port), lambda n: n == 64 * 2**20, 60)

        # Stopped, the container is down and memcached with it; started, the agent brings it back (empty).
        sdk.stop_instance(iid)
        until(lambda: sdk.get_instance(iid), lambda i: i.task == "" and i.status == pb.INSTANCE_STATUS_SHUTDOWN, 180,
              "stopped")
        with pytest.raises(OSError):
            memcached(cache.host, cache.port, b"version\r\n", b"\r\n")
        sdk.start_instance(iid)
        sdk.wait_for(iid, "ACTIVE", timeout=240)
        assert until(lambda: memcached_or_none(cache.host, cache.port), lambda out: out == b"END\r\n", 60)
        assert sdk.get_instance(iid).health.services["memcached"] == cpb.SERVICE_STATE_RUNNING

        sdk.delete_instance(iid)
        until(lambda: [i.id for i in sdk.list_instances()], lambda ids: iid not in ids, 180)
    finally:
        for i in sdk.list_instances():
            sdk.delete_instance(i.id)
        until(lambda: list(sdk.list_instances()), lambda left: not left, 180)
        rest.close()
        sdk.close()
