"""Instance change notifications for WatchInstance: anything that may change what a user sees of an
instance (its row, its task's step or progress, its guest's health) pokes the bus; watchers re-read.
Changes made by other servers reach it through server/cluster.py's WatchNotifier, which polls what is watched."""
from __future__ import annotations

import asyncio
from collections import defaultdict


class EventBus:
    def __init__(self) -> None:
        self._subs: dict[str, set[asyncio.Queue[str]]] = defaultdict(set)

    def publish(self, instance_id: str, change: str = "updated") -> None:
        for q in list(self._subs.get(instance_id, ())):
            if q.qsize() < 100:  # a slow watcher loses intermediate pokes, never the latest state
                q.put_nowait(change)

    def subscribe(self, instance_id: str) -> asyncio.Queue[str]:
        q: asyncio.Queue[str] = asyncio.Queue()
        self._subs[instance_id].add(q)
        return q

    def unsubscribe(self, instance_id: str, q: asyncio.Queue[str]) -> None:
        self._subs[instance_id].discard(q)
        if not self._subs[instance_id]:
            del self._subs[instance_id]

    def watched(self) -> list[str]:
        """The instances someone on this server watches now."""
        return list(self._subs)
