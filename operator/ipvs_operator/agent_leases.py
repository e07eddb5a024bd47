"""Which node agents are alive, from their Leases (the shell; the rule is
:class:`ipvs_api.leases.Liveness`).

An agent reports in its IPVSNode that it announces an address on layer 2; when it stops, it
says so before it exits, but an agent that dies says nothing. Its Lease tells: deleted when
the agent stops, stale once its duration has passed without a renewal. The operator names in
a VirtualServer's status only nodes whose agent is alive, so the status moves with the VIP
when an agent crashes, not when someone cleans up its IPVSNode; and it sets aside every
announcement and health verdict of a node whose Lease is stale
(:func:`ipvs_operator.status.live_reports`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ipvs_api.leases import COMPONENT, LABEL_COMPONENT, Liveness, read_lease
from ipvs_operator import kube

log = logging.getLogger(__name__)

#: How often staleness is judged (a Lease goes stale without any event).
TICK = 0.5
#: A watch that brings nothing for this long is taken for a dead connection.
READ_TIMEOUT = 330.0


class AgentLeases:
    """Keeps ``changed`` told of the nodes whose agent holds a fresh Lease and of those whose
    Lease is stale (``changed(alive, stale)``); a node with no Lease is in neither.

    Nothing is told until the first list succeeded: until then the reports stand as they are.
    While the Leases cannot be watched nothing is told either, and on the next list the time
    this operator could not see counts against no agent: an API server that was away a few
    seconds must not make every agent look dead.
    """

    def __init__(
        self,
        client: kube.Kube,
        namespace: str,
        changed: Callable[[frozenset[str], frozenset[str]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.changed = changed
        self.clock = clock
        self.liveness = Liveness()
        self._items: dict[str, dict[str, Any]] = {}
        self._told: tuple[frozenset[str], frozenset[str]] | None = None
        self._synced = False
        #: Since when the Leases cannot be watched (None: they can, or were never listed).
        self._blind_since: float | None = None

    def evaluate(self) -> None:
        """Judge the Leases now; tell ``changed`` when the live or the stale set moved."""
        if not self._synced:
            return
        now = self.clock()
        records = [r for r in map(read_lease, self._items.values()) if r is not None]
        self.liveness.observe(records, now)
        judged = (
            frozenset(r.node for r in self.liveness.alive(now)),
            frozenset(r.node for r in self.liveness.stale(now)),
        )
        if judged != self._told:
            self._told = judged
            self.changed(*judged)

    async def run(self) -> None:
        """Task body: list and watch the agents' Leases for ever, judging them every tick."""
        ticker = asyncio.create_task(self._tick(), name="agent leases tick")
        failures = 0
        try:
            while True:
                try:
                    await self._list_and_watch()
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # RBAC, API server away: the reports stand
                    self.blind()
                    failures += 1
                    if failures in (1, 10) or failures % 100 == 0:
                        log.warning("cannot watch the agents' Leases: %s", _short(error))
                    await asyncio.sleep(2.0)
        finally:
            ticker.cancel()

    def blind(self) -> None:
        """The Leases cannot be watched any more: judge nobody until they are listed again."""
        if self._synced:
            self._blind_since = self.clock()
        self._synced = False

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self.evaluate()

    async def _list_and_watch(self) -> None:
        path = kube.lease_path(self.namespace)
        selector = f"{LABEL_COMPONENT}={COMPONENT}"
        listed = await self.client.request(
            "GET", path, params={"labelSelector": selector}, timeout=30.0
        )
        if self._blind_since is not None:
            self.liveness.unseen(self._blind_since, self.clock())
            self._blind_since = None
        self._items = {
            str((item.get("metadata") or {}).get("name")): item
            for item in listed.get("items") or []
        }
        self._synced = True
        self.evaluate()
        version = str((listed.get("metadata") or {}).get("resourceVersion") or "")
        params = {
            "labelSelector": selector,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "300",
        }
        async for event in self.client.stream(path, params, READ_TIMEOUT):
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":  # typically 410 Gone: list again
                return
            if kind == "BOOKMARK":
                continue
            name = str((obj.get("metadata") or {}).get("name"))
            if kind == "DELETED":
                self._items.pop(name, None)
            else:
                self._items[name] = obj
            self.evaluate()


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]
