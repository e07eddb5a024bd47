"""The agents' Leases: how an agent says it is alive and what the others need to elect.

Shared by the agent (which writes its own Lease and reads everyone's to elect the node that
announces each VIP on layer 2) and the operator (which names in a VirtualServer's status only
nodes whose agent is alive, and sets aside what an agent whose Lease is stale said). One
``coordination.k8s.io`` Lease per agent, ``ipvs-agent-<node>`` in the agents' namespace,
carrying the node's labels and the VIPs it cannot serve.

Liveness is judged as client-go judges a Lease: the holder is alive until ``duration`` has
passed since *this* node last saw its record change, so no two clocks are ever compared
(:class:`Liveness`, pure). One more condition keeps a slow observer from declaring others
dead: a Lease is stale only once this node has seen one of its *own* renewals that it wrote
after the other's deadline. The watch delivers events in commit order, so by then any renewal
the other made in time has been seen; an observer whose watch lags (a throttled CPU, a long
pause) waits for it instead of taking over VIPs that are still answered. An agent that stops
deletes its Lease first (a planned handover is as fast as a watch event); one that dies is
replaced once its Lease is stale.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ipvs_api.types import IPAddress

LEASE_PREFIX: Final = "ipvs-agent-"
COMPONENT: Final = "agent-lease"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
ANNOTATION_LABELS: Final = "ipvs.io/node-labels"
ANNOTATION_UNREADY: Final = "ipvs.io/unready"


@dataclass(frozen=True)
class LeaseRecord:
    """One agent's Lease, as the others read it."""

    node: str
    holder: str
    duration: float
    renewed: str
    labels: Mapping[str, str] = field(default_factory=dict)
    unready: frozenset[IPAddress] = frozenset()


def lease_name(node: str) -> str:
    return f"{LEASE_PREFIX}{node}"[:253]


def read_lease(obj: Mapping[str, Any]) -> LeaseRecord | None:
    """A Lease object as a record (None: not an agent's Lease, or unreadable)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    holder = str(spec.get("holderIdentity") or "")
    if not holder:
        return None
    annotations = meta.get("annotations") or {}
    try:
        labels = json.loads(annotations.get(ANNOTATION_LABELS) or "{}")
        unready = frozenset(
            ipaddress.ip_address(a)
            for a in (annotations.get(ANNOTATION_UNREADY) or "").split(",")
            if a
        )
    except ValueError:
        return None
    return LeaseRecord(
        node=holder,
        holder=holder,
        duration=float(spec.get("leaseDurationSeconds") or 0),
        renewed=str(spec.get("renewTime") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        unready=unready,
    )


class Liveness:
    """The agents alive as this node sees them: a Lease is fresh until its duration has passed
    since this node last saw its ``renewTime`` change. Pure: the caller passes the clock."""

    def __init__(self, me: str | None = None) -> None:
        #: This node: its own renewals, once seen, are the proof that the view is current.
        self.me = me
        self._seen: dict[str, tuple[str, float]] = {}
        self._records: dict[str, LeaseRecord] = {}
        self._proof = float("-inf")

    def observe(
        self,
        records: Iterable[LeaseRecord],
        now: float,
        written: Callable[[str], float | None] = lambda renewed: None,
    ) -> None:
        """The Leases as they are now (a Lease that is gone is gone at once). ``written``
        gives the time this node wrote one of its own ``renewTime`` values (None: unknown,
        then the time it is seen counts)."""
        current = {r.node: r for r in records}
        for node in list(self._seen):
            if node not in current:
                del self._seen[node]
        for node, record in current.items():
            before = self._seen.get(node)
            if before is None or before[0] != record.renewed:
                self._seen[node] = (record.renewed, now)
                if node == self.me:
                    at = written(record.renewed)
                    self._proof = max(self._proof, now if at is None else at)
        self._records = current

    def _alive(self, node: str, record: LeaseRecord, now: float) -> bool:
        deadline = self._seen[node][1] + record.duration
        if now < deadline:
            return True
        # Past its deadline: stale once this node saw a renewal of its own written after it.
        return self.me is not None and node != self.me and self._proof < deadline

    def awaiting_proof(self, now: float) -> bool:
        """Some Lease is past its deadline, but this node has not yet seen a renewal of its
        own written after it: renewing at once settles it."""
        return any(
            node != self.me and now >= self._seen[node][1] + record.duration
            and self._alive(node, record, now)
            for node, record in self._records.items()
        )  # fmt: skip

    def refresh(self, now: float) -> None:
        """Count every Lease as renewed ``now`` (after this node could not see them)."""
        self._seen = {node: (renewed, now) for node, (renewed, _) in self._seen.items()}

    def unseen(self, since: float, now: float) -> None:
        """This node could not see the Leases from ``since`` until ``now``: that time counts
        against nobody (each Lease keeps the time it had left, a stale one stays stale)."""
        gap = max(0.0, now - since)
        self._seen = {node: (renewed, at + gap) for node, (renewed, at) in self._seen.items()}

    def alive(self, now: float) -> list[LeaseRecord]:
        return [
            record
            for node, record in sorted(self._records.items())
            if self._alive(node, record, now)
        ]

    def stale(self, now: float) -> list[LeaseRecord]:
        """The Leases still there but not renewed in time: their agents died (a stopping
        agent deletes its Lease), or cannot reach the API server."""
        return [
            record
            for node, record in sorted(self._records.items())
            if not self._alive(node, record, now)
        ]

    def next_expiry(self, now: float) -> float | None:
        """When the next alive Lease goes stale, to re-elect right then."""
        times = [
            self._seen[n][1] + r.duration
            for n, r in self._records.items()
            if now < self._seen[n][1] + r.duration
        ]
        return min(times) if times else None
