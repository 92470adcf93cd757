"""Locks by name for hostd's operations: one per container and per volume, so that work on different
instances (mkfs, lxc-copy, lxc-start: seconds each) runs in parallel while two operations on the same
container or volume still run one after the other.

Deadlock-free by construction: `hold` takes every name an operation needs at once, in sorted order, and no
caller takes a second `hold` inside a first one. The host's short allocation lock is only ever taken inside a
`hold`, never the other way round.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_waits = threading.local()


def take_waited() -> float:
    """Seconds this thread spent waiting for NamedLocks since the last call (for the operation log)."""
    waited: float = getattr(_waits, "seconds", 0.0)
    _waits.seconds = 0.0
    return waited


def container_key(cid: str) -> str:
    return f"container:{cid}"


def volume_key(vid: str) -> str:
    return f"volume:{vid}"


class NamedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        # name -> (its lock, how many threads hold or wait for it); an entry goes when nobody does.
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def _ref(self, name: str) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(name, (threading.Lock(), 0))
            self._locks[name] = (lock, users + 1)
            return lock

    def _unref(self, name: str) -> None:
        with self._guard:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)

    @contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        """Holds the locks of every non-empty name given (duplicates are fine) until the block ends."""
        wanted = sorted({n for n in names if n})
        held: list[tuple[str, threading.Lock]] = []
        asked = time.monotonic()
        try:
            for name in wanted:
                lock = self._ref(name)
                try:
                    lock.acquire()
                except BaseException:
                    self._unref(name)
                    raise
                held.append((name, lock))
            _waits.seconds = getattr(_waits, "seconds", 0.0) + time.monotonic() - asked
            yield
        finally:
            for name, lock in reversed(held):
                lock.release()
                self._unref(name)

    def held(self) -> list[str]:
        """The names held or waited for now (for tests and debugging)."""
        with self._guard:
            return sorted(self._locks)
