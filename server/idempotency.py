"""Request ids on creates: a client that retries a create after UNAVAILABLE (it cannot know whether the first
attempt committed) sends the same UUID again and gets the resource the first attempt made, never a second one.

The id is stored on the resource's row under a unique constraint per tenant (instances, backups), so two
concurrent duplicates race on the constraint, not on a check-then-insert: the loser's insert fails (an
IntegrityError; on Galera a certification failure, which `run_transaction` re-runs into the lookup) and it
answers with the winner's row.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.errors import InvalidArgument

from .db import run_transaction

log = logging.getLogger(__name__)

T = TypeVar("T")


def parse_request_id(value: str, field: str = "request_id") -> str | None:
    """The canonical form of a client's request id (None when it gave none); anything but a UUID is refused,
    so ids from different clients cannot collide by accident and the column's width is never exceeded."""
    if not value:
        return None
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise InvalidArgument(f"{field} must be a UUID (e.g. {uuid.UUID(int=0)}), got {value[:64]!r}",
                              field=field) from None


def create_once(sessions: sessionmaker[Session], request_id: str | None,
                lookup: Callable[[Session], T | None], create: Callable[[Session], T]) -> T:
    """Runs `create` in a transaction unless `lookup` finds what an earlier attempt with this request id made.

    Both are whole units of work (run again after a conflict); `lookup` answers None when nothing carries the id.
    Without a request id this is just `create` in a transaction."""
    def work(s: Session) -> T:
        if request_id is not None:
            prior = lookup(s)
            if prior is not None:
                return prior  # a retried create returns what it made
        return create(s)

    try:
        return run_transaction(sessions, work)
    except IntegrityError:
        if request_id is None:
            raise
        # A concurrent attempt with the same id committed between our lookup and our insert: answer with its
        # row. Anything else that broke a constraint is not ours to hide, so it is raised again.
        prior = run_transaction(sessions, lookup)
        if prior is None:
            raise
        log.info("concurrent create with the same request id; answering with the first",
                 extra={"request_id": request_id})
        return prior
