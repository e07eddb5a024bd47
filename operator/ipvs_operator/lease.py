"""Leader election over a coordination.k8s.io Lease: the rules, pure.

The algorithm is client-go's ``leaderelection``: a replica may take the Lease when nobody holds
it, when it holds it already, or when the holder has not renewed it for ``leaseDurationSeconds``
as measured on *this* replica's clock from the moment it last saw the record change — so no two
clocks are ever compared. Writes carry the resourceVersion that was read, so two replicas racing
for an expired Lease cannot both win.

Fencing. A leader acts only until ``renew_deadline`` after its last renewal, which is shorter
than the Lease's duration, so it stops before anyone else may take over. A write in flight must
stop by then too: every write gets a client timeout no longer than the time left
(:func:`write_timeout`), and none is sent when too little is left to finish one.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def micro_time(at: datetime | None = None) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def holder(spec: Mapping[str, Any]) -> str:
    return str(spec.get("holderIdentity") or "")


def may_take(spec: Mapping[str, Any], me: str, observed_at: float, now: float) -> bool:
    """Whether ``me`` may take a Lease whose ``spec`` it saw change at ``observed_at``."""
    current = holder(spec)
    if not current or current == me:
        return True
    duration = float(spec.get("leaseDurationSeconds") or 0)
    return now >= observed_at + duration


def claimed(spec: Mapping[str, Any], me: str, duration_seconds: int, at: str) -> dict[str, Any]:
    """The Lease spec that makes (or keeps) ``me`` the holder."""
    renewing = holder(spec) == me
    transitions = int(spec.get("leaseTransitions") or 0)
    return {
        "holderIdentity": me,
        "leaseDurationSeconds": duration_seconds,
        "acquireTime": spec.get("acquireTime") if renewing and spec.get("acquireTime") else at,
        "renewTime": at,
        "leaseTransitions": transitions if renewing or not holder(spec) else transitions + 1,
    }


def released(spec: Mapping[str, Any], at: str) -> dict[str, Any]:
    """The spec a stepping-down leader leaves behind: no holder, so a standby takes over at once."""
    return {
        "leaseDurationSeconds": 1,
        "acquireTime": at,
        "renewTime": at,
        "leaseTransitions": int(spec.get("leaseTransitions") or 0),
    }


def lease(namespace: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }


def time_left(renewed_at: float | None, now: float, renew_deadline: float) -> float:
    """Seconds a leader that last renewed at ``renewed_at`` may still act (0: no longer)."""
    if renewed_at is None:
        return 0.0
    return max(0.0, renewed_at + renew_deadline - now)


def write_timeout(left: float, *, cap: float, floor: float) -> float | None:
    """The client timeout for one write with ``left`` seconds of leadership; None: don't send.

    A write is cut off when leadership ends, so none lands after another replica may have
    taken over; below ``floor`` a write could not finish anyway. ``cap`` is the client's own
    limit.
    """
    if left < floor:
        return None
    return min(left, cap)
