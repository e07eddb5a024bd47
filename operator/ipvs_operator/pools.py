"""AddressPools: which ones may hand out addresses, and the status each one reports. Pure.

Overlapping pools would let one address be reached through two pools with different rules, so
the younger of two overlapping pools is refused (``Overlap``) and the older keeps working — the
same age rule as for addresses. A range that ends before it starts (which CEL cannot compare)
is ``InvalidRange``. A pool that is not usable hands out nothing new, but takes nothing back:
its holders keep their addresses and marks (:mod:`.allocator`), and its status says how many.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ipvs_api import conditions, load
from ipvs_api.errors import InvalidObject
from ipvs_api.types import AddressPool, AddressRange

READY_REASON: Final = "Ready"
OVERLAP: Final = "Overlap"
INVALID_RANGE: Final = "InvalidRange"
INVALID_SPEC: Final = conditions.INVALID_SPEC
#: status.available saturates here (an int64), for IPv6 pools larger than that.
MAX_INT64: Final = 2**63 - 1


@dataclass(frozen=True)
class PoolView:
    """One AddressPool as judged: usable (``pool`` set, no problem) or not, and why."""

    name: str
    created: str
    generation: int
    pool: AddressPool | None
    problem: tuple[str, str] | None = None

    @property
    def usable(self) -> bool:
        return self.pool is not None and self.problem is None


def _overlap(a: AddressRange, b: AddressRange) -> bool:
    return (
        a.first.version == b.first.version
        and int(a.first) <= int(b.last)
        and int(b.first) <= int(a.last)
    )


def _describe(r: AddressRange) -> str:
    return str(r.first) if r.first == r.last else f"{r.first}-{r.last}"


def judge(bodies: Iterable[Mapping[str, Any]]) -> list[PoolView]:
    """Every pool, oldest first, each usable or with the reason it is not."""
    views: list[PoolView] = []
    ordered = sorted(
        bodies,
        key=lambda b: (
            str((b.get("metadata") or {}).get("creationTimestamp") or "~"),
            str((b.get("metadata") or {}).get("name")),
        ),
    )
    for body in ordered:
        meta = body.get("metadata") or {}
        name = str(meta.get("name", ""))
        created = str(meta.get("creationTimestamp") or "")
        generation = int(meta.get("generation") or 0)
        try:
            pool = load.address_pool(dict(body))
        except InvalidObject as exc:
            reversed_range = any("starts after it ends" in e.message for e in exc.errors)
            reason = INVALID_RANGE if reversed_range else INVALID_SPEC
            problem = (reason, "; ".join(str(e) for e in exc.errors))
            views.append(PoolView(name, created, generation, None, problem))
            continue
        clash = _first_overlap(pool, [v for v in views if v.usable])
        views.append(PoolView(name, created, generation, pool, clash))
    return views


def _first_overlap(pool: AddressPool, older: Sequence[PoolView]) -> tuple[str, str] | None:
    for view in older:
        assert view.pool is not None
        for mine in pool.ranges:
            for theirs in view.pool.ranges:
                if _overlap(mine, theirs):
                    return (
                        OVERLAP,
                        f"{_describe(mine)} overlaps {_describe(theirs)} of AddressPool "
                        f"{view.name}, which is older; this pool hands out no addresses",
                    )
    return None


def size(pool: AddressPool) -> int:
    """Distinct addresses in the pool (its own ranges may overlap each other)."""
    total = 0
    for version in (4, 6):
        spans = sorted(
            (int(r.first), int(r.last)) for r in pool.ranges if r.first.version == version
        )
        end = -1
        for first, last in spans:
            if last <= end:
                continue
            total += last - max(first, end + 1) + 1
            end = last
    return total


def _counted(n: int, one: str, many: str | None = None) -> str:
    """``n`` things in words, or "" for none."""
    if n == 0:
        return ""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def status(
    view: PoolView,
    allocated: int,
    old_conditions: Sequence[dict[str, Any]],
    now: str | None = None,
    *,
    marks_in_use: int = 0,
) -> dict[str, Any]:
    """The AddressPool ``status`` for ``allocated`` addresses and ``marks_in_use`` in use."""
    if view.usable:
        assert view.pool is not None
        total = size(view.pool)
        available = min(max(total - allocated, 0), MAX_INT64)
        usage: list[str] = []
        if view.pool.ranges or not view.pool.firewall_marks:
            usage.append(f"{allocated} of {total} addresses allocated")
        if view.pool.firewall_marks:
            usage.append(f"{marks_in_use} firewall mark(s) in use")
        ready: tuple[bool, str, str] = (True, READY_REASON, "; ".join(usage))
    else:
        assert view.problem is not None
        available = 0
        message = view.problem[1]
        kept = _counted(allocated, "address", "addresses"), _counted(marks_in_use, "firewall mark")
        held = " and ".join(k for k in kept if k)
        if held:
            message += f"; {held} in use stay with their holders until it is ready"
        ready = (False, view.problem[0], message)
    conds = conditions.set_condition(
        list(old_conditions), conditions.READY, *ready, view.generation, at=now
    )
    return {
        "observedGeneration": view.generation,
        "allocated": allocated,
        "available": available,
        "conditions": conds,
    }
