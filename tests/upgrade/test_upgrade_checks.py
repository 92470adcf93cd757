"""What UpgradeInstance refuses before anything changes (no server, a SQLite state DB), and the template
names a datastore version and revision map to."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.errors import FailedPrecondition, InvalidArgument
from reddwarf.common.states import InstanceStatus
from reddwarf.hostd import template
from reddwarf.server import db, models
from reddwarf.server.catalog import template_for
from reddwarf.server.upgrade import KIND, submit_upgrade, version_key
from tests.server.test_instance_parts import add_instance, healthy


@pytest.fixture
def session(tmp_path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{tmp_path}/state.db")
    models.Base.metadata.create_all(engine)
    with sessionmaker(bind=engine, expire_on_commit=False)() as s:
        db.seed(s)
        s.add(models.Tenant(id="t1"))
        s.flush()
        yield s
    engine.dispose()


def counts(s: Session) -> tuple[int, int]:
    return s.scalar(select(func.count()).select_from(models.Task)), s.scalar(select(func.count()).select_from(models.Backup))


@pytest.mark.parametrize(("version", "field", "words"), [
    ("", "datastore_version", "required"),
    ("12.9", "datastore_version", "no active version"),
    ("10.11", "datastore_version", "already"),
    ("x" * 65, "datastore_version", "64"),
])
def test_a_bad_version_is_invalid_argument_naming_the_field(session: Session, version, field, words) -> None:
    row = add_instance(session, "i1", status=InstanceStatus.ACTIVE, **healthy())
    with pytest.raises(InvalidArgument) as exc:
        submit_upgrade(session, row, version)
    assert exc.value.violations[0][0] == field and words in exc.value.message
    assert counts(session) == (0, 0) and row.last_upgrade is None


def test_a_downgrade_is_refused(session: Session) -> None:
    row = add_instance(session, "i1", status=InstanceStatus.ACTIVE, **healthy())
    row.datastore_version = "11.8"
    with pytest.raises(InvalidArgument) as exc:
        submit_upgrade(session, row, "10.11")
    assert exc.value.violations[0][0] == "datastore_version" and "older" in exc.value.message
    assert counts(session) == (0, 0)


def test_an_instance_not_active_is_failed_precondition(session: Session) -> None:
    row = add_instance(session, "i1", status=InstanceStatus.ERROR, **healthy())
    with pytest.raises(FailedPrecondition) as exc:
        submit_upgrade(session, row, "11.8")
    assert exc.value.violations[0][0] == "name" and "ERROR" in exc.value.message
    assert counts(session) == (0, 0)


def test_an_attached_configuration_group_must_be_detached_first(session: Session) -> None:
    row = add_instance(session, "i1", status=InstanceStatus.ACTIVE, **healthy())
    session.add(models.Configuration(id="g1", tenant_id="t1", display_name="g", datastore="mariadb",
                                     datastore_version="10.11", values={}))
    session.add(models.InstanceConfiguration(instance_id="i1", configuration_id="g1"))
    session.flush()
    with pytest.raises(FailedPrecondition) as exc:
        submit_upgrade(session, row, "11.8")
    assert exc.value.violations[0][0] == "configuration"
    assert counts(session) == (0, 0)


def test_a_valid_upgrade_adds_its_backup_and_task(session: Session) -> None:
    row = add_instance(session, "i1", status=InstanceStatus.ACTIVE, **healthy())
    task = submit_upgrade(session, row, "11.8")
    assert task.kind == KIND and task.params["from"] == "10.11" and task.params["to"] == "11.8"
    b = session.get(models.Backup, task.params["backup_id"])
    assert b is not None and b.status == "NEW" and b.instance_id == "i1"
    assert row.last_upgrade is not None and row.last_upgrade["outcome"] == "RUNNING"
    with pytest.raises(FailedPrecondition):  # busy now
        submit_upgrade(session, row, "11.8")


def test_a_template_revision_of_the_same_version_is_allowed(session: Session) -> None:
    row = add_instance(session, "i1", status=InstanceStatus.ACTIVE, **healthy())
    task = submit_upgrade(session, row, "10.11", revision=2)
    assert task.params["template_revision"] == 2 and task.params["to"] == "10.11"


def test_versions_compare_as_numbers_and_map_to_templates() -> None:
    assert version_key("9.9") < version_key("10.11") < version_key("11.8")
    assert template_for("mariadb", "10.11") == ""
    assert template_for("mariadb", "11.8") == "trixie"
    assert template_for("mariadb", "11.8", 2) == "trixie-r2"
    assert template_for("mariadb", "10.11", 1) == "bookworm-r1"
    assert template.parse_release("trixie-r2") == ("trixie", 2)
    assert template.parse_release("trixie") == ("trixie", 0)
    assert template.parse_release("rdtpl-89e12c8a4ac0") is None
    assert template.parse_release("trixie-r") is None
    # Revisions are new names; revision 0 keeps the name every existing bookworm template was built under.
    assert template.current_recipe("trixie", 2).name != template.current_recipe("trixie").name
    assert template.current_recipe().name == template.current_recipe("bookworm", 0).name
