"""A change pass: a few Services' endpoints changed, nothing else did.

A full pass reads every object, plans every VirtualServer and dumps the whole kernel table:
seconds at thousands of services, for what is usually one endpoint of one Service. When the
mirrors say that only EndpointSlices changed (``cluster.Changes``), :func:`plan_change`
plans again just the VirtualServers that use those Services and, if the result changes only
their real servers, patches the last plan; the shell then reads, diffs and writes only those
kernel services (``reconciler.reconcile_change``).

Anything beyond real servers — a service created or removed, this node's role as a real
server, health checks or feedback, DR routes, a VirtualServer that was not cleanly
programmed — is a reason to run the full pass instead, which :func:`plan_change` returns as
a string. The periodic resync stays a full pass, so drift is still found.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from ipvs_agent.desired import EndpointIndex, Outcome, Plan, PlanMemo, State, plan
from ipvs_agent.model import ServiceKey
from ipvs_agent.snapshot import Snapshot
from ipvs_api.endpoints import Endpoint
from ipvs_api.types import ForwardingMethod, VirtualServer


@dataclass(frozen=True)
class Change:
    """The last pass's snapshot and plan, patched with the changed endpoints."""

    snapshot: Snapshot
    plan: Plan
    #: The re-planned VirtualServers' outcomes (to lay over the last pass's).
    outcomes: Mapping[str, Outcome]
    #: The kernel services to read, diff and write.
    services: frozenset[ServiceKey]
    #: The re-planned VirtualServers' memo entries (``PlanMemo.merge`` once applied).
    memo: PlanMemo


def _users(
    virtual_servers: Iterable[VirtualServer], services: Iterable[tuple[str, str]]
) -> list[VirtualServer]:
    wanted = set(services)
    return [
        vs
        for vs in virtual_servers
        if vs.spec.backends.service is not None
        and (vs.namespace, vs.spec.backends.service) in wanted
    ]


def _owned(owners: Mapping[ServiceKey, str], keys: set[str]) -> dict[str, set[ServiceKey]]:
    found: dict[str, set[ServiceKey]] = {key: set() for key in keys}
    for service, owner in owners.items():
        if owner in found:
            found[owner].add(service)
    return found


def plan_change(
    last: Snapshot,
    last_plan: Plan,
    last_outcomes: Mapping[str, Outcome],
    endpoints: Mapping[tuple[str, str], Sequence[Endpoint]],
) -> Change | str:
    """Patch the last pass (its snapshot, plan and final outcomes) with ``endpoints`` (the
    changed Services' endpoints now; an empty sequence for a Service that has none left), or
    say why a full pass must run."""
    changed = {
        service: found
        for service, found in endpoints.items()
        if list(found) != list(last.endpoints.get(service, ()))
    }
    index: dict[tuple[str, str], Sequence[Endpoint]] = dict(last.endpoints)
    for service, found in changed.items():
        if found:
            index[service] = found
        else:
            index.pop(service, None)
    snapshot = replace(last, endpoints=index)
    users = _users(last.virtual_servers, changed)
    keys = {vs.key for vs in users}
    for vs in users:
        if vs.key in last_plan.broken:
            return f"{vs.key}: the planner failed on it last pass"
        if vs.spec.health_check is not None or vs.spec.feedback is not None:
            return f"{vs.key}: health checks or feedback follow its real servers"
        if vs.spec.forwarding.method is ForwardingMethod.DR:
            return f"{vs.key}: DR real servers need the director's routes"
        if last.adjustments.get(vs.key):
            return f"{vs.key}: health verdicts apply to it"
        was = last_outcomes.get(vs.key)
        if was is not None and was.state is not State.PROGRAMMED:
            return f"{vs.key}: it was {was.state} ({was.reason}) after the last pass"
    memo = PlanMemo()
    sub = plan(users, index, last.node, previous=last_plan.real_server_parts, memo=memo)
    if sub.broken:
        return f"{min(sub.broken)}: the planner failed on it"
    before, after = _owned(last_plan.owners, keys), _owned(sub.owners, keys)
    for vs in users:
        directs = vs.spec.node_selector.matches(last.node.labels)
        if directs and (not before[vs.key] or after[vs.key] != before[vs.key]):
            return f"{vs.key}: its virtual services change, or were not all programmed"
        if sub.real_server_parts.get(vs.key, {}) != last_plan.real_server_parts.get(vs.key, {}):
            return f"{vs.key}: this node's part as its real server changes"
    services = frozenset(k for owned in after.values() for k in owned)
    patched = replace(
        last_plan,
        table={**last_plan.table, **{k: sub.table[k] for k in services}},
        outcomes={**last_plan.outcomes, **sub.outcomes},
    )
    return Change(snapshot, patched, sub.outcomes, services, memo)


def changed_endpoints(
    services: Iterable[tuple[str, str]], index: EndpointIndex
) -> dict[tuple[str, str], Sequence[Endpoint]]:
    """Each of ``services`` with its endpoints in ``index`` (an empty tuple if none)."""
    return {service: index.get(service, ()) for service in services}
