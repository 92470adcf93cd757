"""Patching (issue 17, part 4): a datastore version gets a new template revision, and its instances move onto
it one at a time (same volume, new container), each inside its maintenance window.

`patch_version` records the revision on the version (new instances are created from it at once) and queues a
"patch" maintenance action for each live instance on an older revision. The action's handler is in
server/upgrade.py (`_patch`): an upgrade_instance task onto the revision, started only while no other patch
of the same version runs. A migration or evacuation recreates a container from the instance's own revision.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from reddwarf.common.errors import InvalidArgument

from . import maintenance, models

MAX_REVISION = 10_000


@dataclass(frozen=True)
class Patched:
    datastore: str
    version: str
    revision: int
    instances: list[str]


def patch_version(s: Session, datastore: str, version: str, revision: int, apply_now: bool = False) -> Patched:
    """Checks everything before changing anything (the caller's transaction rolls back on a raise)."""
    datastore = datastore or "mariadb"
    if len(datastore) > 64 or s.get(models.Datastore, datastore) is None:
        raise InvalidArgument(f"datastore {datastore[:64]!r} does not exist", field="datastore")
    if not version:
        raise InvalidArgument("version is required", field="version")
    dv = s.scalar(select(models.DatastoreVersion).where(
        models.DatastoreVersion.datastore_id == datastore, models.DatastoreVersion.version == version[:64]))
    if len(version) > 64 or dv is None:
        raise InvalidArgument(f"{datastore} has no version {version[:64]!r}", field="version")
    if not dv.active:
        raise InvalidArgument(f"{datastore} {dv.version} is not active", field="version")
    if not 1 <= revision <= MAX_REVISION:
        raise InvalidArgument(f"revision must be 1..{MAX_REVISION}", field="revision")
    if revision <= dv.template_revision:
        raise InvalidArgument(f"{datastore} {dv.version} is at template revision {dv.template_revision} already; "
                              "a patch names a newer one", field="revision")
    dv.template_revision = revision
    maintenance._finish_running(s)  # a patch whose task ended is closed, so this one is queued anew
    queued = []
    for row in s.scalars(select(models.Instance).where(
            models.Instance.datastore == datastore, models.Instance.datastore_version == dv.version,
            models.Instance.deleted_at.is_(None), models.Instance.template_revision < revision)
            .order_by(models.Instance.created_at, models.Instance.id)):
        action = maintenance.queue(s, row.id, "patch", f"move onto template revision {revision} of "
                                   f"{datastore} {dv.version}",
                                   {"datastore_version": dv.version, "revision": revision}, apply_now=apply_now)
        if action.state != maintenance.PENDING:
            # Its move onto an older revision is running: once it ends, the next patch of the version
            # (or UpgradeInstance with the revision) moves it on.
            continue
        # An older patch still pending is pointed at the newest revision instead of queued twice.
        action.params = {**action.params, "revision": revision}
        action.description = f"move onto template revision {revision} of {datastore} {dv.version}"
        queued.append(f"instances/{row.id}")
    return Patched(datastore, dv.version, revision, queued)
