"""One reconcile pass: snapshot → plan → diff against the live table → apply → outcomes.

The same pass serves the in-cluster agent, ``ipvs-agent apply -f`` and (with ``dry_run``)
``ipvs-agent plan -f``. The kernel and the host are reached only through the small
:class:`~ipvs_agent.kernel.Kernel` and :class:`Host` interfaces, so every branch here is
unit-tested with fakes and proven on the real kernel in the VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import ip_address
from typing import Protocol, runtime_checkable

from ipvs_agent.desired import (
    Outcome,
    Plan,
    RealServerNetns,
    Route,
    State,
    dr_destinations,
    plan,
)
from ipvs_agent.diff import diff
from ipvs_agent.host.realserver import RealServerSpec
from ipvs_agent.kernel import Kernel, OpResult
from ipvs_agent.model import DestKey, IPAddress, ObservedTable, ServiceKey
from ipvs_agent.ops import Op, OpKind
from ipvs_agent.snapshot import Snapshot


class Host(Protocol):
    """The host state around IPVS that the agent owns (addresses, nftables)."""

    def owned(self) -> set[ServiceKey]:
        """The kernel services recorded as the agent's own (survives agent restarts)."""

    def record(self, owned: set[ServiceKey], masquerade: set[ServiceKey]) -> None:
        """Write the ownership record and the masquerade rules, atomically."""

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


REAL_SERVER_SETUP_FAILED = "RealServerSetupFailed"


@dataclass
class Memory:
    """What the agent carries from one pass to the next, in memory only.

    Losing it (a restart) is safe: a drain in progress simply starts its timer again.
    """

    draining: dict[tuple[ServiceKey, DestKey], float] = field(default_factory=dict)


@dataclass(frozen=True)
class PassResult:
    plan: Plan
    observed: ObservedTable
    ops: list[Op]
    results: list[OpResult]
    outcomes: Mapping[str, Outcome]

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
        if r.ok or failed is None:
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


def reconcile(
    snapshot: Snapshot,
    kernel: Kernel,
    host: Host,
    memory: Memory,
    now: float,
    dry_run: bool = False,
) -> PassResult:
    """Bring the kernel to the snapshot's desired table; touch only what the agent owns."""
    p = plan(snapshot.virtual_servers, snapshot.endpoints, snapshot.node)
    side = host if isinstance(host, RealServerSide) else None
    if side is not None:
        # DR reaches only real servers on the director's segment: ask the kernel's FIB, and plan
        # again without the off-link ones (rare, so the common pass plans once).
        dr = dr_destinations(p)
        routes = side.routes(set(dr)) if dr else {}
        if any(not route.on_link for route in routes.values()):
            p = plan(snapshot.virtual_servers, snapshot.endpoints, snapshot.node, routes)
    owned_before = host.owned()
    observed = kernel.dump()
    d = diff(p.table, observed, owned_before.__contains__, p.drain_seconds, memory.draining, now)
    outcomes = {**p.outcomes, **snapshot.rejected}
    if dry_run:
        return PassResult(p, observed, d.ops, [], _with_failures(outcomes, p, d.conflicts, []))

    ours = set(p.table) - d.conflicts
    # Ownership is recorded before a service is created and dropped only after it is gone,
    # so a crash in between leaves at worst a record without a service (cleaned next pass).
    host.record(owned_before | ours, set(p.masquerade) - d.conflicts)
    # A new virtual address is local before its service exists, and an old one stays until its
    # service is gone, so no client ever meets a service whose address does not answer.
    wanted = set(p.addresses)
    going = {ip_address(k.address) for k in observed if k in owned_before and not k.fwmark}
    host.sync_addresses(wanted | going)
    results = kernel.apply(d.ops)
    memory.draining = dict(d.draining)

    still_there = {
        r.op.service.key for r in results if r.op.kind is OpKind.DEL_SERVICE and not r.ok
    }
    host.record(ours | still_there, set(p.masquerade) - d.conflicts)
    if going - wanted:  # else the first sync already left exactly the wanted addresses
        host.sync_addresses(wanted)
    outcomes = _with_failures(outcomes, p, d.conflicts, results)
    if side is not None:
        errors = side.sync_real_servers(p.real_servers)
        outcomes = _with_real_server_failures(outcomes, p, errors)
    return PassResult(p, observed, d.ops, results, outcomes)
