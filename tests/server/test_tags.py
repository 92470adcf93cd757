"""Tags (server/tags.py) and the update masks (instance_validation.mask_paths): what is refused names its
field, updates by "tags" and "tags.<key>", and the tag filters run in SQL on SQLite and on MariaDB, on a
state DB migrated from 0003 (rows made before the migration get no tags and no deletion protection)."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.errors import InvalidArgument
from reddwarf.server import db, models, tags
from reddwarf.server.instance_validation import INSTANCE_PATHS, mask_paths


def refused(fn, *args) -> str:
    with pytest.raises(InvalidArgument) as e:
        fn(*args)
    return e.value.violations[0][0]


@pytest.mark.parametrize("bad", [
    {"": "v"}, {"k" * 129: "v"}, {"k": "v" * 257}, {" lead": "v"}, {"trail ": "v"}, {"a=b": "v"}, {'q"': "v"},
    {"back\\slash": "v"}, {"k": "semi;colon"}, {"k": "new\nline"}, {"reddwarf:owner": "me"}, {"RedDwarf:x": "y"},
    {f"k{n}": "v" for n in range(tags.MAX_TAGS + 1)},
])
def test_bad_tags_are_refused_naming_the_field(bad):
    assert refused(tags.validate_tags, bad, "instance.tags") == "instance.tags"


def test_good_tags_pass_sorted():
    good = {"env": "prod", "cost-center": "4711", "owner@team": "ann.b/ops", "ключ": "значение", "a:b": "",
            "eq": "a=b"}
    assert tags.validate_tags(good, "t") == dict(sorted(good.items()))
    assert len(tags.validate_tags({f"k{n}": "v" for n in range(tags.MAX_TAGS)}, "t")) == tags.MAX_TAGS


def test_paths_replace_set_and_remove():
    current = {"env": "prod", "team": "db"}
    assert tags.apply_paths(current, {"x": "1"}, ["tags"], "t") == {"x": "1"}
    assert tags.apply_paths(current, {"owner": "ann"}, ["tags.owner", "tags.team"], "t") == \
        {"env": "prod", "owner": "ann"}
    assert tags.apply_paths(current, {}, ["tags.absent"], "t") == current
    assert tags.apply_paths(None, {}, [], "t") == {}
    assert refused(tags.apply_paths, current, {}, ["tags.bad;key"], "t") == "update_mask"
    full = {f"k{n}": "v" for n in range(tags.MAX_TAGS)}
    assert refused(tags.apply_paths, full, {"one": "more"}, ["tags.one"], "instance.tags") == "instance.tags"


@pytest.mark.parametrize("paths", [[], ["flavor"], ["display_name", "display_name"], ["tags", "tags.k"],
                                   ["name"], ["status"]])
def test_bad_masks_are_refused(paths):
    assert refused(mask_paths, paths, INSTANCE_PATHS) == "update_mask"


def test_filters_parse_and_refuse():
    assert tags.parse_filters(["env=prod", "team", "eq=a=b", "empty="]) == \
        [("env", "prod"), ("team", None), ("eq", "a=b"), ("empty", "")]
    assert refused(tags.parse_filters, ["ok", 'bad"key=1']) == "tags[1]"
    assert refused(tags.parse_filters, ["k=v;"]) == "tags[0]"
    assert refused(tags.parse_filters, ["k"] * (tags.MAX_FILTERS + 1)) == "tags"


@pytest.fixture(params=["sqlite", "mariadb"])
def migrated(request: pytest.FixtureRequest, tmp_path) -> Iterator[tuple[sessionmaker[Session], str]]:
    """A state DB migrated to 0003, one instance and one backup made there, then migrated to head:
    (sessions, the old instance's id)."""
    if request.param == "sqlite":
        url, dbname = f"sqlite:///{tmp_path}/state.db", None
    else:
        mariadb = request.getfixturevalue("mariadb")
        dbname = f"rd_tags_{uuid.uuid4().hex[:10]}"
        with mariadb.connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{dbname}`")  # generated name, not user input
        url = mariadb.url(dbname)
    engine = create_engine(url)
    try:
        db.upgrade(url, "0003")
        old = str(uuid.uuid4())
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO tenants (id, display_name, quota_instances, quota_memory_mb, "
                                 "quota_volume_gb, quota_backups, quota_backup_bytes, created_at) VALUES "
                                 "('t', '', 1, 1, 1, 1, 1, CURRENT_TIMESTAMP)"))
            conn.execute(sa.text("INSERT INTO flavors (id, display_name, memory_mb, swap_mb, cpu_shares, "
                                 "cpu_limit_millicores, max_processes, max_open_files, io_weight, io_iops, "
                                 "io_bytes_per_sec, default_volume_gb) VALUES ('f', 'f', 1, 0, 1, 0, 1, 0, 1, 0, 0, 1)"))
            conn.execute(sa.text(
                "INSERT INTO instances (id, tenant_id, display_name, status, flavor_id, volume_size_gb, datastore, "
                "datastore_version, address, port, fault_message, fault_details, health, root_enabled, "
                "restored_from, create_params, created_at, updated_at) VALUES (:id, 't', 'old', 'ACTIVE', 'f', 1, "
                "'mariadb', '10.11', '', 0, '', '', '{}', 0, '', '{}', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                {"id": old})
        db.upgrade(url, "head")
        yield sessionmaker(engine, expire_on_commit=False), old
    finally:
        engine.dispose()
        if dbname is not None:
            with mariadb.connect() as conn, conn.cursor() as cur:
                cur.execute(f"DROP DATABASE `{dbname}`")


def test_rows_from_before_the_migration_have_no_tags_and_no_protection(migrated):
    sessions, old = migrated
    with sessions() as s:
        row = s.get(models.Instance, old)
        assert row is not None and row.tags == {} and row.deletion_protection is False


def test_tag_filters_run_in_sql(migrated):
    sessions, old = migrated
    made = {"a": {"env": "prod", "team": "db"}, "b": {"env": "dev", "odd key.x": "v=1"}, "c": {}}
    with sessions() as s, s.begin():
        for name, t in made.items():
            s.add(models.Instance(id=str(uuid.uuid4()), tenant_id="t", display_name=name, flavor_id="f",
                                  volume_size_gb=1, datastore="mariadb", datastore_version="10.11", tags=t))

    def names(*filters: str) -> set[str]:
        with sessions() as s:
            q = select(models.Instance.display_name).where(
                *tags.tag_conditions(models.Instance.tags, tags.parse_filters(list(filters))))
            return set(s.scalars(q))
    assert names() == {"a", "b", "c", "old"}
    assert names("env=prod") == {"a"}
    assert names("env") == {"a", "b"}
    assert names("env", "team=db") == {"a"}
    assert names("odd key.x=v=1") == {"b"}
    assert names("env=prod", "team=web") == set()
    with pytest.raises(InvalidArgument):  # quotes never reach SQL (and would be parameters if they did)
        names("team=db' OR '1'='1")
