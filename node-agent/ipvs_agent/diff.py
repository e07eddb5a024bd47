"""Desired table minus observed table = the fewest kernel operations, with graceful drain.

Pure: the caller passes the clock and the drain bookkeeping, and gets back the operations and
the new bookkeeping. Only services the agent owns are ever edited or deleted; a desired service
that collides with a foreign one is reported as a conflict and left alone.

One invariant beyond "desired equals observed": under a scheduler that builds its lookup table
by walking the real servers in the kernel's list order (sh, dh, mh — ``ip_vs_sh_reassign``,
``ip_vs_dh_reassign``, ``ip_vs_mh_populate``), the list is kept in one canonical order, the
same on every director whatever the history of its table: active-active directors behind ECMP
then send each client to the same real server, and a flow that moves to another director (one
was lost) keeps its real server. The kernel only inserts at the head of the list, so a real
server that belongs in the middle is added after deleting those that must precede it, which are
added back right after it in the same batch: the kernel takes a deleted real server back from
its trash with its connections and counters, so their connections live on (see
:func:`canonical_order`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ipvs_agent.model import (
    MANAGED_FLAGS,
    DesiredService,
    DesiredTable,
    Dest,
    DestKey,
    ForwardingMethod,
    ObservedDest,
    ObservedService,
    ObservedTable,
    Protocol,
    Service,
    ServiceKey,
)
from ipvs_agent.ops import Op, OpKind

#: When each draining real server started to drain (seconds on the caller's clock).
DrainBook = Mapping[tuple[ServiceKey, DestKey], float]
#: Services whose real servers a diff found exactly as wanted, with the two mappings it
#: compared (see :func:`diff`'s ``agreed``).
Agreed = Mapping[ServiceKey, tuple[Mapping[DestKey, Dest], Mapping[DestKey, ObservedDest]]]


def drain_step(op: Op, draining: Collection[tuple[ServiceKey, DestKey]]) -> bool:
    """Whether ``op`` advances the drain of a real server that was already draining (such
    steps are the drain going on, not drift)."""
    return op.dest is not None and (op.service.key, op.dest.key) in draining


#: Schedulers whose choice depends on the order of the kernel's real-server list.
ORDERED_SCHEDULERS = frozenset({"sh", "dh", "mh"})


def canonical_order(keys: Iterable[DestKey]) -> list[DestKey]:
    """The kernel list order (head first, as dumps show it) every director keeps under an
    ordered scheduler: descending, so a new service whose real servers are added in ascending
    order (each at the head) is in it from the start."""
    return sorted(keys, reverse=True)


def to_reinsert(observed: Sequence[DestKey], final: Iterable[DestKey]) -> list[DestKey]:
    """The real servers to (re-)add at the list head, in canonical order, so that the list
    holding ``final`` reads exactly :func:`canonical_order`: everything before the longest
    tail of the canonical order that the observed list already holds in that order. Those
    among them already in the list must be deleted first; real servers not in ``final`` go
    anyway and do not count (removing one never reorders the others)."""
    want = canonical_order(final)
    present = set(want)
    have = [k for k in observed if k in present]
    i, j = len(want) - 1, len(have) - 1
    while i >= 0:  # match the canonical tail backwards against the observed list
        while j >= 0 and have[j] != want[i]:
            j -= 1
        if j < 0:
            break
        i, j = i - 1, j - 1
    return want[: i + 1]


@dataclass(frozen=True)
class Diff:
    ops: list[Op]
    draining: dict[tuple[ServiceKey, DestKey], float]
    #: Desired services that a foreign program already holds in the kernel.
    conflicts: frozenset[ServiceKey]
    #: The services whose real servers are as wanted, for the next diff's ``agreed``.
    agreed: Agreed = field(default_factory=dict)


def same_service(a: Service, b: Service) -> bool:
    """Equal in every attribute the agent sets (the kernel's HASHED bit is not ours)."""
    return (
        a.scheduler == b.scheduler
        and a.flags & MANAGED_FLAGS == b.flags & MANAGED_FLAGS
        and a.timeout == b.timeout
        and a.netmask == b.netmask
        and a.pe_name == b.pe_name
    )


def same_dest(a: Dest, b: Dest) -> bool:
    """Equal in every attribute the kernel applies to this forwarding method."""
    base = (a.forwarding, a.weight, a.upper_threshold, a.lower_threshold) == (
        b.forwarding,
        b.weight,
        b.upper_threshold,
        b.lower_threshold,
    )
    if not base or a.forwarding is not ForwardingMethod.TUNNEL:
        return base
    return (a.tunnel_type, a.tunnel_port, a.tunnel_flags) == (
        b.tunnel_type,
        b.tunnel_port,
        b.tunnel_flags,
    )


def _drain(
    key: ServiceKey,
    service: Service,
    gone: ObservedDest,
    drain_seconds: int,
    started: float | None,
    now: float,
) -> tuple[Op | None, float | None]:
    """Step one real server that is no longer wanted: quiesce, wait, then delete."""
    dest = gone.dest
    idle = gone.stats.active_connections + gone.stats.inactive_connections == 0
    if key.protocol == Protocol.UDP or drain_seconds <= 0 or idle:
        return Op(OpKind.DEL_DEST, service, dest), None
    since = now if started is None else started
    if dest.weight != 0:
        return Op(OpKind.EDIT_DEST, service, replace(dest, weight=0)), since
    if now - since >= drain_seconds:
        return Op(OpKind.DEL_DEST, service, dest), None
    return None, since


def _same_dests(want: DesiredService, have: ObservedService) -> bool:
    """Whether the kernel has exactly the wanted real servers, each as wanted."""
    if len(want.dests) != len(have.dests):
        return False
    for dkey, d in want.dests.items():
        current = have.dests.get(dkey)
        if current is None or (current.dest is not d and not same_dest(d, current.dest)):
            return False  # (a dump lends the wanted Dest itself when the kernel's is equal)
    return True


def diff(
    desired: DesiredTable,
    observed: ObservedTable,
    owned: Callable[[ServiceKey], bool],
    drain_seconds: Mapping[ServiceKey, int],
    draining: DrainBook,
    now: float,
    remove_now: frozenset[tuple[ServiceKey, DestKey]] = frozenset(),
    agreed: Agreed | None = None,
) -> Diff:
    """The operations that turn ``observed`` into ``desired`` for the services we own.

    A real server in ``remove_now`` (taken out by a failed health check with ``onFailure:
    Remove``) is deleted at once instead of drained.

    ``agreed``: the last diff's :attr:`Diff.agreed`. A service whose wanted and observed
    real servers are the very mappings found equal then is equal now (both are immutable:
    the plan memo hands back the same desired services, and a dump the same observed ones
    while the kernel's reply is byte for byte unchanged), so a resync compares per service,
    not per real server.
    """
    ops: list[Op] = []
    book: dict[tuple[ServiceKey, DestKey], float] = {}
    conflicts: set[ServiceKey] = set()
    before = agreed or {}
    agree: dict[ServiceKey, tuple[Mapping[DestKey, Dest], Mapping[DestKey, ObservedDest]]] = {}

    def dests_agree(key: ServiceKey, want: DesiredService, have: ObservedService) -> bool:
        if want.service.scheduler in ORDERED_SCHEDULERS:
            return False  # the order matters too: see below
        was = before.get(key)
        if (was is not None and was[0] is want.dests and was[1] is have.dests) or (
            _same_dests(want, have)
        ):
            agree[key] = (want.dests, have.dests)
            return True
        return False

    # First the services that need nothing (a resync: all of them), unsorted; then, in key
    # order so that the operations are, those that need something.
    work: list[ServiceKey] = []
    for key, want in desired.items():
        have = observed.get(key)
        if have is not None and not owned(key):
            conflicts.add(key)
        elif (
            have is None
            or not same_service(want.service, have.service)
            or not dests_agree(key, want, have)
        ):
            work.append(key)
    for key in sorted(work):
        want = desired[key]
        have = observed.get(key)
        if have is None:
            ops.append(Op(OpKind.ADD_SERVICE, want.service))
            ops.extend(Op(OpKind.ADD_DEST, want.service, d) for _, d in sorted(want.dests.items()))
            continue
        if not same_service(want.service, have.service):
            ops.append(Op(OpKind.EDIT_SERVICE, want.service))
        if dests_agree(key, want, have):
            continue
        dest_ops: list[Op] = []
        final: dict[DestKey, Dest] = dict(want.dests)
        for dkey in sorted(want.dests):
            d = want.dests[dkey]
            current = have.dests.get(dkey)
            if current is None:
                dest_ops.append(Op(OpKind.ADD_DEST, want.service, d))
            elif not same_dest(d, current.dest):
                dest_ops.append(Op(OpKind.EDIT_DEST, want.service, d))
        for dkey in sorted(set(have.dests) - set(want.dests)):
            op, since = _drain(
                key,
                want.service,
                have.dests[dkey],
                0 if (key, dkey) in remove_now else drain_seconds.get(key, 0),
                draining.get((key, dkey)),
                now,
            )
            if op is not None:
                dest_ops.append(op)
            if since is not None:
                book[(key, dkey)] = since
                final[dkey] = replace(have.dests[dkey].dest, weight=0)
        if want.service.scheduler in ORDERED_SCHEDULERS:
            dest_ops = _in_order(want.service, dest_ops, list(have.dests), final)
        ops.extend(dest_ops)
    for key in sorted(set(observed) - set(desired)):
        if owned(key):
            ops.append(Op(OpKind.DEL_SERVICE, observed[key].service))
    return Diff(ops, book, frozenset(conflicts), agree)


def _in_order(
    service: Service, ops: list[Op], observed: Sequence[DestKey], final: Mapping[DestKey, Dest]
) -> list[Op]:
    """``ops`` for one service, with the real servers that are out of canonical order deleted
    and added back at the head (a drained one at weight 0), the new ones among them."""
    moved = to_reinsert(observed, final)
    if not moved:
        return ops
    chosen = set(moved)
    kept = [op for op in ops if op.dest is None or op.dest.key not in chosen]
    present = set(observed)
    out = kept + [Op(OpKind.DEL_DEST, service, final[k]) for k in moved if k in present]
    out += [Op(OpKind.ADD_DEST, service, final[k]) for k in reversed(moved)]
    return out
