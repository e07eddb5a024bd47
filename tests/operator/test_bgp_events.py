"""Events on BGPPeers for the sessions the agents report in their IPVSNodes (issue: BGP).

No agent runs here: the test writes IPVSNode ``status.bgp`` the way agents do. The test runs
its own operator processes, so it can restart one and show that nothing is posted twice.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from ipvs_operator.events import CLUSTER_EVENTS_NAMESPACE
from tests.operator import harness
from tests.operator.conftest import start_operator
from tests.operator.harness import get_vs, wait_for
from tests.operator.test_status import Nodes


@pytest.fixture
def nodes(admin: Any, ns: str) -> Iterator[Nodes]:
    made = Nodes(admin, ns[-20:].strip("-"))
    yield made
    made.remove()


@pytest.fixture
def peers(admin: Any) -> Iterator[dict[str, dict[str, Any]]]:
    """Two BGPPeers with names no other test uses (their Events outlive the test)."""
    suffix = secrets.token_hex(3)
    custom = harness.custom(admin)
    made = {}
    for name, address in ((f"tor-a-{suffix}", "192.0.2.1"), (f"tor-b-{suffix}", "192.0.2.2")):
        body = {
            "apiVersion": f"{harness.GROUP}/{harness.VERSION}",
            "kind": "BGPPeer",
            "metadata": {"name": name},
            "spec": {"address": address, "asn": 64512, "localASN": 64513},
        }
        made[name] = custom.create_cluster_custom_object(
            harness.GROUP, harness.VERSION, "bgppeers", body
        )
    yield made
    for name in made:
        try:
            custom.delete_cluster_custom_object(harness.GROUP, harness.VERSION, "bgppeers", name)
        except ApiException as exc:
            if exc.status != 404:
                raise


def report_sessions(api: Any, node: str, *sessions: tuple[dict[str, Any], str]) -> None:
    """The node's ``status.bgp``: a session per (BGPPeer, state)."""
    listed = [
        {"peer": p["metadata"]["name"], "address": p["spec"]["address"], "state": s, "prefixes": 1}
        for p, s in sessions
    ]
    harness.custom(api).patch_cluster_custom_object_status(
        harness.GROUP,
        harness.VERSION,
        "ipvsnodes",
        node,
        {"status": {"bgp": {"sessions": listed, "announced": ["10.77.0.1/32"]}}},
    )


def described(api: Any, peer: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events ``kubectl describe bgppeer`` shows: it selects
    them by the object's kind, name, uid and (empty) namespace, in every namespace."""
    meta = peer["metadata"]
    selector = ",".join(
        [
            "involvedObject.kind=BGPPeer",
            f"involvedObject.name={meta['name']}",
            f"involvedObject.uid={meta['uid']}",
            "involvedObject.namespace=",
        ]
    )
    listed: Any = harness.core(api).list_event_for_all_namespaces(field_selector=selector)
    assert {e.metadata.namespace for e in listed.items} <= {CLUSTER_EVENTS_NAMESPACE}
    # In the order posted: timestamps have whole seconds, etcd's revisions only grow.
    found = sorted(listed.items, key=lambda e: int(e.metadata.resource_version))
    return [(e.type, e.reason, e.message) for e in found]


def listed(api: Any, ns: str, name: str) -> None:
    """Wait until the running operator has listed everything: a VirtualServer created now gets
    a status only once its indexes are full, so any report written after is a change it sees
    (and not part of the first sight that a restart only remembers)."""
    harness.custom(api).create_namespaced_custom_object(
        harness.GROUP, harness.VERSION, ns, "virtualservers", harness.virtual_server(name)
    )
    wait_for(
        f"VirtualServer {name}'s status",
        lambda: "observedGeneration" in ((get_vs(api, ns, name) or {}).get("status") or {}),
    )


def test_sessions_crossing_established_are_events_on_their_peer_once(
    admin: Any,
    ns: str,
    nodes: Nodes,
    peers: dict[str, dict[str, Any]],
    operator_kubeconfig: Path,
    tmp_path: Path,
) -> None:
    """A session coming up and going down is one Event each on its BGPPeer, shown by
    ``kubectl describe``; retries in between are none, and a restarted operator that sees the
    same sessions again posts nothing."""
    tor_a, tor_b = peers.values()
    node = nodes.add("a", {})
    first = start_operator(operator_kubeconfig, tmp_path, "bgp-events-a")
    second: harness.Operator | None = None
    try:
        listed(admin, ns, "at-start")
        for state in ("Connecting", "Connected", "Established"):
            report_sessions(admin, node, (tor_a, state), (tor_b, "Connecting"))
        up = wait_for("a SessionEstablished Event on tor-a", lambda: described(admin, tor_a))
        assert up == [
            ("Normal", "SessionEstablished", f"node {node}: session with 192.0.2.1 is Established")
        ]

        # Down, then retrying: one Warning, however often the retry state changes.
        for state in ("Down", "Connecting", "Connected", "Down", "Connecting"):
            report_sessions(admin, node, (tor_a, state), (tor_b, "Connecting"))
        # tor-b coming up is reported after tor-a's retries, so they were all seen before it.
        report_sessions(admin, node, (tor_a, "Connecting"), (tor_b, "Established"))
        wait_for("a SessionEstablished Event on tor-b", lambda: described(admin, tor_b))
        assert described(admin, tor_a) == [
            *up,
            ("Warning", "SessionDown", f"node {node}: session with 192.0.2.1 is Down"),
        ]

        # A restart sees tor-b's session established again: no Event repeated.
        assert first.stop() == 0, first.tail()
        second = start_operator(operator_kubeconfig, tmp_path, "bgp-events-b")
        listed(admin, ns, "after-restart")
        report_sessions(admin, node, (tor_a, "Connecting"))  # tor-b's session leaves the report
        wait_for(
            "a SessionDown Event on tor-b",
            lambda: "SessionDown" in [e[1] for e in described(admin, tor_b)],
        )
        assert described(admin, tor_b) == [
            ("Normal", "SessionEstablished", f"node {node}: session with 192.0.2.2 is Established"),
            (
                "Warning",
                "SessionDown",
                f"node {node}: session with 192.0.2.2 is no longer reported",
            ),
        ]
        assert len(described(admin, tor_a)) == 2
    finally:
        first.kill()
        if second is not None:
            assert second.stop() == 0, second.tail()


def test_sessions_of_a_node_whose_agent_lease_goes_stale_are_down_until_it_is_fresh(
    admin: Any,
    ns: str,
    nodes: Nodes,
    peers: dict[str, dict[str, Any]],
    operator_kubeconfig: Path,
    tmp_path: Path,
) -> None:
    """An agent that dies takes its BGP speaker along but cannot say so; its IPVSNode still
    reads Established. A stale Lease is the word: a SessionDown saying so, and a
    SessionEstablished once the Lease is fresh again."""
    tor_a, _ = peers.values()
    node = nodes.add("a", {})
    nodes.keep_lease(node)
    op = start_operator(operator_kubeconfig, tmp_path, "bgp-events-stale")
    try:
        listed(admin, ns, "at-start")
        report_sessions(admin, node, (tor_a, "Established"))
        up = wait_for("a SessionEstablished Event on tor-a", lambda: described(admin, tor_a))
        nodes.keep_lease(node, duration=2.0)  # its last renewal: then it dies
        wait_for("a SessionDown Event", lambda: len(described(admin, tor_a)) > 1, 30)
        router = f"node {node}: session with 192.0.2.1"
        assert described(admin, tor_a) == [
            *up,
            ("Warning", "SessionDown", f"{router} is presumed down: the agent's Lease is stale"),
        ]
        nodes.keep_lease(node)  # back
        wait_for("the session told again", lambda: len(described(admin, tor_a)) > 2, 30)
        assert described(admin, tor_a)[2:] == [
            ("Normal", "SessionEstablished", f"{router} is Established")
        ]
    finally:
        assert op.stop() == 0, op.tail()
