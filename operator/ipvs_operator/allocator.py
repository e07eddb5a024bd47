"""Virtual address allocation, pure: every rule here is tested without a cluster.

MetalLB's ``allocator`` is the model. The table lives in memory, but every entry is also
written to its object (VirtualServer ``status.address``/``status.addressPool``), so a restarted
operator rebuilds the same table with :meth:`Allocator.restore` before it allocates anything.

Whoever holds an address keeps it: once a holder's status shows the address (it is *live*: the
agents may be serving it), no other object takes it, however old — the claimant gets
``AddressConflict``. Age — ``(creationTimestamp, namespace, name)``, the order the node agents
use when two VirtualServers claim one IPVS service — settles only what has no live holder to
protect: two statuses that claim one address (:meth:`Allocator.restore` after a restart) and
claims that arrive together before either was published. Namespaces are the tenancy boundary,
so a conflict names the holder only to objects of its own namespace.

Pools change without outages: while a holder's pool is missing (deleted, say, by a GitOps prune
before it is applied again) or not ready (an edit made it invalid or overlapping), the holder
keeps its address (``AddressRetained``) and nothing new is handed out from that pool. Only a
usable pool of that name that no longer contains the address (a deliberate edit) takes it away.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from ipvs_api import conditions
from ipvs_api.types import AddressPool, IPAddress, IPFamily

#: (protocol, port) of one virtual service.
PortKey = tuple[str, int]
#: ``(creationTimestamp, namespace, name)``: the older object wins a conflict.
Age = tuple[str, str, str]

ALLOCATED: Final = conditions.ALLOCATED


@dataclass(frozen=True)
class Claim:
    """What one VirtualServer needs from the allocator."""

    key: str
    namespace: str
    age: Age
    family: IPFamily
    ports: frozenset[PortKey]
    sharing_key: str | None = None
    #: spec.address: this address or none.
    requested: IPAddress | None = None
    #: spec.addressPool: only this pool.
    pool: str | None = None
    #: status.address: what the object says it holds, kept when still valid and free.
    current: IPAddress | None = None
    #: status.addressPool: where ``current`` came from.
    current_pool: str | None = None
    namespace_labels: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Holding:
    claim: Claim
    address: IPAddress
    pool: str
    #: The holder's status shows the address: the agents may serve it, nobody takes it.
    live: bool = False

    @property
    def rank(self) -> tuple[bool, Age]:
        """Who keeps a contested address: a live holder first, then the older."""
        return (not self.live, self.claim.age)


@dataclass(frozen=True)
class Outcome:
    """The result of :meth:`Allocator.ensure`: an address, or the reason there is none."""

    reason: str
    message: str
    address: IPAddress | None = None
    pool: str | None = None
    #: Unpublished (or younger live) holders that lost the address to this claim; reconcile
    #: them again.
    evicted: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.address is not None


def _fail(reason: str, message: str) -> Outcome:
    return Outcome(reason=reason, message=message)


def shareable(a: Claim, b: Claim) -> bool:
    """Two claims may share an address: same namespace and sharing key, no common port."""
    return (
        a.namespace == b.namespace
        and a.sharing_key is not None
        and a.sharing_key == b.sharing_key
        and not (a.ports & b.ports)
    )


def holder_name(claimant_namespace: str, holder_namespace: str, holder_key: str) -> str:
    """The holder as a claimant may see it: by name in its own namespace, else anonymous.

    Namespaces are the tenancy boundary; a tenant must not learn other namespaces' names.
    """
    if claimant_namespace == holder_namespace:
        return f"VirtualServer {holder_key}"
    return "an object in another namespace"


def retained_because(pool: str, problem: str | None) -> str:
    """Why a holder keeps what its pool gave it: the pool is not ready, or gone."""
    if problem is not None:
        return f"AddressPool {pool} is not ready ({problem})"
    return f"AddressPool {pool} does not exist"


def conflict_message(address: IPAddress, claim: Claim, holder: Claim) -> str:
    common = sorted(claim.ports & holder.ports)
    same = claim.namespace == holder.namespace
    who = holder_name(claim.namespace, holder.namespace, holder.key)
    if common:
        proto, port = common[0]
        verb = "is already used by" if same else "is in use by"
        return f"{address} port {port}/{proto} {verb} {who}"
    return (
        f"{address} is used by {who}; objects share an address only with the same sharingKey "
        "in the same namespace"
    )


class Allocator:
    """The address table: who holds which address from which pool."""

    def __init__(self) -> None:
        self._usable: dict[str, AddressPool] = {}
        self._unusable: dict[str, str] = {}
        self._holdings: dict[str, Holding] = {}
        self._by_address: dict[IPAddress, dict[str, Holding]] = {}
        #: (pool, range index) -> lowest offset that may be free: allocation stays O(1) amortised.
        self._cursor: dict[tuple[str, int], int] = {}

    # -- pools -----------------------------------------------------------------------------

    def set_pools(self, usable: Iterable[AddressPool], unusable: Mapping[str, str]) -> None:
        """Replace the pools: ``usable`` may hand out addresses, ``unusable`` maps name -> why."""
        self._usable = {p.name: p for p in sorted(usable, key=lambda p: p.name)}
        self._unusable = dict(unusable)
        self._cursor.clear()

    def _pool_problem(self, name: str, claim: Claim) -> Outcome | None:
        if name in self._unusable:
            why = self._unusable[name]
            return _fail(conditions.POOL_NOT_FOUND, f"AddressPool {name} is not ready: {why}")
        pool = self._usable.get(name)
        if pool is None:
            return _fail(conditions.POOL_NOT_FOUND, f"AddressPool {name} does not exist")
        if not pool.admits(claim.namespace, claim.namespace_labels):
            return _fail(
                conditions.POOL_NOT_FOUND,
                f"AddressPool {name} does not admit namespace {claim.namespace}",
            )
        return None

    def _pools_for(self, claim: Claim, *, auto: bool) -> tuple[list[AddressPool], Outcome | None]:
        if claim.pool is not None:
            problem = self._pool_problem(claim.pool, claim)
            return ([], problem) if problem else ([self._usable[claim.pool]], None)
        found = [
            p
            for p in self._usable.values()
            if (p.auto_assign or not auto) and p.admits(claim.namespace, claim.namespace_labels)
        ]
        return found, None

    # -- queries ---------------------------------------------------------------------------

    def holding(self, key: str) -> Holding | None:
        return self._holdings.get(key)

    def holdings(self) -> list[Holding]:
        return list(self._holdings.values())

    def allocated_in(self, pool: str) -> int:
        """Distinct addresses held from ``pool``."""
        return len({h.address for h in self._holdings.values() if h.pool == pool})

    def _rivals(self, claim: Claim, address: IPAddress) -> list[Holding]:
        """Holders of ``address`` that cannot share it with ``claim``, strongest first."""
        holders = self._by_address.get(address, {})
        return sorted(
            (h for k, h in holders.items() if k != claim.key and not shareable(claim, h.claim)),
            key=lambda h: h.rank,
        )

    # -- changes ---------------------------------------------------------------------------

    def _live(self, claim: Claim, address: IPAddress) -> bool:
        """Whether ``claim``'s status shows ``address`` (or we published it already)."""
        before = self._holdings.get(claim.key)
        return claim.current == address or (
            before is not None and before.live and before.address == address
        )

    def _take(self, claim: Claim, address: IPAddress, pool: str) -> None:
        live = self._live(claim, address)
        before = self._holdings.get(claim.key)
        if before is None or before.address != address:
            # Not for a holder that keeps its address: a release would rewind the free-address
            # cursors to it, and every reconcile of an old holder would make the next
            # allocation scan the pool from there again (quadratic in a burst).
            self.release(claim.key)
        holding = Holding(claim, address, pool, live)
        self._holdings[claim.key] = holding
        self._by_address.setdefault(address, {})[claim.key] = holding

    def published(self, key: str, address: IPAddress) -> None:
        """``key``'s status now shows ``address``: from here on it is live and kept."""
        holding = self._holdings.get(key)
        if holding is not None and holding.address == address and not holding.live:
            live = replace(holding, live=True)
            self._holdings[key] = live
            self._by_address[address][key] = live

    def release(self, key: str) -> Holding | None:
        """Forget ``key``'s address; returns what it held."""
        holding = self._holdings.pop(key, None)
        if holding is None:
            return None
        holders = self._by_address.get(holding.address, {})
        holders.pop(key, None)
        if not holders:
            self._by_address.pop(holding.address, None)
            self._lower_cursors(holding.address)
        return holding

    def _lower_cursors(self, address: IPAddress) -> None:
        for pool in self._usable.values():
            for index, rng in enumerate(pool.ranges):
                if address in rng:
                    slot = (pool.name, index)
                    offset = int(address) - int(rng.first)
                    self._cursor[slot] = min(self._cursor.get(slot, 0), offset)

    def restore(self, held: Iterable[tuple[Claim, IPAddress, str]]) -> list[str]:
        """Rebuild the table from objects' status, oldest first; returns keys that did not fit.

        Pools are not judged here: each object is reconciled right after, and :meth:`ensure`
        then keeps or replaces its address. Only two objects claiming one address are settled
        here, so the older keeps it whichever is listed first.
        """
        dropped: list[str] = []
        for claim, address, pool in sorted(held, key=lambda h: h[0].age):
            if self._rivals(claim, address):
                dropped.append(claim.key)
            else:
                self._take(claim, address, pool)
        return dropped

    def _settle(self, claim: Claim, address: IPAddress, pool: str) -> Outcome:
        """Take ``address`` unless a stronger rival holds it; weaker rivals are evicted.

        A live holder is never evicted by a claim that is not live itself, nor by one it
        shared the address with; only between two live claims (statuses that both show the
        address) or two unpublished ones does age decide.
        """
        rivals = self._rivals(claim, address)
        mine = (not self._live(claim, address), claim.age)
        before = self._holdings.get(claim.key)
        # Rivals that hold the address together with this claim were sharing it until this
        # claim's edit (a sharing key dropped or changed, a port the other serves): the edit
        # moves the claim that changed, never a live holder that did nothing.
        sharing = before is not None and before.address == address
        stronger = [h for h in rivals if h.rank < mine or (sharing and h.live)]
        if stronger:
            self.release(claim.key)
            return _fail(
                conditions.ADDRESS_CONFLICT, conflict_message(address, claim, stronger[0].claim)
            )
        for h in rivals:
            self.release(h.claim.key)
        self._take(claim, address, pool)
        return Outcome(
            reason=ALLOCATED,
            message=f"{address} from AddressPool {pool}",
            address=address,
            pool=pool,
            evicted=tuple(h.claim.key for h in rivals),
        )

    def ensure(self, claim: Claim) -> Outcome:
        """Give ``claim`` an address: keep the one it holds while still valid, else find one."""
        if claim.requested is not None:
            return self._ensure_requested(claim)
        holding = self._holdings.get(claim.key)
        # What the object's status shows comes first: that is the address in use. A holding
        # its status does not show was never published (a write that failed, say).
        current = claim.current
        from_pool = claim.current_pool
        if holding is not None and (current is None or current == holding.address):
            current, from_pool = holding.address, holding.pool
        if current is not None and current.version == _version(claim.family):
            pools, problem = self._pools_for(claim, auto=False)
            home = next((p for p in pools if current in p), None)
            if problem is None and home is not None:
                outcome = self._settle(claim, current, home.name)
                if outcome.ok:
                    return outcome
            else:
                retained = self._retain(claim, current, from_pool)
                if retained is not None:
                    return retained
        self.release(claim.key)
        pools, problem = self._pools_for(claim, auto=True)
        if problem is not None:
            return problem
        version = _version(claim.family)
        pools = [p for p in pools if any(r.first.version == version for r in p.ranges)]
        if not pools:
            return _fail(
                conditions.POOL_NOT_FOUND,
                f"no AddressPool with autoAssign admits namespace {claim.namespace} and has "
                f"{claim.family.value} addresses",
            )
        shared = self._shared_address(claim, pools)
        if shared is not None:
            return self._settle(claim, *shared)
        for pool in pools:
            address = self._first_free(pool, claim.family)
            if address is not None:
                return self._settle(claim, address, pool.name)
        names = ", ".join(p.name for p in pools)
        return _fail(
            conditions.POOL_EXHAUSTED,
            f"no free {claim.family.value} address left in AddressPool {names}",
        )

    def _ensure_requested(self, claim: Claim) -> Outcome:
        address = claim.requested
        assert address is not None
        pools, problem = self._pools_for(claim, auto=False)
        home = None if problem is not None else next((p for p in pools if address in p), None)
        if home is None:
            holding = self._holdings.get(claim.key)
            if holding is not None and holding.address == address:
                retained = self._retain(claim, address, holding.pool)
            elif claim.current == address:
                retained = self._retain(claim, address, claim.current_pool)
            else:
                retained = None
            if retained is not None:
                return retained
        if problem is not None:
            self.release(claim.key)
            return problem
        if home is None:
            self.release(claim.key)
            where = (
                f"AddressPool {claim.pool}"
                if claim.pool
                else f"any AddressPool that admits namespace {claim.namespace}"
            )
            return _fail(conditions.ADDRESS_NOT_IN_POOL, f"{address} is not in {where}")
        return self._settle(claim, address, home.name)

    def _retain(self, claim: Claim, address: IPAddress, pool: str | None) -> Outcome | None:
        """Keep ``address`` while its ``pool`` is missing or not ready; None: do not.

        A usable pool of that name that no longer has the address (or no longer admits the
        namespace) was edited on purpose, and a claim that now names another pool asked to
        move: neither keeps anything.
        """
        if pool is None or pool in self._usable or claim.pool not in (None, pool):
            return None
        outcome = self._settle(claim, address, pool)
        if not outcome.ok:
            return None
        return replace(
            outcome,
            reason=conditions.ADDRESS_RETAINED,
            message=f"{retained_because(pool, self._unusable.get(pool))}: keeping {address} "
            f"until it {'is ready' if pool in self._unusable else 'exists again'}",
        )

    def _shared_address(
        self, claim: Claim, pools: Sequence[AddressPool]
    ) -> tuple[IPAddress, str] | None:
        """An address already used under the claim's sharing key that it can join."""
        if claim.sharing_key is None:
            return None
        for holding in sorted(self._holdings.values(), key=lambda h: h.claim.age):
            other = holding.claim
            if other.namespace != claim.namespace or other.sharing_key != claim.sharing_key:
                continue
            pool = next((p for p in pools if holding.address in p), None)
            if pool is not None and not self._rivals(claim, holding.address):
                return holding.address, pool.name
        return None

    def _first_free(self, pool: AddressPool, family: IPFamily) -> IPAddress | None:
        version = _version(family)
        for index, rng in enumerate(pool.ranges):
            if rng.first.version != version:
                continue
            slot = (pool.name, index)
            offset = self._cursor.get(slot, 0)
            first = int(rng.first)
            while offset < rng.size:
                address = type(rng.first)(first + offset)
                if address not in self._by_address:
                    self._cursor[slot] = offset
                    return address
                offset += 1
            self._cursor[slot] = offset
        return None


def _version(family: IPFamily) -> int:
    return 4 if family is IPFamily.IPV4 else 6
