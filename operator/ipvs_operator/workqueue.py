"""A de-duplicating work queue, as in client-go: each key is processed by one worker at a time.

Events only mark keys dirty; reconcilers read the current state when they run. So a burst of
events for one object costs one reconcile, and a key that changes while being processed is
processed again afterwards rather than concurrently.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: The operator's work items: ("vs", namespace, name), ("svc", namespace, name), ("pool", "", name),
#: ("sessions", "", node).
Key = tuple[str, str, str]
VS: Final = "vs"
SVC: Final = "svc"
POOL: Final = "pool"
#: A node's BGP sessions to tell as Events (:meth:`Controller.tell_sessions`).
SESSIONS: Final = "sessions"


class WorkQueue(Generic[K]):
    def __init__(self, base_delay: float = 0.2, max_delay: float = 60.0) -> None:
        self._order: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._failures: dict[K, int] = {}
        self._wakeup = asyncio.Event()
        self._base = base_delay
        self._max = max_delay

    def __len__(self) -> int:
        return len(self._dirty)

    def add(self, key: K) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._order.append(key)
            self._wakeup.set()

    def add_after(self, key: K, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.add, key)

    async def get(self) -> K:
        while not self._order:
            self._wakeup.clear()
            await self._wakeup.wait()
        key = self._order.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._order.append(key)
            self._wakeup.set()

    def retry(self, key: K) -> float:
        """Schedule ``key`` again with exponential backoff; returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self._base * (1 << min(failures, 30)), self._max)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)
