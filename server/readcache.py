"""A read-through cache for state-DB rows that change rarely and are read on every call (flavors), with
staleness bounded both ways, as auth's cache (server/auth.py):
- a change committed through this process's sessions to any watched model drops the cache at commit, so
  this server never serves what it has itself replaced;
- a change made by another server sharing the state DB is seen within `ttl` seconds. ttl 0: no cache.
Misses (NotFound) are never cached: a caller probing names cannot evict the real entries."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

K = TypeVar("K")
V = TypeVar("V")


class ReadCache(Generic[K, V]):
    def __init__(self, ttl: float, sessions: sessionmaker[Session], watched: tuple[type, ...],
                 max_entries: int = 10_000) -> None:
        self.ttl, self.max_entries, self.watched = ttl, max_entries, watched
        self.generation = 0
        self._lock = threading.Lock()
        self._items: dict[K, tuple[float, V]] = {}
        flag = f"reddwarf_readcache_{id(self)}"

        def after_flush(session: Session, _ctx: Any) -> None:
            if any(isinstance(o, watched) for o in (*session.new, *session.dirty, *session.deleted)):
                session.info[flag] = True

        def after_commit(session: Session) -> None:
            if session.info.pop(flag, False):
                self.invalidate()

        event.listen(sessions, "after_flush", after_flush)
        event.listen(sessions, "after_commit", after_commit)

    def invalidate(self) -> None:
        with self._lock:
            self.generation += 1
            self._items.clear()

    def get(self, key: K, load: Callable[[], V]) -> V:
        """The cached value, or `load()` (which raises for a miss such as NotFound: nothing is stored)."""
        hit = self._items.get(key)
        if hit is not None and hit[0] >= time.monotonic():
            return hit[1]
        generation = self.generation
        value = load()
        if self.ttl > 0:
            with self._lock:
                if generation == self.generation:  # no commit raced the read: the value is current
                    if len(self._items) >= self.max_entries:
                        self._items.clear()
                    self._items[key] = (time.monotonic() + self.ttl, value)
        return value
