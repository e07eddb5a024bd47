"""Firewall marks, pure: which VirtualServer may use its ``spec.fwmark``.

IPVS matches firewall-mark services before all others, on every node: a VirtualServer with
mark M balances every packet that carries M — kube-proxy's 0x4000, the agent's own masquerade
bit, whatever another component marks. So a mark is a cluster-level grant, never a tenant's
choice: a VirtualServer may use its mark only when a usable AddressPool that admits its
namespace lists the mark in ``firewallMarks``, and only one VirtualServer per IP family holds a
mark (the kernel has one firewall-mark service per family and mark).

Holders keep their marks the way holders keep addresses (:mod:`ipvs_operator.allocator`): once
a holder's status shows the mark (live), no other claim takes it; age decides only between two
live claims (statuses rebuilt after a restart) or two unpublished ones. Conflicts name the
holder only inside its own namespace. And like an address, a mark in use stays with its holder
while the pool that granted it is missing or not ready (``FirewallMarkRetained``); only a usable
pool of that name that no longer grants it takes it away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from ipvs_api import conditions
from ipvs_api.types import AddressPool, IPFamily
from ipvs_operator.allocator import Age, holder_name, retained_because

#: (family, mark): the identity of one firewall-mark service in the kernel.
MarkKey = tuple[IPFamily, int]


@dataclass(frozen=True)
class MarkClaim:
    """What one firewall-mark VirtualServer needs."""

    key: str
    namespace: str
    age: Age
    family: IPFamily
    mark: int
    #: status.firewallMark: what the object says it holds.
    current: int | None = None
    #: status.addressPool: the pool that granted ``current``.
    current_pool: str | None = None
    namespace_labels: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def mark_key(self) -> MarkKey:
        return (self.family, self.mark)


@dataclass(frozen=True)
class MarkHolding:
    claim: MarkClaim
    pool: str
    #: The holder's status shows the mark: the agents may serve it, nobody takes it.
    live: bool = False

    @property
    def rank(self) -> tuple[bool, Age]:
        return (not self.live, self.claim.age)


@dataclass(frozen=True)
class MarkOutcome:
    """The result of :meth:`MarkTable.ensure`: the mark admitted, or why not."""

    reason: str
    message: str
    mark: int | None = None
    pool: str | None = None
    #: Holders that lost the mark to this claim; reconcile them again.
    evicted: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.mark is not None


def describe(mark: int) -> str:
    return f"firewall mark {mark} ({mark:#x})"


def conflict_message(claim: MarkClaim, holder: MarkClaim) -> str:
    who = holder_name(claim.namespace, holder.namespace, holder.key)
    verb = "is already used by" if claim.namespace == holder.namespace else "is in use by"
    return f"{describe(claim.mark)} of {claim.family.value} {verb} {who}"


class MarkTable:
    """Who holds which firewall mark, granted by which pool."""

    def __init__(self) -> None:
        self._usable: dict[str, AddressPool] = {}
        self._unusable: dict[str, str] = {}
        self._holdings: dict[str, MarkHolding] = {}
        self._by_mark: dict[MarkKey, MarkHolding] = {}

    def set_pools(self, usable: Iterable[AddressPool], unusable: Mapping[str, str]) -> None:
        """Replace the pools: ``usable`` may grant marks, ``unusable`` maps name -> why not."""
        self._usable = {p.name: p for p in sorted(usable, key=lambda p: p.name)}
        self._unusable = dict(unusable)

    # -- queries ---------------------------------------------------------------------------

    def holding(self, key: str) -> MarkHolding | None:
        return self._holdings.get(key)

    def holdings(self) -> list[MarkHolding]:
        return list(self._holdings.values())

    def in_use(self, pool: str) -> int:
        """Marks held under ``pool``'s grant."""
        return sum(1 for h in self._holdings.values() if h.pool == pool)

    # -- changes ---------------------------------------------------------------------------

    def _live(self, claim: MarkClaim) -> bool:
        before = self._holdings.get(claim.key)
        return claim.current == claim.mark or (
            before is not None and before.live and before.claim.mark_key == claim.mark_key
        )

    def _take(self, claim: MarkClaim, pool: str) -> None:
        live = self._live(claim)
        self.release(claim.key)
        holding = MarkHolding(claim, pool, live)
        self._holdings[claim.key] = holding
        self._by_mark[claim.mark_key] = holding

    def release(self, key: str) -> MarkHolding | None:
        """Forget ``key``'s mark; returns what it held."""
        holding = self._holdings.pop(key, None)
        if holding is not None and self._by_mark.get(holding.claim.mark_key) == holding:
            del self._by_mark[holding.claim.mark_key]
        return holding

    def published(self, key: str, mark: int) -> None:
        """``key``'s status now shows ``mark``: from here on it is live and kept."""
        holding = self._holdings.get(key)
        if holding is not None and holding.claim.mark == mark and not holding.live:
            live = replace(holding, live=True)
            self._holdings[key] = live
            self._by_mark[holding.claim.mark_key] = live

    def restore(self, held: Iterable[tuple[MarkClaim, str]]) -> list[str]:
        """Rebuild the table from objects' status, oldest first; returns keys that did not fit."""
        dropped: list[str] = []
        for claim, pool in sorted(held, key=lambda h: h[0].age):
            rival = self._by_mark.get(claim.mark_key)
            if rival is not None and rival.claim.key != claim.key:
                dropped.append(claim.key)
            else:
                self._take(claim, pool)
        return dropped

    def ensure(self, claim: MarkClaim) -> MarkOutcome:
        """Admit ``claim``'s mark if a pool grants it and no stronger holder has it."""
        granting = [
            p
            for p in self._usable.values()
            if p.grants(claim.mark) and p.admits(claim.namespace, claim.namespace_labels)
        ]
        if not granting:
            retained = self._retain(claim)
            if retained is not None:
                return retained
            self.release(claim.key)
            return MarkOutcome(
                conditions.FIREWALL_MARK_NOT_ADMITTED,
                f"no AddressPool grants {describe(claim.mark)} to namespace {claim.namespace}",
            )
        before = self._holdings.get(claim.key)
        pool = next((p for p in granting if before and p.name == before.pool), granting[0])
        return self._settle(claim, pool.name)

    def _retain(self, claim: MarkClaim) -> MarkOutcome | None:
        """Keep the mark while the pool that granted it is missing or not ready."""
        before = self._holdings.get(claim.key)
        if before is not None and before.claim.mark_key == claim.mark_key:
            pool: str | None = before.pool
        elif claim.current == claim.mark:
            pool = claim.current_pool
        else:
            return None
        if pool is None or pool in self._usable:
            return None  # a usable pool that no longer grants it: edited on purpose
        outcome = self._settle(claim, pool)
        if not outcome.ok:
            return None
        until = "is ready" if pool in self._unusable else "exists again"
        return replace(
            outcome,
            reason=conditions.FIREWALL_MARK_RETAINED,
            message=f"{retained_because(pool, self._unusable.get(pool))}: keeping "
            f"{describe(claim.mark)} until it {until}",
        )

    def _settle(self, claim: MarkClaim, pool: str) -> MarkOutcome:
        rival = self._by_mark.get(claim.mark_key)
        evicted: tuple[str, ...] = ()
        if rival is not None and rival.claim.key != claim.key:
            if rival.rank < (not self._live(claim), claim.age):
                self.release(claim.key)
                return MarkOutcome(
                    conditions.ADDRESS_CONFLICT, conflict_message(claim, rival.claim)
                )
            self.release(rival.claim.key)
            evicted = (rival.claim.key,)
        self._take(claim, pool)
        return MarkOutcome(
            conditions.FIREWALL_MARK_ADMITTED,
            f"{describe(claim.mark)} granted by AddressPool {pool}",
            mark=claim.mark,
            pool=pool,
            evicted=evicted,
        )
