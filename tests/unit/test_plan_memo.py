"""The planner's memo (``desired.PlanMemo``): a resync plans only what changed, and the plan is
the same as without the memo whatever changed in between."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs_agent import desired
from ipvs_agent.desired import Node, PlanMemo, Route, plan
from ipvs_agent.health.verdict import Adjustment, Attention
from ipvs_agent.snapshot import index_endpoints
from ipvs_api.types import VirtualServer
from tests.unit.agent_helpers import vs

ip = ipaddress.ip_address
NODE = Node("node-a", {"director": "true"}, addresses=frozenset({ip("192.0.2.11")}))
REAL_SERVERS = [f"192.0.2.{i}" for i in range(11, 17)]


def static(name: str, method: str, servers: list[str], weight: int = 1) -> VirtualServer:
    forwarding: dict[str, Any] = {"method": method}
    if method == "TUN":
        forwarding["tunnel"] = {"type": "ipip"}
    return vs(
        name=name,
        address=f"203.0.113.{10 + int(name[1:])}",
        ports=[{"port": 80}],
        forwarding=forwarding,
        backends={"static": [{"address": a, "weight": weight} for a in servers]},
    )


def of_service(name: str, method: str) -> VirtualServer:
    return vs(
        name=name,
        address=f"203.0.113.{10 + int(name[1:])}",
        ports=[{"port": 80}],
        forwarding={"method": method},
        backends={"service": {"name": "web"}},
    )


def web_slice(ready: list[str]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [a], "nodeName": "node-a", "conditions": {"ready": True}} for a in ready
        ],
        "ports": [{"name": "", "port": 80, "protocol": "TCP"}],
    }


def test_a_resync_of_unchanged_inputs_plans_nothing_again() -> None:
    objects = [static(f"v{i}", "NAT", REAL_SERVERS[:3]) for i in range(5)]
    memo = PlanMemo()
    first = plan(objects, {}, NODE, memo=memo)
    assert (memo.hits, memo.misses) == (0, 5)
    again = plan(objects, {}, NODE, memo=memo)
    assert (memo.hits, memo.misses) == (5, 0)
    assert again == first
    assert all(again.table[k] is first.table[k] for k in first.table), "the same services"


def test_a_resync_of_the_very_same_inputs_returns_the_last_plan_itself() -> None:
    """The same validated objects (as ReadCache hands them back), equal endpoints, node,
    routes and verdicts: nothing is planned, not even the bookkeeping around the services."""
    objects = (static("v1", "NAT", REAL_SERVERS[:3]), of_service("v2", "DR"))
    endpoints = index_endpoints([web_slice(REAL_SERVERS[:2])])
    memo = PlanMemo()
    first = plan(objects, endpoints, NODE, memo=memo)
    again = plan(list(objects), dict(endpoints), NODE, {}, adjustments={}, memo=memo)
    assert again is first
    assert (memo.hits, memo.misses) == (2, 0)
    # An equal but new object (a file read again, no resourceVersion) plans as before it.
    fresh = (static("v1", "NAT", REAL_SERVERS[:3]), objects[1])
    third = plan(fresh, endpoints, NODE, memo=memo)
    assert third is not first and third == first
    assert (memo.hits, memo.misses) == (2, 0), "still every VirtualServer from the memo"
    # Each other input, changed, is a new plan (the property test below: the right one).
    down = {"ns/v1": {("192.0.2.12", 0): Adjustment(down=True, attention=Attention.DOWN)}}
    off = {ip("192.0.2.12"): Route(False, "via 192.0.2.254")}
    other = Node("node-a", {}, addresses=NODE.addresses)
    changed = index_endpoints([web_slice(REAL_SERVERS[:3])])
    for kwargs in (
        {"adjustments": down},
        {"routes": off},
        {"node": other},
        {"endpoints": changed},
        {"virtual_servers": fresh[:1]},
    ):
        inputs: dict[str, Any] = {"virtual_servers": fresh, "endpoints": endpoints, "node": NODE}
        inputs.update(kwargs)
        base = plan(fresh, endpoints, NODE, memo=memo)
        assert plan(**inputs, memo=memo) is not base, kwargs


def test_a_plan_with_a_broken_virtual_server_is_not_kept_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It depends on ``previous`` too (what the broken one had set up), which is not
    compared: such a plan is made afresh, with its healthy VirtualServers from the memo."""
    real = desired._services

    def broken(vs: VirtualServer, *args: Any, **kwargs: Any) -> Any:
        if vs.name == "v2":
            raise RuntimeError("planner bug")
        return real(vs, *args, **kwargs)

    monkeypatch.setattr(desired, "_services", broken)
    objects = (static("v1", "NAT", REAL_SERVERS[:3]), static("v2", "NAT", REAL_SERVERS[3:]))
    memo = PlanMemo()
    first = plan(objects, {}, NODE, memo=memo)
    assert first.broken == {"ns/v2"}
    again = plan(objects, {}, NODE, memo=memo)
    assert again is not first and again == first
    assert memo.hits == 1


def test_a_change_pass_merged_into_the_memo_ends_the_whole_plan() -> None:
    objects = (static("v1", "NAT", REAL_SERVERS[:3]),)
    memo = PlanMemo()
    first = plan(objects, {}, NODE, memo=memo)
    sub = PlanMemo()
    plan(objects, {}, NODE, memo=sub)
    memo.merge(sub)
    assert plan(objects, {}, NODE, memo=memo) is not first


def test_each_kind_of_input_change_plans_only_what_it_touches() -> None:
    objects = [static("v1", "DR", REAL_SERVERS[:3]), of_service("v2", "NAT")]
    endpoints = index_endpoints([web_slice(REAL_SERVERS[:2])])
    memo = PlanMemo()
    plan(objects, endpoints, NODE, memo=memo)

    changed = index_endpoints([web_slice(REAL_SERVERS[:3])])
    p = plan(objects, changed, NODE, memo=memo)
    assert (memo.hits, memo.misses) == (1, 1), "an endpoint change: its VirtualServer only"
    assert len(p.table[next(k for k, o in p.owners.items() if o == "ns/v2")].dests) == 3

    down = {"ns/v1": {("192.0.2.12", 0): Adjustment(down=True, attention=Attention.DOWN)}}
    p = plan(objects, changed, NODE, adjustments=down, memo=memo)
    assert (memo.hits, memo.misses) == (1, 1), "a health verdict: its VirtualServer only"
    assert p.outcomes["ns/v1"].down_real_servers == 1

    off = {ip("192.0.2.13"): Route(False, "via 192.0.2.254")}
    p = plan(objects, changed, NODE, off, adjustments=down, memo=memo)
    assert (memo.hits, memo.misses) == (1, 1), "a DR route: the DR VirtualServer only"
    assert "192.0.2.13" in p.outcomes["ns/v1"].message
    on = {ip("192.0.2.13"): Route(True)}
    plan(objects, changed, NODE, on, adjustments=down, memo=memo)
    assert memo.misses == 1, "back on-link"
    plan(objects, changed, NODE, {}, adjustments=down, memo=memo)
    assert (memo.hits, memo.misses) == (2, 0), "on-link and unknown plan the same"

    relabelled = Node("node-a", {}, addresses=NODE.addresses)
    plan(objects, changed, relabelled, memo=memo)
    assert memo.hits == 0, "another node: everything afresh"


#: Each input of the plan in two versions; a step of the test below flips one of them.
INPUTS: dict[str, tuple[Any, Any]] = {
    "v1 method": ("NAT", "DR"),
    "v1 real servers": (REAL_SERVERS[:3], REAL_SERVERS[1:4]),
    "v1 weight": (1, 0),  # 0: all drained
    "v2 method": ("NAT", "DR"),
    "v2 endpoints": (REAL_SERVERS[:2], REAL_SERVERS[2:5]),
    "off-link": (set(), {REAL_SERVERS[2]}),
    "down by health": (set(), {REAL_SERVERS[1]}),
    "node": ((("director", "true"),), ()),  # labels; the second node also has .12
    "v3 conflicts with v1": (False, True),
}


@settings(max_examples=150, deadline=None)
@given(
    start=st.tuples(*(st.sampled_from([0, 1]) for _ in INPUTS)),
    flips=st.lists(st.sampled_from(sorted(INPUTS)), min_size=1, max_size=8),
)
def test_with_the_memo_every_plan_is_the_plan_without_it(
    start: tuple[int, ...], flips: list[str]
) -> None:
    """One input changes per step (the memo's hard case: everything else is reused)."""
    chosen = dict(zip(INPUTS, start, strict=True))
    memo = PlanMemo()
    for step in [None, *flips]:
        if step is not None:
            chosen[step] = 1 - chosen[step]
        value = {name: INPUTS[name][i] for name, i in chosen.items()}
        labels = dict(value["node"])
        addresses = NODE.addresses | ({ip(REAL_SERVERS[1])} if not labels else set())
        node = Node("node-a", labels, addresses=frozenset(addresses))
        v1 = static("v1", value["v1 method"], value["v1 real servers"], value["v1 weight"])
        v3 = static("v3", "NAT", REAL_SERVERS[4:])
        if value["v3 conflicts with v1"]:
            v3 = vs(
                name="v3",
                created="2026-12-31T00:00:00Z",  # later than v1: loses
                address=str(v1.spec.address),
                ports=[{"port": 80}],
                backends={"static": [{"address": REAL_SERVERS[5]}]},
            )
        objects = [v1, of_service("v2", value["v2 method"]), v3]
        endpoints = index_endpoints([web_slice(value["v2 endpoints"])])
        off = value["off-link"]
        routes = {ip(a): Route(a not in off, "via gw" if a in off else "") for a in REAL_SERVERS}
        health = {
            "ns/v1": {
                (a, 0): Adjustment(down=True, attention=Attention.DOWN)
                for a in value["down by health"]
            }
        }
        memoised = plan(objects, endpoints, node, routes, adjustments=health, memo=memo)
        assert memoised == plan(objects, endpoints, node, routes, adjustments=health), step
        # A resync with nothing changed: the same plan, whatever came before.
        again = plan(objects, endpoints, node, dict(routes), adjustments=health, memo=memo)
        assert again is memoised, step
