"""Guest logs in the agent: the files' reads (tail, follow across a rotation, generations) and bounds, names
from the fixed set only, and against a real mariadbd the switches (SET GLOBAL and my.cnf), a slow query in
the slow log, and rotation with FLUSH ... LOGS so mysqld writes on into a fresh file."""
from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pymysql
import pytest

from reddwarf.agent.logs import LogFiles, ReadSpec
from reddwarf.agent.model import Prepare, User
from reddwarf.agent.mysql import MysqlDriver, MysqlSettings
from reddwarf.common.errors import FailedPrecondition, InvalidArgument
from tests.fixtures.mariadb import free_port
from tests.fixtures.waiting import until


def files(tmp_path: Path, max_bytes: int = 100, keep: int = 2) -> LogFiles:
    return LogFiles(str(tmp_path), max_bytes=max_bytes, keep=keep)


def test_tail_gives_the_last_lines_and_a_place_to_follow_from(tmp_path):
    f = files(tmp_path)
    Path(f.path("slow_query")).write_text("".join(f"line {n}\n" for n in range(10)))
    got = f.read(ReadSpec("slow_query", tail_lines=3))
    assert got.data == b"line 7\nline 8\nline 9\n" and got.eof
    with open(f.path("slow_query"), "a") as out:
        out.write("line 10\n")
    more = f.read(ReadSpec("slow_query", file_id=got.file_id, offset=got.next_offset))
    assert more.data == b"line 10\n" and more.file_id == got.file_id
    # a file with fewer lines than asked for comes whole; a missing one is empty, not an error
    assert f.read(ReadSpec("slow_query", tail_lines=100)).data.count(b"\n") == 11
    assert f.read(ReadSpec("general", tail_lines=5)).data == b""


def test_a_follow_reads_the_rest_of_a_rotated_file_then_goes_on_in_the_new_one(tmp_path):
    f = files(tmp_path, max_bytes=10)
    path = f.path("error")
    Path(path).write_text("old 1\n")
    first = f.read(ReadSpec("error", tail_lines=10))
    with open(path, "a") as out:
        out.write("old 2\n")  # written just before the rotation: must not be lost
    assert f.needs_rotation("error")
    f.rotate("error")
    Path(path).write_text("new 1\n")
    rest = f.read(ReadSpec("error", file_id=first.file_id, offset=first.next_offset))
    assert rest.data == b"old 2\n" and rest.generations == 1
    nxt = f.read(ReadSpec("error", file_id=rest.file_id, offset=rest.next_offset))
    assert nxt.data == b"new 1\n" and nxt.file_id != first.file_id


def test_rotation_keeps_a_bounded_number_of_generations(tmp_path):
    f = files(tmp_path, max_bytes=5, keep=2)
    for n in range(5):
        Path(f.path("general")).write_text(f"gen {n}\n")
        f.rotate("general")
    assert sorted(os.listdir(tmp_path)) == ["general.log.1", "general.log.2"]
    assert Path(f.path("general", 1)).read_text() == "gen 4\n"
    assert f.generations("general") == 2 and f.size("general") == 12
    assert f.read(ReadSpec("general", generation=2)).data == b"gen 3\n"
    with pytest.raises(InvalidArgument):
        f.read(ReadSpec("general", generation=3))


@pytest.mark.parametrize("name", ["../../etc/shadow", "error/../../x", "", "ERROR", "audit", "slow_query.log"])
def test_only_the_fixed_log_names_are_read(tmp_path, name):
    with pytest.raises(InvalidArgument) as e:
        files(tmp_path).read(ReadSpec(name))
    assert e.value.violations[0][0] == "log"


def test_a_log_replaced_by_a_link_or_a_fifo_is_not_read(tmp_path):
    f = files(tmp_path / "logs")
    os.makedirs(f.directory)
    secret = tmp_path / "admin.json"
    secret.write_text('{"password": "agent-secret"}')
    os.symlink(secret, f.path("general"))
    with pytest.raises(FailedPrecondition) as e:
        f.read(ReadSpec("general", tail_lines=10))
    assert e.value.violations[0][0] == "log"
    os.mkfifo(f.path("error"))
    with pytest.raises(FailedPrecondition):
        f.read(ReadSpec("error"))


def test_bad_read_values_are_refused(tmp_path):
    f = files(tmp_path)
    for spec, field in [(ReadSpec("error", offset=-1), "read_log"), (ReadSpec("error", tail_lines=10001), "tail_lines")]:
        with pytest.raises(InvalidArgument) as e:
            f.read(spec)
        assert e.value.violations[0][0] == field


def test_a_read_is_capped(tmp_path):
    f = files(tmp_path)
    Path(f.path("general")).write_bytes(b"x" * (600 * 1024))
    got = f.read(ReadSpec("general", max_bytes=10 << 20))
    assert len(got.data) == 256 * 1024 and not got.eof


# -- against a real mariadbd -------------------------------------------------------------------------
needs_mariadb = [pytest.mark.skipif(os.geteuid() != 0, reason="mariadb-install-db --user needs root"),
                 pytest.mark.skipif(not shutil.which("mariadb-install-db"), reason="MariaDB server package missing")]


@pytest.fixture
async def driver(tmp_path) -> AsyncIterator[MysqlDriver]:
    d = MysqlDriver(MysqlSettings(state_dir=str(tmp_path / "state"), datadir=str(tmp_path / "data"), run_as="root",
                                  port=free_port(), bind_address="127.0.0.1"))
    try:
        yield d
    finally:
        await d.close()


def text(d: MysqlDriver, log: str, lines: int = 200) -> str:
    return d._logs.files.read(ReadSpec(log, tail_lines=lines)).data.decode()


def variables(d: MysqlDriver) -> dict[str, str]:
    with d.admin.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN "
                    "('slow_query_log', 'general_log', 'long_query_time', 'log_error')")
        return {k: v for k, v in cur.fetchall()}


@pytest.mark.slow
async def test_real_mariadb_slow_log_general_log_and_rotation(driver: MysqlDriver, tmp_path) -> None:
    for mark in needs_mariadb:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    d = driver
    await d.prepare(Prepare(users=(User(name="app", password="s3cret-pw"),)))
    logs = d._logs
    # on the volume, beside mysqld's tmpdir; error and slow logs on, general off
    logs_dir = tmp_path / "data" / ".reddwarf-tmp" / "logs"
    assert variables(d)["log_error"] == str(logs_dir / "error.log")
    info = {i.log: i for i in await logs.list_logs()}
    assert (info["error"].enabled, info["slow_query"].enabled, info["general"].enabled) == (True, True, False)
    assert info["error"].size_bytes > 0 and "ready for connections" in text(d, "error")

    await logs.set_log("slow_query", True, 0.05)
    assert variables(d)["long_query_time"] == "0.050000"
    with pymysql.connect(host="127.0.0.1", port=d._port, user="app", password="s3cret-pw",
                         ssl_disabled=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT SLEEP(0.2) AS slow_marker")
    # mysqld writes a statement's slow-log entry after the client has its result
    until(lambda: text(d, "slow_query"), lambda t: "SELECT SLEEP(0.2) AS slow_marker" in t, timeout=5,
          what="the slow query in the slow log")

    await logs.set_log("general", True, 0)
    with pymysql.connect(host="127.0.0.1", port=d._port, user="app", password="s3cret-pw",
                         ssl_disabled=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT 'general_marker'")
    until(lambda: text(d, "general"), lambda t: "general_marker" in t, timeout=5, what="the general log entry")
    with pytest.raises(InvalidArgument):
        await logs.set_log("error", False, 0)

    # rotation: over the bound, each log moves to .1 and mysqld reopens a fresh file, losing nothing
    logs.max_bytes = 1
    assert sorted(logs.rotate_due()) == ["error", "general", "slow_query"]
    with pymysql.connect(host="127.0.0.1", port=d._port, user="app", password="s3cret-pw",
                         ssl_disabled=True) as conn, conn.cursor() as cur:
        cur.execute("SELECT SLEEP(0.2) AS after_rotation")
    until(lambda: text(d, "slow_query"), lambda t: "after_rotation" in t, timeout=5, what="a slow query after rotation")
    assert "slow_marker" not in text(d, "slow_query")
    assert "slow_marker" in (logs_dir / "slow_query.log.1").read_text()
    assert logs.files.generations("slow_query") == 1

    # the switches survive a restart (my.cnf)
    await logs.set_log("general", False, 0)
    await d.restart()
    v = variables(d)
    assert (v["general_log"], v["slow_query_log"], v["long_query_time"]) == ("OFF", "ON", "0.050000")
