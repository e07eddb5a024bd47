"""The change pass's planning (ipvs_agent.partial): a few Services' endpoints patched into the
last pass give exactly what a full plan gives, or a reason to run the full pass."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs_agent.desired import Node, Outcome, Plan, PlanMemo, State, plan
from ipvs_agent.partial import Change, changed_endpoints, plan_change
from ipvs_agent.snapshot import Snapshot
from ipvs_api.endpoints import Endpoint
from ipvs_api.types import VirtualServer
from tests.unit.agent_helpers import endpoints, slice_, vs

#: 10.9.0.1 is the node's own address, and 8080 one of its protected ports: an endpoint there
#: is refused (the node's own service), or with TUN makes the node a real server.
NODE = Node(
    "node-a",
    {"edge": "true"},
    addresses=frozenset({ipaddress.ip_address("10.9.0.1")}),
    protected_ports=frozenset({8080}),
)


def service_vs(name: str, address: str, service: str = "", **spec: Any) -> VirtualServer:
    return vs(
        name,
        address=address,
        ports=[{"port": 8080}],
        backends={"service": {"name": service or name}},
        **spec,
    )


def eps(*addresses: str) -> tuple[Endpoint, ...]:
    """Ready endpoints on port 8080, or the port after a colon (one slice per port); the one
    at this node's address is on this node."""
    by_port: dict[int, list[str]] = {}
    for text in addresses:
        address, _, named = text.partition(":")
        by_port.setdefault(int(named or 8080), []).append(address)
    slices = []
    for port, here in sorted(by_port.items()):
        on: list[tuple[str, dict[str, bool], str | None]] = [
            (a, {"ready": True}, "node-a" if a == "10.9.0.1" else "node-b") for a in here
        ]
        slices.append(slice_(on, [("", port, "TCP")]))
    return endpoints(*slices)


def last_pass(
    virtual_servers: Sequence[VirtualServer], index: dict[tuple[str, str], Any]
) -> tuple[Snapshot, Plan]:
    snap = Snapshot(tuple(virtual_servers), index, NODE)
    return snap, plan(snap.virtual_servers, snap.endpoints, NODE, memo=PlanMemo())


def test_one_services_endpoint_change_replans_only_its_virtual_server() -> None:
    servers = [service_vs(f"s{i}", f"192.0.2.{i + 1}") for i in range(5)]
    index = {("ns", f"s{i}"): eps(f"198.51.100.{i + 1}") for i in range(5)}
    snap, last = last_pass(servers, index)
    moved = {("ns", "s2"): eps("198.51.100.3", "203.0.113.9")}
    change = plan_change(snap, last, last.outcomes, moved)
    assert isinstance(change, Change), change
    full = plan(servers, change.snapshot.endpoints, NODE)
    assert change.plan.table == full.table
    assert change.plan.outcomes == full.outcomes
    assert change.outcomes.keys() == {"ns/s2"}
    assert [str(k.address) for k in change.services] == ["192.0.2.3"]
    assert change.outcomes["ns/s2"].real_servers == 2


def test_a_change_that_changes_nothing_plans_nothing() -> None:
    servers = [service_vs("web", "192.0.2.1")]
    snap, last = last_pass(servers, {("ns", "web"): eps("198.51.100.1")})
    change = plan_change(snap, last, last.outcomes, {("ns", "web"): eps("198.51.100.1")})
    assert isinstance(change, Change)
    assert change.services == frozenset()
    assert change.plan.table == last.table


def test_the_last_endpoint_gone_keeps_the_virtual_service_with_no_real_servers() -> None:
    servers = [service_vs("web", "192.0.2.1")]
    snap, last = last_pass(servers, {("ns", "web"): eps("198.51.100.1")})
    change = plan_change(snap, last, last.outcomes, changed_endpoints([("ns", "web")], {}))
    assert isinstance(change, Change), change
    assert ("ns", "web") not in change.snapshot.endpoints
    assert change.plan.table == plan(servers, {}, NODE).table


def test_the_memo_learns_what_the_change_pass_planned() -> None:
    servers = [service_vs(f"s{i}", f"192.0.2.{i + 1}") for i in range(3)]
    index = {("ns", f"s{i}"): eps(f"198.51.100.{i + 1}") for i in range(3)}
    snap = Snapshot(tuple(servers), index, NODE)
    memo = PlanMemo()
    last = plan(snap.virtual_servers, snap.endpoints, NODE, memo=memo)
    change = plan_change(snap, last, last.outcomes, {("ns", "s1"): eps("203.0.113.1")})
    assert isinstance(change, Change)
    memo.merge(change.memo)
    plan(change.snapshot.virtual_servers, change.snapshot.endpoints, NODE, memo=memo)
    assert (memo.hits, memo.misses) == (3, 0)


def reason(
    servers: Sequence[VirtualServer],
    before: dict[tuple[str, str], Any],
    after: dict[tuple[str, str], Any],
    outcomes: dict[str, Any] | None = None,
) -> str:
    snap, last = last_pass(servers, before)
    found = plan_change(snap, last, {**last.outcomes, **(outcomes or {})}, after)
    assert isinstance(found, str), "expected a full pass"
    return found


def test_what_only_a_full_pass_may_decide() -> None:
    web = {("ns", "web"): eps("198.51.100.1")}
    moved = {("ns", "web"): eps("198.51.100.2")}
    fed = service_vs("web", "192.0.2.1", feedback={"agent": {"port": 3333}})
    assert "feedback" in reason([fed], web, moved)
    dr = service_vs("web", "192.0.2.1", forwarding={"method": "DR"})
    assert "routes" in reason([dr], web, moved)
    # The earlier VirtualServer holds the address: the later one's services are not its own.
    first, second = service_vs("a", "192.0.2.1", "web"), service_vs("b", "192.0.2.1", "web")
    assert "ns/b" in reason([first, second], web, moved)
    # An endpoint of a TUN service landing on this node makes the node its real server.
    tun = service_vs("web", "192.0.2.1", forwarding={"method": "TUN"})
    assert "real server" in reason([tun], web, {("ns", "web"): eps("10.9.0.1")})
    # Its only endpoint now listens on another port, which TUN cannot reach: it fails here
    # and its virtual service goes.
    assert "virtual services" in reason([tun], web, {("ns", "web"): eps("203.0.113.5:9090")})
    # A VirtualServer the kernel refused last pass is retried by a full pass.
    failed = {"ns/web": Outcome(State.FAILED, "KernelError")}
    assert "KernelError" in reason([service_vs("web", "192.0.2.1")], web, moved, failed)


PLANS = st.lists(
    st.tuples(
        st.integers(0, 3),  # address (shared addresses conflict)
        st.sampled_from(["NAT", "TUN", "DR"]),
        st.booleans(),  # directs on this node
        st.integers(0, 2),  # Service
    ),
    min_size=1,
    max_size=6,
)
ENDPOINTS = st.dictionaries(
    st.integers(0, 2),
    st.lists(st.sampled_from(["198.51.100.1", "198.51.100.2", "203.0.113.5:9090", "10.9.0.1"]),
             max_size=3, unique=True),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(PLANS, ENDPOINTS, ENDPOINTS)
def test_a_change_pass_plans_exactly_what_a_full_plan_does(
    rows: list[tuple[int, str, bool, int]],
    before: dict[int, list[str]],
    after: dict[int, list[str]],
) -> None:
    servers = [
        service_vs(
            f"v{i}",
            f"192.0.2.{address + 1}",
            f"svc{service}",
            forwarding={"method": method},
            nodeSelector={} if directs else {"matchLabels": {"edge": "false"}},
        )
        for i, (address, method, directs, service) in enumerate(rows)
    ]
    index = {("ns", f"svc{s}"): eps(*found) for s, found in before.items() if found}
    snap, last = last_pass(servers, index)
    changed = {("ns", f"svc{s}"): eps(*found) if found else () for s, found in after.items()}
    change = plan_change(snap, last, last.outcomes, changed)
    if isinstance(change, str):
        return  # the full pass decides; what matters is that a change pass is never wrong
    full = plan(servers, change.snapshot.endpoints, NODE)
    assert change.plan.table == full.table
    assert change.plan.outcomes == full.outcomes
    assert change.plan.owners == full.owners
    assert change.plan.addresses == full.addresses
    assert change.plan.masquerade == full.masquerade
    assert change.plan.real_servers == full.real_servers
    moved = {k for k in full.table if full.table[k] != last.table.get(k)}
    assert moved <= change.services
