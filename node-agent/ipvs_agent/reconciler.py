"""One reconcile pass: snapshot → plan → diff against the live table → apply → outcomes.

The same pass serves the in-cluster agent, ``ipvs-agent apply -f`` and (with ``dry_run``)
``ipvs-agent plan -f``. The kernel and the host are reached only through the small
:class:`~ipvs_agent.kernel.Kernel` and :class:`Host` interfaces, so every branch here is
unit-tested with fakes and proven on the real kernel in the VM.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from ipvs_agent.desired import (
    Outcome,
    Plan,
    PlanMemo,
    RealServerNetns,
    Route,
    State,
    dr_destinations,
    node_needs,
    plan,
)
from ipvs_agent.diff import Agreed, diff
from ipvs_agent.heap import collector_paused
from ipvs_agent.host import sysctl
from ipvs_agent.host.nftables import Ruleset
from ipvs_agent.host.realserver import RealServerSpec
from ipvs_agent.host.state import Repair
from ipvs_agent.kernel import NOT_SENT, Kernel, OpResult
from ipvs_agent.model import (
    DesiredService,
    DestKey,
    IPAddress,
    ObservedTable,
    ServiceKey,
    parse_address,
)
from ipvs_agent.ops import Op, OpKind
from ipvs_agent.partial import Change
from ipvs_agent.snapshot import Snapshot


class Host(Protocol):
    """The host state around IPVS that the agent owns (addresses, nftables)."""

    def recorded(self) -> Ruleset:
        """What the agent recorded: the kernel services it owns (and their masquerade).

        Survives agent restarts, and ``nft flush ruleset`` too (``LinuxHost`` keeps a second
        record beside the nftables one).
        """

    def record(self, ruleset: Ruleset) -> Sequence[Repair]:
        """Write the ownership record, masquerade and VIP guard, atomically; returns the drift
        it repaired (what someone else changed or removed), one line each."""

    def sync_addresses(self, wanted: set[IPAddress]) -> None:
        """Hold exactly these virtual addresses on the agent's interface."""


@runtime_checkable
class RealServerSide(Protocol):
    """What a host offers beyond :class:`Host` for DR and TUN real servers (``LinuxHost``).

    A host without it (a test double of the director side) skips both steps: no route facts
    (every DR real server is taken as on-link) and no real-server setup.
    """

    def routes(self, addresses: set[IPAddress]) -> Mapping[IPAddress, Route]:
        """The director's route to each address (the kernel's FIB lookup); unknown ones left out."""

    def sync_real_servers(
        self, wanted: Mapping[RealServerNetns, RealServerSpec]
    ) -> Mapping[RealServerNetns, str]:
        """Set up exactly these namespaces, undo the rest; the error of each that failed."""


@runtime_checkable
class NodeTuning(Protocol):
    """A host whose node-wide sysctls the agent sets as its services need (``LinuxHost``)."""

    def tune(self, wanted: Sequence[sysctl.Sysctl]) -> None:
        """Set each one that is not yet acceptable, noting the value it replaces."""


REAL_SERVER_SETUP_FAILED = "RealServerSetupFailed"


@dataclass
class Memory:
    """What the agent carries from one pass to the next, in memory only.

    Losing it (a restart) is safe: a drain in progress simply starts its timer again, and a
    VirtualServer the planner fails on right after a restart freezes more than it must.
    """

    draining: dict[tuple[ServiceKey, DestKey], float] = field(default_factory=dict)
    #: The owners of the last pass (which VirtualServer each kernel service belongs to).
    owners: Mapping[ServiceKey, str] | None = None
    #: Each VirtualServer's real-server part in the last pass.
    real_server_parts: Mapping[str, Mapping[RealServerNetns, RealServerSpec]] = field(
        default_factory=dict
    )
    #: Each VirtualServer's planned services, reused while its inputs stay the same.
    plans: PlanMemo = field(default_factory=PlanMemo)
    #: The services the last full pass found with their real servers as wanted.
    agreed: Agreed = field(default_factory=dict)


@dataclass(frozen=True)
class PassResult:
    plan: Plan
    observed: ObservedTable
    ops: list[Op]
    results: list[OpResult]
    outcomes: Mapping[str, Outcome]
    #: Host state that someone else changed and this pass put back.
    repairs: tuple[Repair, ...] = ()
    #: The kernel services the agent owns after the pass.
    owned: frozenset[ServiceKey] = frozenset()
    #: The nftables ruleset and the virtual addresses the pass left (None: a dry run).
    ruleset: Ruleset | None = None
    addresses: frozenset[IPAddress] | None = None

    @property
    def failures(self) -> list[OpResult]:
        return [r for r in self.results if not r.ok]


def _with_failures(
    outcomes: dict[str, Outcome], p: Plan, conflicts: frozenset[ServiceKey], results: list[OpResult]
) -> dict[str, Outcome]:
    for key in sorted(conflicts):
        owner = p.owners[key]
        outcomes[owner] = replace(
            outcomes[owner],
            state=State.FAILED,
            reason="AddressConflict",
            message=f"the kernel already has {key}, created outside ipvs-operator; left alone",
        )
    for r in results:
        failed = p.owners.get(r.op.service.key)
        if r.ok or failed is None or r.error == NOT_SENT:
            continue
        if r.op.kind is OpKind.ADD_SERVICE and r.error == errno.EEXIST:
            outcomes[failed] = replace(
                outcomes[failed],
                state=State.FAILED,
                reason="AddressConflict",
                message=f"another program created {r.op.service.key} while the agent was "
                "adding it; left alone",
            )
            continue
        outcomes[failed] = replace(
            outcomes[failed],
            state=State.FAILED,
            reason="KernelError",
            message=f"{r.op}: {r.message or r.error}",
        )
    return outcomes


def _with_real_server_failures(
    outcomes: dict[str, Outcome], p: Plan, errors: Mapping[RealServerNetns, str]
) -> dict[str, Outcome]:
    """A namespace that could not be set up fails every VirtualServer it serves here."""
    for target in sorted(errors, key=str):
        problem = f"{target}: {errors[target]}"
        for key in sorted(p.real_server_owners.get(target, ())):
            was = outcomes.get(key)
            if was is None:
                continue
            if was.state is State.FAILED and was.reason:
                message = f"{was.message}; {problem}" if was.message else problem
                outcomes[key] = replace(was, message=message)
            else:
                outcomes[key] = replace(
                    was, state=State.FAILED, reason=REAL_SERVER_SETUP_FAILED, message=problem
                )
    return outcomes


#: The owner recorded for a service frozen before the agent knew whose it was.
UNKNOWN_OWNER = ""


def frozen_services(
    p: Plan, owners_before: Mapping[ServiceKey, str] | None, owned: set[ServiceKey]
) -> frozenset[ServiceKey]:
    """The owned kernel services to leave exactly as they are while the planner fails on some
    VirtualServer: those of the failing ones (by the last pass's owners), and every owned
    service that is not desired and whose owner is unknown (no earlier pass since a restart)."""
    if not p.broken:
        return frozenset()
    before = owners_before or {}
    return frozenset(
        key
        for key in owned
        if before.get(key) in p.broken
        or (key not in p.table and before.get(key, UNKNOWN_OWNER) == UNKNOWN_OWNER)
    )


def _as_desired(
    observed: ObservedTable, keys: frozenset[ServiceKey]
) -> dict[ServiceKey, DesiredService]:
    return {
        key: DesiredService(
            observed[key].service, {dk: od.dest for dk, od in observed[key].dests.items()}
        )
        for key in keys
        if key in observed
    }


def _vips(keys: set[ServiceKey] | frozenset[ServiceKey]) -> set[IPAddress]:
    return {parse_address(k.address) for k in keys if not k.fwmark}


@collector_paused()  # (see heap: the pass builds a table of small objects)
def reconcile(
    snapshot: Snapshot,
    kernel: Kernel,
    host: Host,
    memory: Memory,
    now: float,
    dry_run: bool = False,
) -> PassResult:
    """Bring the kernel to the snapshot's desired table; touch only what the agent owns."""
    previous = memory.real_server_parts
    adjustments = snapshot.adjustments
    p = plan(
        snapshot.virtual_servers,
        snapshot.endpoints,
        snapshot.node,
        previous=previous,
        adjustments=adjustments,
        memo=memory.plans,
    )
    side = host if isinstance(host, RealServerSide) else None
    if side is not None:
        # DR reaches only real servers on the director's segment: ask the kernel's FIB, and plan
        # again without the off-link ones (rare, so the common pass plans once).
        dr = dr_destinations(p)
        routes = side.routes(set(dr)) if dr else {}
        if any(not route.on_link for route in routes.values()):
            p = plan(
                snapshot.virtual_servers,
                snapshot.endpoints,
                snapshot.node,
                routes,
                previous,
                adjustments,
                memory.plans,
            )
    recorded = host.recorded()
    owned_before = set(recorded.owned)
    observed = kernel.dump(p.table)  # shares the plan's Dests: one copy of each in memory
    frozen = frozen_services(p, memory.owners, owned_before & set(observed))
    # What a broken VirtualServer programmed stays: desired exactly as the kernel has it.
    table = {**_as_desired(observed, frozen), **p.table}
    d = diff(
        table,
        observed,
        owned_before.__contains__,
        p.drain_seconds,
        memory.draining,
        now,
        p.remove_now,
        memory.agreed,
    )
    outcomes = {**p.outcomes, **snapshot.rejected}
    if dry_run:
        outcomes = _with_failures(outcomes, p, d.conflicts, [])
        return PassResult(p, observed, d.ops, [], outcomes, owned=frozenset(owned_before))

    ours = set(table) - d.conflicts
    masquerade = (set(p.masquerade) - d.conflicts) | (set(recorded.masquerade) & frozen)
    declared = set(table)  # the guard lets traffic reach every declared service
    wanted = set(p.addresses) | _vips(frozen)
    going = {parse_address(k.address) for k in observed if k in owned_before and not k.fwmark}
    # Ownership is recorded before a service is created and dropped only after it is gone,
    # so a crash in between leaves at worst a record without a service (cleaned next pass).
    # The guard opens a new service before its address is local and closes an old one only
    # after the service is gone.
    before = (owned_before | ours, masquerade, wanted | going, declared | owned_before)
    first = Ruleset.of(*before)
    repairs = list(host.record(first))
    if isinstance(host, NodeTuning):
        release = snapshot.node.kernel.release if snapshot.node.kernel else ""
        host.tune(sysctl.needed(node_needs(p, snapshot.node), release))
    # A new virtual address is local before its service exists, and an old one stays until its
    # service is gone, so no client ever meets a service whose address does not answer.
    host.sync_addresses(wanted | going)
    results = kernel.apply(d.ops)
    memory.draining = dict(d.draining)
    memory.agreed = d.agreed
    # A frozen service keeps its owner (or stays of unknown owner) for the next pass.
    carried = {k: (memory.owners or {}).get(k, UNKNOWN_OWNER) for k in frozen}
    memory.owners = {**carried, **p.owners}
    memory.real_server_parts = p.real_server_parts

    still_there = {
        r.op.service.key for r in results if r.op.kind is OpKind.DEL_SERVICE and not r.ok
    }
    # A service whose creation failed is not ours, whoever holds it now (a foreign program that
    # created it meanwhile: EEXIST).
    not_created = {
        r.op.service.key for r in results if r.op.kind is OpKind.ADD_SERVICE and not r.ok
    }
    kept = (ours - not_created) | still_there
    remaining = wanted | _vips(still_there)
    after = (kept, masquerade - not_created, remaining, declared | still_there)
    written = first if after == before else Ruleset.of(*after)  # (a resync: the same)
    repairs += host.record(written)
    if going - remaining:  # else the first sync already left exactly the wanted addresses
        host.sync_addresses(remaining)
    outcomes = _with_failures(outcomes, p, d.conflicts, results)
    if side is not None and p.real_servers_complete:
        errors = side.sync_real_servers(p.real_servers)
        outcomes = _with_real_server_failures(outcomes, p, errors)
    return PassResult(
        p,
        observed,
        d.ops,
        results,
        outcomes,
        tuple(repairs),
        frozenset(kept),
        written,
        frozenset(remaining),
    )


def reconcile_change(
    change: Change, last: PassResult, kernel: Kernel, memory: Memory, now: float
) -> PassResult | None:
    """Bring only the services of a change pass (``partial.plan_change``) to their planned
    real servers: read those services, diff, write. None when the kernel no longer holds one
    of them (someone removed it): then a full pass must look at the whole table.

    Ownership, addresses, nftables and the real-server side are left as they are: the change
    pass is taken only when its services are the last pass's, already recorded as ours.
    """
    keys = change.services
    table = {key: change.plan.table[key] for key in keys}
    observed = kernel.read(keys, table) if keys else {}
    if set(observed) != keys:
        return None
    d = diff(
        table,
        observed,
        keys.__contains__,
        change.plan.drain_seconds,
        memory.draining,
        now,
        change.plan.remove_now,
    )
    results = kernel.apply(d.ops) if d.ops else []
    memory.draining = {
        **{k: since for k, since in memory.draining.items() if k[0] not in keys},
        **d.draining,
    }
    memory.plans.merge(change.memo)
    outcomes = _with_failures(
        {**last.outcomes, **change.outcomes}, change.plan, d.conflicts, results
    )
    return replace(
        last,
        plan=change.plan,
        observed={**last.observed, **observed},
        ops=d.ops,
        results=results,
        outcomes=outcomes,
        repairs=(),
    )
