"""A read-through cache for state-DB reads that are asked for far more often than they change (flavors, an
instance's view), with staleness bounded both ways, as auth's cache (server/auth.py):
- a change committed through this process's sessions to a watched model drops what it touches at commit
  (the keys `keys_of` names for the changed object, or everything), so this server never serves what it
  has itself replaced; an ORM UPDATE/DELETE statement on a watched model's table drops everything;
- a change made by another server sharing the state DB is seen within `ttl` seconds. ttl 0: no cache.
Misses (NotFound) are never cached: a caller probing names cannot evict the real entries."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

K = TypeVar("K")
V = TypeVar("V")

ALL: Any = object()  # in a session's pending set: drop every entry at commit


class ReadCache(Generic[K, V]):
    def __init__(self, ttl: float, sessions: sessionmaker[Session], watched: tuple[type, ...],
                 max_entries: int = 10_000, keys_of: Callable[[Any], Iterable[K] | None] | None = None) -> None:
        """keys_of(obj): the keys a change to the watched object `obj` makes stale (None: all of them).
        Without it any change to a watched object drops everything."""
        self.ttl, self.max_entries, self.watched = ttl, max_entries, watched
        self.generation = 0
        self._lock = threading.Lock()
        self._items: dict[K, tuple[float, V]] = {}
        flag = f"reddwarf_readcache_{id(self)}"
        tables = {m.__table__.name for m in watched if hasattr(m, "__table__")}

        def pending(session: Session) -> set[Any]:
            found: set[Any] = session.info.setdefault(flag, set())
            return found

        def after_flush(session: Session, _ctx: Any) -> None:
            for o in (*session.new, *session.dirty, *session.deleted):
                if isinstance(o, watched):
                    keys = keys_of(o) if keys_of is not None else None
                    if keys is None:
                        pending(session).add(ALL)
                    else:
                        pending(session).update(keys)

        def do_orm_execute(state: ORMExecuteState) -> None:
            # update(Task).where(...) and the like change rows the session never loads: drop everything.
            if (state.is_update or state.is_delete or state.is_insert) and \
                    getattr(getattr(state.statement, "table", None), "name", None) in tables:
                pending(state.session).add(ALL)

        def after_commit(session: Session) -> None:
            keys = session.info.pop(flag, None)
            if keys:
                self.invalidate(None if ALL in keys else keys)

        event.listen(sessions, "after_flush", after_flush)
        event.listen(sessions, "do_orm_execute", do_orm_execute)
        event.listen(sessions, "after_commit", after_commit)

    def invalidate(self, keys: Iterable[K] | None = None) -> None:
        """Drop `keys` (None: everything). Any read that started before is not stored (see get)."""
        with self._lock:
            self.generation += 1
            if keys is None:
                self._items.clear()
            else:
                for k in keys:
                    self._items.pop(k, None)

    def get(self, key: K, load: Callable[[], V], max_age: Callable[[V], float] | None = None) -> V:
        """The cached value, or `load()` (which raises for a miss such as NotFound: nothing is stored).
        max_age(value): how long this value may be kept at most, when less than ttl (a value derived from the
        clock, such as a status that turns SHUTDOWN when a heartbeat is due)."""
        hit = self._items.get(key)
        if hit is not None and hit[0] >= time.monotonic():
            return hit[1]
        generation = self.generation
        value = load()
        if self.ttl > 0:
            keep = self.ttl if max_age is None else min(self.ttl, max_age(value))
            if keep > 0:
                with self._lock:
                    if generation == self.generation:  # no commit raced the read: the value is current
                        if len(self._items) >= self.max_entries:
                            self._items.clear()
                        self._items[key] = (time.monotonic() + keep, value)
        return value
