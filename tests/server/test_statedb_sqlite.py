"""The embedded SQLite state database under several processes at once, and the URL forms db.py accepts."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text

from reddwarf.server import db


def test_processes_migrating_one_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    # All three start migrating at the same instant (after their imports), not staggered by start-up.
    code = ("import sys, time; from reddwarf.server import db; time.sleep(max(0, float(sys.argv[2]) - time.time())); "
            "db.upgrade(sys.argv[1])")
    at = str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, at], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1].decode()[-2000:] for o in outs]
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    finally:
        engine.dispose()
    assert versions == [ScriptDirectory.from_config(db.alembic_config(url)).get_current_head()]


def test_the_head_read_from_the_scripts_is_alembics_and_a_migrated_database_skips_alembic(tmp_path: Path) -> None:
    assert db.script_head() == ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_current_head()
    url = f"sqlite:///{tmp_path}/state.db"
    db.upgrade(url)
    # A start on a database at the head neither takes the schema lock nor imports Alembic (its cost).
    code = ("import sys; from reddwarf.server import db; db.upgrade(sys.argv[1]); "
            "print(any(m == 'alembic' or m.startswith('alembic.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    # One that is not at the head is migrated.
    command.downgrade(db.alembic_config(url), "0005_san")
    assert db._current_revision(url) == "0005_san"
    db.upgrade(url)
    assert db._current_revision(url) == db.script_head()


def test_a_multi_host_url_is_split_in_order() -> None:
    first, hosts = db.split_hosts("mysql+pymysql://u:p%40w@10.0.0.1:3306,10.0.0.2,10.0.0.3:3307/state?charset=utf8mb4")
    assert first == "mysql+pymysql://u:p%40w@10.0.0.1:3306/state?charset=utf8mb4"
    assert hosts == [("10.0.0.1", 3306), ("10.0.0.2", None), ("10.0.0.3", 3307)]


def test_a_comma_in_the_password_is_not_a_second_host() -> None:
    first, hosts = db.split_hosts("mysql+pymysql://u:a,b@10.0.0.1:3306/state")
    assert first == "mysql+pymysql://u:a,b@10.0.0.1:3306/state" and hosts == [("10.0.0.1", 3306)]
