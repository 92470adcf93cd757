"""Initialising the datadir survives the agent dying inside mariadb-install-db: a half-made datadir (marked
on the volume) is cleared and made again, while a datadir holding foreign files is never touched."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reddwarf.agent.mysql import MysqlDriver, MysqlSettings
from reddwarf.agent.mysqld import INIT_MARKER
from reddwarf.common.errors import FailedPrecondition

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="mariadb-install-db --user needs root"),
              pytest.mark.skipif(not shutil.which("mariadb-install-db"), reason="MariaDB server package missing")]


def driver(tmp_path) -> MysqlDriver:
    d = MysqlDriver(MysqlSettings(state_dir=str(tmp_path / "state"), datadir=str(tmp_path / "data"), run_as="root",
                                  port=0))
    d._write_my_cnf()
    return d


async def test_a_cut_off_initialisation_is_cleared_and_made_again(tmp_path):
    d = driver(tmp_path)
    data = Path(d.datadir)
    (data / "mysql").mkdir(parents=True)  # what a killed mariadb-install-db leaves: a partial system schema
    (data / "mysql" / "half.frm").write_bytes(b"\0" * 10)
    (data / "aria_log_control").write_bytes(b"x")
    (data / INIT_MARKER).touch()
    assert await d.mysqld.init_datadir(d.datadir) is True
    assert not (data / INIT_MARKER).exists()
    assert not (data / "mysql" / "half.frm").exists()
    assert (data / "mysql" / "global_priv.MAI").exists() or (data / "mysql" / "global_priv.MAD").exists()
    assert await d.mysqld.init_datadir(d.datadir) is False  # made: a second prepare leaves it alone


async def test_a_datadir_with_foreign_files_is_refused_and_left_alone(tmp_path):
    d = driver(tmp_path)
    data = Path(d.datadir)
    data.mkdir(parents=True)
    (data / "precious.txt").write_text("not ours")
    with pytest.raises(FailedPrecondition):
        await d.mysqld.init_datadir(d.datadir)
    assert (data / "precious.txt").read_text() == "not ours"
    assert not (data / INIT_MARKER).exists()
