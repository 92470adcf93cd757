"""The `reddwarf` CLI against the real server: tables, --json, one-line errors and exit codes (Typer's
runner), and one run in a real terminal (pty) creating an instance with the live progress display."""
from __future__ import annotations

import json
import os
import sys
import time

import pexpect
import pytest
from typer.testing import CliRunner

from reddwarf.client import cli
from reddwarf.v1 import database_pb2
from tests.fixtures.server import start_server

from .tenant import new_tenant


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("cli")) as server:
        _, token = new_tenant(server, "c")
        f = server.client_files
        yield {"REDDWARF_ENDPOINT": server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
               "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": token, "REDDWARF_CONFIG": "/nonexistent"}


def invoke(env, *args):
    cli.State.factory = None
    return CliRunner().invoke(cli.app, list(args), env=env)


def test_flavor_list_prints_a_table(env):
    r = invoke(env, "flavor", "list")
    assert r.exit_code == 0, r.output
    assert "small" in r.output and "512" in r.output


def test_json_output_is_machine_readable(env):
    r = invoke(env, "--json", "flavor", "list")
    assert r.exit_code == 0
    assert {f["id"] for f in json.loads(r.output)} == {"tiny", "small", "medium", "large"}


def test_errors_are_one_line_with_the_field_and_a_nonzero_exit(env):
    r = invoke(env, "instance", "show", "no-such-instance")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1].startswith("error: NOT_FOUND: instance")
    assert "(field: name)" in r.output


def test_bad_token_is_unauthenticated(env):
    r = invoke({**env, "REDDWARF_TOKEN": "wrong"}, "flavor", "list")
    assert r.exit_code == 1 and "error: UNAUTHENTICATED" in r.output


def test_pki_init_refuses_to_overwrite(tmp_path, env):
    assert invoke(env, "pki", "init", str(tmp_path / "ca")).exit_code == 0
    r = invoke(env, "pki", "init", str(tmp_path / "ca"))
    assert r.exit_code == 2 and "already exists" in r.output
    r = invoke(env, "pki", "issue", str(tmp_path / "ca"), "wizard", "x", "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and "(field: role)" in r.output


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC")
def test_instance_create_in_a_terminal_shows_progress_and_exits_zero(flow):
    c, _ = flow
    f = c.server.client_files
    env = {**os.environ, "REDDWARF_ENDPOINT": c.server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
           "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": c.token, "REDDWARF_CONFIG": "/nonexistent",
           "COLUMNS": "160"}
    child = pexpect.spawn(sys.executable, ["-m", "reddwarf.client.cli", "instance", "create", "tty-db",
                                           "--flavor", "tiny", "--size", "1", "--database", "app"],
                          env=env, timeout=240, encoding="utf-8")
    child.expect("BUILD")  # the live display, driven by WatchInstance
    child.expect("ACTIVE")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    r = pexpect.run(f"{sys.executable} -m reddwarf.client.cli instance show nope", env=env, withexitstatus=True,
                    encoding="utf-8")
    assert r[1] == 2 and "error: NOT_FOUND" in r[0]
    for i in c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances:
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=i.name), metadata=c.md)
    deadline = time.monotonic() + 120
    while c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances:
        assert time.monotonic() < deadline
        time.sleep(0.5)
