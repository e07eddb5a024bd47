"""VirtualServer status from EndpointSlices and the agents' IPVSNode reports (issue point 3).

No agent runs here: the test writes IPVSNode objects (and Nodes) the way agents and kubelets
would, and EndpointSlices the way the EndpointSlice controller would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ipvs_agent.announce.members import lease_body, micro_time
from ipvs_api.leases import lease_name
from tests.operator import harness
from tests.operator.conftest import PoolFactory
from tests.operator.harness import condition, get_vs, wait_for


def endpoint_slice(service: str, ready: list[str], terminating: list[str]) -> dict[str, Any]:
    endpoints = [{"addresses": [a], "conditions": {"ready": True}} for a in ready] + [
        {"addresses": [a], "conditions": {"ready": False, "serving": True, "terminating": True}}
        for a in terminating
    ]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-abc", "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


class Nodes:
    """Nodes and their agents' IPVSNode reports, removed after the test."""

    def __init__(self, api: Any, prefix: str) -> None:
        self.api = api
        self.prefix = prefix
        self.names: list[str] = []

    def add(self, suffix: str, labels: dict[str, str]) -> str:
        name = f"{self.prefix}-{suffix}"
        harness.core(self.api).create_node({"metadata": {"name": name, "labels": labels}})
        harness.custom(self.api).create_cluster_custom_object(
            harness.GROUP,
            harness.VERSION,
            "ipvsnodes",
            {"apiVersion": "ipvs.io/v1alpha1", "kind": "IPVSNode", "metadata": {"name": name}},
        )
        self.names.append(name)
        self.report(name, [])
        return name

    def report(self, node: str, entries: list[dict[str, Any]]) -> None:
        harness.custom(self.api).patch_cluster_custom_object_status(
            harness.GROUP,
            harness.VERSION,
            "ipvsnodes",
            node,
            {"status": {"virtualServers": entries}},
        )

    def keep_lease(self, node: str, duration: float = 3600.0, renewed: str = "") -> None:
        """The node's agent Lease, as its LeaseKeeper writes it (alive for ``duration``)."""
        body = lease_body(
            harness.OPERATOR_NAMESPACE, node, duration, {}, (), renewed or micro_time()
        )
        coordination: Any = client.CoordinationV1Api(self.api)  # plain dicts as bodies
        try:
            current = coordination.read_namespaced_lease(
                lease_name(node), harness.OPERATOR_NAMESPACE
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            coordination.create_namespaced_lease(harness.OPERATOR_NAMESPACE, body)
        else:
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            coordination.replace_namespaced_lease(
                lease_name(node), harness.OPERATOR_NAMESPACE, body
            )

    def drop_lease(self, node: str) -> None:
        try:
            client.CoordinationV1Api(self.api).delete_namespaced_lease(
                lease_name(node), harness.OPERATOR_NAMESPACE
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def remove(self) -> None:
        for name in self.names:
            self.drop_lease(name)
            for delete in (
                lambda n=name: harness.custom(self.api).delete_cluster_custom_object(
                    harness.GROUP, harness.VERSION, "ipvsnodes", n
                ),
                lambda n=name: harness.core(self.api).delete_node(n),
            ):
                try:
                    delete()
                except ApiException as exc:
                    if exc.status != 404:
                        raise


@pytest.fixture
def nodes(admin: Any, ns: str) -> Iterator[Nodes]:
    made = Nodes(admin, ns[-20:].strip("-"))
    yield made
    made.remove()


def entry(ns: str, generation: int, state: str = "Programmed", **extra: Any) -> dict[str, Any]:
    return {
        "namespace": ns,
        "name": "web",
        "observedGeneration": generation,
        "roles": ["Director"],
        "state": state,
        **extra,
    }


def status_of(api: Any, ns: str) -> dict[str, Any]:
    found: dict[str, Any] = (get_vs(api, ns, "web") or {}).get("status") or {}
    return found


def reason(api: Any, ns: str, type_: str) -> tuple[str, str]:
    cond = condition({"status": status_of(api, ns)}, type_)
    return str(cond.get("status")), str(cond.get("reason"))


def test_status_aggregates_slices_and_agent_reports(
    admin: Any, ns: str, pool: PoolFactory, nodes: Nodes, operator: harness.Operator
) -> None:
    pool(4)
    core = harness.core(admin)
    core.create_namespaced_service(ns, harness.service("web"))
    discovery = harness.discovery(admin)
    discovery.create_namespaced_endpoint_slice(
        ns, endpoint_slice("web", ["10.1.0.1", "10.1.0.2"], ["10.1.0.3"])
    )
    wait_for(
        "real servers 2/3",
        lambda: (
            status_of(admin, ns).get("realServers") == {"ready": 2, "total": 3, "summary": "2/3"}
        ),
    )
    assert reason(admin, ns, "Programmed") == ("False", "NoDirectors")
    assert reason(admin, ns, "Ready") == ("False", "NoDirectors")
    allocated_at = condition({"status": status_of(admin, ns)}, "AddressAllocated")[
        "lastTransitionTime"
    ]

    # Two agents; one reports this generation programmed, the other has not reported yet.
    edge = nodes.add("edge", {"edge": "true"})
    core_node = nodes.add("core", {"edge": "false"})
    nodes.report(edge, [entry(ns, 1, realServers=2)])
    wait_for(
        "1/2 directors",
        lambda: (
            status_of(admin, ns).get("nodes") == {"desired": 2, "programmed": 1, "summary": "1/2"}
        ),
    )
    assert reason(admin, ns, "Programmed") == ("False", "Pending")
    assert core_node in condition({"status": status_of(admin, ns)}, "Programmed")["message"]

    # A director that fails says why, and that is worth an Event.
    nodes.report(core_node, [entry(ns, 1, "Failed", reason="KernelError", message="EINVAL")])
    wait_for("KernelError", lambda: reason(admin, ns, "Programmed") == ("False", "KernelError"))
    wait_for(
        "a KernelError Event",
        lambda: (
            ("Warning", "KernelError") in [e[:2] for e in harness.events(admin, ns, name="web")]
        ),
    )

    # Only edge nodes direct it now: a new generation, which the edge agent then programs.
    core.patch_namespaced_service(
        "web", ns, {"metadata": {"annotations": {"ipvs.io/node-selector": "edge=true"}}}
    )
    wait_for(
        "generation 2", lambda: (get_vs(admin, ns, "web") or {})["metadata"]["generation"] == 2
    )
    nodes.report(core_node, [])  # its agent drops what its node no longer directs
    wait_for("Pending again", lambda: reason(admin, ns, "Programmed") == ("False", "Pending"))
    nodes.report(edge, [entry(ns, 2, realServers=2)])
    wait_for("Ready", lambda: reason(admin, ns, "Ready") == ("True", "Serving"))
    st = status_of(admin, ns)
    assert st["observedGeneration"] == 2
    assert st["nodes"] == {"desired": 1, "programmed": 1, "summary": "1/1"}
    assert reason(admin, ns, "Programmed") == ("True", "AllProgrammed")
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["AddressAllocated"]["lastTransitionTime"] == allocated_at
    assert all(c["observedGeneration"] == 2 for c in conds.values())
    wait_for(
        "a Ready Event",
        lambda: ("Normal", "Ready") in [e[:2] for e in harness.events(admin, ns, name="web")],
    )

    # Every endpoint goes away: not ready, with a reason and an Event.
    discovery.replace_namespaced_endpoint_slice(
        "web-abc", ns, endpoint_slice("web", [], ["10.1.0.1"])
    )
    wait_for("NoBackends", lambda: reason(admin, ns, "Ready") == ("False", "NoBackends"))
    assert status_of(admin, ns)["realServers"] == {"ready": 0, "total": 1, "summary": "0/1"}
    wait_for(
        "a NotReady Event",
        lambda: ("Warning", "NotReady") in [e[:2] for e in harness.events(admin, ns, name="web")],
    )


def test_the_service_names_the_nodes_that_announce_its_address(
    admin: Any, ns: str, pool: PoolFactory, nodes: Nodes, operator: harness.Operator
) -> None:
    """Layer-2 announcement as the agents report it: the VirtualServer's status and the
    Service's condition name the announcing node, and every move is an Event on both."""
    pool(4)
    core = harness.core(admin)
    core.create_namespaced_service(ns, harness.service("web"))
    wait_for("an address", lambda: bool(status_of(admin, ns).get("address")))
    address = status_of(admin, ns)["address"]
    first, second = nodes.add("a", {}), nodes.add("b", {})
    for node in (first, second):
        nodes.keep_lease(node)  # their agents are alive
    announced = {"mode": "Layer2", "interfaces": ["eth0"]}

    def service_condition() -> dict[str, Any]:
        found = core.read_namespaced_service_status("web", ns).to_dict()["status"]
        return condition({"status": {"conditions": found.get("conditions") or []}},
                         "ipvs.io/Announced")  # fmt: skip

    nodes.report(first, [entry(ns, 1, announcement=announced)])
    nodes.report(second, [entry(ns, 1)])
    wait_for("announced by a", lambda: service_condition().get("status") == "True")
    assert status_of(admin, ns)["announcement"] == {"mode": "Layer2", "nodes": [first]}
    assert service_condition()["message"] == f"{address} on layer 2 by {first}"
    nodes.report(second, [entry(ns, 1, announcement=announced)])
    nodes.report(first, [entry(ns, 1)])
    wait_for(
        "announced by b",
        lambda: service_condition().get("message") == f"{address} on layer 2 by {second}",
    )
    # The operator may see both reports at once or one after the other (by a and b, then b):
    # either way the last move names b alone.
    moved = f"{address} announced on layer 2 by {second} (was on layer 2 by "

    def move_posted(kind: str) -> bool:
        return any(
            e[1] == "Announced" and moved in e[2]
            for e in harness.events(admin, ns, name="web", kind=kind)
        )

    wait_for("the move as an Event on the VirtualServer", lambda: move_posted("VirtualServer"))
    wait_for("the move as an Event on the Service", lambda: move_posted("Service"))
    nodes.report(second, [entry(ns, 1)])
    wait_for("not announced", lambda: service_condition().get("reason") == "NotAnnounced")


def test_an_agent_that_died_is_not_named_as_announcing(
    admin: Any, ns: str, pool: PoolFactory, nodes: Nodes, operator: harness.Operator
) -> None:
    """An agent that dies cannot take its report back: its Lease tells. Deleted (a planned
    stop whose last report was lost) or stale (a crash), the node is no longer named."""
    pool(4)
    harness.core(admin).create_namespaced_service(ns, harness.service("web"))
    wait_for("an address", lambda: bool(status_of(admin, ns).get("address")))
    node = nodes.add("a", {})
    announced = {"mode": "Layer2", "interfaces": ["eth0"]}

    def announcers() -> list[str]:
        return list((status_of(admin, ns).get("announcement") or {}).get("nodes") or [])

    nodes.keep_lease(node)
    nodes.report(node, [entry(ns, 1, announcement=announced)])
    wait_for("announced by a", lambda: announcers() == [node])
    nodes.drop_lease(node)  # the agent stopped; its report still says it announces
    wait_for("no longer named once its Lease is gone", lambda: announcers() == [])
    wait_for(
        "a NotAnnounced Warning",
        lambda: "NotAnnounced" in [e[1] for e in harness.events(admin, ns, name="web")],
    )
    nodes.keep_lease(node, duration=2.0)  # back, and then it dies: the Lease is never renewed
    wait_for("announced by a again", lambda: announcers() == [node])
    wait_for("no longer named once its Lease is stale", lambda: announcers() == [], 30)


def test_bgp_announcements_do_not_need_a_lease(
    admin: Any, ns: str, pool: PoolFactory, nodes: Nodes, operator: harness.Operator
) -> None:
    """The agents' Leases belong to the layer-2 election: an agent that only peers over BGP
    keeps none, and whether its routes are used is the router's call (a dead agent's ExaBGP
    dies with its container and the session closes; a dead node's after the hold time). So a
    BGP announcement is named without a Lease, next to a layer-2 one that needs it (a stale
    Lease is another matter: the next test)."""
    pool(4)
    harness.core(admin).create_namespaced_service(ns, harness.service("web"))
    wait_for("an address", lambda: bool(status_of(admin, ns).get("address")))
    node = nodes.add("a", {})
    nodes.report(node, [entry(ns, 1, announcement={"mode": "BGP", "peers": ["r1"]})])
    wait_for(
        "announced over BGP by a, with no Lease",
        lambda: status_of(admin, ns).get("announcement") == {"mode": "BGP", "nodes": [node]},
    )


def test_an_agent_whose_lease_went_stale_stands_by_no_announcement_or_verdict(
    admin: Any, ns: str, pool: PoolFactory, nodes: Nodes, operator: harness.Operator
) -> None:
    """A stale Lease says its agent died (one that stops deletes it): its BGP announcement and
    the real servers it took out leave status, its programming stays. A director with no
    Lease at all (layer 2 off) keeps both, and so does the first once its Lease is deleted."""
    pool(4)
    harness.core(admin).create_namespaced_service(ns, harness.service("web"))
    harness.discovery(admin).create_namespaced_endpoint_slice(
        ns, endpoint_slice("web", ["10.1.0.1", "10.1.0.2"], [])
    )
    dying, leaseless = nodes.add("a", {}), nodes.add("b", {})
    bgp = {"mode": "BGP", "peers": ["r1"]}
    for node, address in ((dying, "10.1.0.1"), (leaseless, "10.1.0.2")):
        down = {"address": address, "port": 8080, "state": "Down", "message": "refused"}
        nodes.report(
            node,
            [
                entry(
                    ns,
                    1,
                    realServers=2,
                    downRealServers=1,
                    realServerHealth=[down],
                    announcement=bgp,
                )
            ],
        )
    nodes.keep_lease(dying)

    def shown() -> tuple[list[str], list[str], int, int]:
        st = status_of(admin, ns)
        rs = st.get("realServers") or {}
        return (
            list((st.get("announcement") or {}).get("nodes") or []),
            [u["address"] for u in rs.get("unhealthy") or ()],
            int(rs.get("ready", -1)),
            int((st.get("nodes") or {}).get("programmed", -1)),
        )

    both = ([dying, leaseless], ["10.1.0.1", "10.1.0.2"], 0, 2)
    wait_for("both announce and took one out each", lambda: shown() == both)
    nodes.keep_lease(dying, duration=2.0)  # its last renewal: then it dies
    wait_for(
        "only the leaseless director is heard once a's Lease is stale",
        lambda: shown() == ([leaseless], ["10.1.0.2"], 1, 2),
        30,
    )
    assert status_of(admin, ns)["announcement"] == {"mode": "BGP", "nodes": [leaseless]}
    assert reason(admin, ns, "Programmed") == ("True", "AllProgrammed")
    wait_for(
        "a RealServerUp Event for what only the dead agent said, saying so",
        lambda: any(
            e[1] == "RealServerUp" and "stale Lease" in e[2]
            for e in harness.events(admin, ns, name="web")
        ),
    )
    nodes.drop_lease(dying)  # deleted: nothing is known of it any more, its report stands
    wait_for("a heard again without a Lease", lambda: shown() == both)


def test_real_servers_the_directors_took_out_are_in_status_and_events(
    admin: Any, ns: str, pool: PoolFactory, nodes: Nodes, operator: harness.Operator
) -> None:
    """Health as the agents report it in their IPVSNodes (issue 10): a real server taken out
    by two directors is listed once with both, is not counted ready, and its going out,
    changing how and coming back are Events; both CRDs keep the fields (nothing pruned)."""
    pool(4)
    harness.core(admin).create_namespaced_service(ns, harness.service("web"))
    harness.discovery(admin).create_namespaced_endpoint_slice(
        ns, endpoint_slice("web", ["10.1.0.1", "10.1.0.2"], [])
    )
    first, second = nodes.add("a", {}), nodes.add("b", {})
    for node in (first, second):
        nodes.report(node, [entry(ns, 1, realServers=2)])
    wait_for("Ready", lambda: reason(admin, ns, "Ready") == ("True", "Serving"))

    def real_servers() -> dict[str, Any]:
        found: dict[str, Any] = status_of(admin, ns).get("realServers") or {}
        return found

    def posted() -> list[tuple[str, str, str]]:
        return [e for e in harness.events(admin, ns, name="web") if "RealServer" in e[1]]

    down = {"address": "10.1.0.1", "port": 8080, "state": "Down", "message": "refused"}
    for node in (first, second):
        nodes.report(
            node, [entry(ns, 1, realServers=2, downRealServers=1, realServerHealth=[down])]
        )
    wait_for("listed by both directors", lambda: real_servers().get("down") == 1)
    wait_for("two directors", lambda: real_servers()["unhealthy"][0]["directors"] == 2)
    rs = real_servers()
    assert (rs["ready"], rs["total"], rs["summary"]) == (1, 2, "1/2")
    assert rs["unhealthy"] == [
        {
            "address": "10.1.0.1",
            "port": 8080,
            "state": "Down",
            "directors": 2,
            "message": f"down on {first}, {second}: refused",
        }
    ]
    wait_for("a RealServerDown Warning", lambda: [e[:2] for e in posted()] != [])
    assert [e[:2] for e in posted()] == [("Warning", "RealServerDown")], posted()
    assert "real server 10.1.0.1:8080 down on " in posted()[0][2]

    # Its feedback agent says drain on one director, the other sees it healthy again.
    drain = {**down, "state": "Drain", "message": "drain"}
    stale = {"address": "10.1.0.2", "port": 8080, "state": "FeedbackStale"}
    nodes.report(first, [entry(ns, 1, realServers=2, realServerHealth=[drain, stale])])
    nodes.report(second, [entry(ns, 1, realServers=2)])
    wait_for(
        "drained", lambda: (real_servers().get("unhealthy") or [{}])[0].get("state") == "Drain"
    )
    assert real_servers()["unhealthy"][0]["message"] == f"drain on {first}: drain"
    wait_for("a RealServerDrained Event", lambda: "RealServerDrained" in [e[1] for e in posted()])

    # Back on every director: the fields go, the real server is ready, and an Event says so.
    nodes.report(first, [entry(ns, 1, realServers=2, realServerHealth=[stale])])
    wait_for("no real server out", lambda: "unhealthy" not in real_servers())
    assert real_servers() == {"ready": 2, "total": 2, "summary": "2/2"}
    wait_for("a RealServerUp Event", lambda: "RealServerUp" in [e[1] for e in posted()])
    node_status = harness.custom(admin).get_cluster_custom_object_status(
        harness.GROUP, harness.VERSION, "ipvsnodes", first
    )
    assert node_status["status"]["virtualServers"][0]["realServerHealth"] == [stale]
