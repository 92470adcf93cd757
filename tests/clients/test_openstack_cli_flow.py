"""The whole tenant flow through the unmodified `openstack database` CLI (python-openstackclient with
python-troveclient's plugin, run as the real `openstack` executable; keystoneauth's admin_token auth: no
Keystone, the gateway's URL as the endpoint) → the REST gateway → the real system: create with a database
and a user; the database and user lists show exactly the tenant's; backup create, list and show; resize to
another flavor; delete."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures import waiting

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC")]

OPENSTACK = Path(sys.executable).with_name("openstack")


class Openstack:
    """The `openstack` executable with admin_token auth against the gateway; nothing from the caller's
    OS_* environment leaks in."""

    def __init__(self, endpoint: str, token: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
        self.env.update({"OS_AUTH_TYPE": "admin_token", "OS_ENDPOINT": endpoint, "OS_TOKEN": token})
        self.endpoint, self.token = endpoint, token

    def rest(self, path: str) -> Any:
        """The gateway's JSON for path ({} unless 200), read directly: a cheap way to wait, where each
        `openstack` run costs seconds of CPU."""
        r = httpx.get(f"{self.endpoint}{path}", headers={"X-Auth-Token": self.token}, timeout=30)
        return r.json() if r.status_code == 200 else {}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(OPENSTACK), *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check:
            assert done.returncode == 0, f"openstack {' '.join(args)}: {done.stderr[-2000:]}"
            assert "Traceback" not in done.stderr and "KeyError" not in done.stderr, done.stderr
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-f", "json").stdout)

    def until(self, args: tuple[str, ...], pred: Any, ready: Any, timeout: float = 300, what: str = "condition"
              ) -> Any:
        """`openstack args` once pred holds for its JSON. `ready` (the same state read over REST) is waited on
        first, so the CLI runs about once instead of every few seconds of the wait; its output is still what
        pred judges."""
        deadline = time.monotonic() + timeout
        waiting.until(ready, bool, timeout=timeout, what=f"{what} (over REST)")
        while True:
            value = self.json(*args)
            if pred(value):
                return value
            assert time.monotonic() < deadline, f"{what} not reached after {timeout:.0f}s; last: {value}"
            time.sleep(0.5)


@pytest.mark.skipif(not OPENSTACK.exists(), reason="python-openstackclient is not installed in this venv")
def test_openstack_database_cli_full_flow(flow):
    c, base = flow
    osc = Openstack(f"{base}/v1.0/{c.tenant}", c.token)
    made = osc.json("database", "instance", "create", "osc-flow", "--flavor", "tiny", "--size", "1",
                    "--databases", "shop", "--users", "app:app-pw-123")
    iid = made["id"]
    try:
        def rest_instance() -> Any:
            return osc.rest(f"/instances/{iid}").get("instance", {})

        shown = osc.until(("database", "instance", "show", iid), lambda i: i["status"] in ("ACTIVE", "ERROR"),
                          lambda: rest_instance().get("status") in ("ACTIVE", "ERROR"), what="ACTIVE")
        assert shown["status"] == "ACTIVE", shown
        assert shown["name"] == "osc-flow" and shown["flavor"] == "tiny" and shown["volume"] == 1
        assert shown["datastore"] == "mariadb" and shown["operating_status"] == "HEALTHY", shown
        listed = {i["ID"]: i for i in osc.json("database", "instance", "list")}
        assert listed[iid]["Name"] == "osc-flow" and listed[iid]["Status"] == "ACTIVE"
        assert listed[iid]["Operating Status"] == "HEALTHY" and listed[iid]["Addresses"], listed[iid]

        # Exactly the tenant's: no system schema, no lost+found, no internal account.
        assert osc.json("database", "db", "list", iid) == [{"Name": "shop"}]
        users = osc.json("database", "user", "list", iid)
        assert users == [{"Name": "app", "Host": "%", "Databases": "shop"}], users
        osc.run("database", "db", "create", iid, "reports")
        assert [d["Name"] for d in osc.json("database", "db", "list", iid)] == ["reports", "shop"]

        backup = osc.json("database", "backup", "create", "osc-backup", "-i", iid)
        bid = backup["id"]
        done = osc.until(("database", "backup", "show", bid), lambda b: b["status"] in ("COMPLETED", "FAILED"),
                         lambda: osc.rest(f"/backups/{bid}").get("backup", {}).get("status") in (
                             "COMPLETED", "FAILED"), what="backup COMPLETED")
        assert done["status"] == "COMPLETED", done
        assert done["instance_id"] == iid and done["name"] == "osc-backup"
        assert done["datastore"] == "mariadb" and done["datastore_version_id"], done
        listed_backups = osc.json("database", "backup", "list")
        assert [(b["ID"], b["Status"]) for b in listed_backups] == [(bid, "COMPLETED")], listed_backups
        assert [b["ID"] for b in osc.json("database", "backup", "list", "--instance-id", iid)] == [bid]

        osc.run("database", "instance", "resize", "flavor", iid, "small")
        resized = osc.until(("database", "instance", "show", iid),
                            lambda i: i["flavor"] == "small" and i["status"] in ("ACTIVE", "ERROR"),
                            lambda: rest_instance().get("flavor", {}).get("id") == "small"
                            and rest_instance().get("status") in ("ACTIVE", "ERROR"), what="resized to small")
        assert resized["status"] == "ACTIVE", resized
        assert [d["Name"] for d in osc.json("database", "db", "list", iid)] == ["reports", "shop"]

        osc.run("database", "backup", "delete", bid)
        osc.run("database", "instance", "delete", iid)
        osc.until(("database", "instance", "list"), lambda rows: iid not in {r["ID"] for r in rows},
                  lambda: iid not in {i["id"] for i in osc.rest("/instances").get("instances", [{"id": iid}])},
                  timeout=180, what="instance gone")
    finally:
        left = [r["ID"] for r in osc.json("database", "instance", "list")]
        for other in left:
            osc.run("database", "instance", "delete", other, check=False)


def test_openstack_executable_is_the_unmodified_one() -> None:
    """The flow above must drive the published CLI, not a copy patched for us."""
    if not OPENSTACK.exists():
        pytest.skip("python-openstackclient is not installed in this venv")
    from importlib import metadata
    files = metadata.distribution("python-troveclient").files or []
    record = {str(f): f.hash.value for f in files if f.hash is not None}
    import base64
    import hashlib
    for rel in ("troveclient/osc/v1/database_instances.py", "troveclient/osc/v1/database_backups.py",
                "troveclient/v1/instances.py", "troveclient/v1/backups.py"):
        data = Path(str(metadata.distribution("python-troveclient").locate_file(rel))).read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert record[rel] == digest, f"{rel} differs from the installed wheel's RECORD"
    assert shutil.which("openstack", path=str(OPENSTACK.parent)) == str(OPENSTACK)
