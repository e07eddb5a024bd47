"""A node directing more VirtualServers than one object should hold reports them in slices
(its IPVSNode and IPVSNodeReports), and the operator reads every slice as the node's report.

No agent runs here: the agent's own NodeReporter writes the report on the real API server,
with a slice budget small enough that 40 VirtualServers need several objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from ipvs_agent.desired import Outcome, Role, State
from ipvs_agent.report import NodeReporter
from ipvs_agent.status import node_status, slice_name
from ipvs_api import conditions
from tests.operator import harness
from tests.operator.conftest import PoolFactory
from tests.operator.harness import condition, get_vs, wait_for

COUNT = 40
BUDGET = 1500  # bytes: about eight entries per object


def slices_of(api: Any, node: str) -> list[str]:
    listed = harness.custom(api).list_cluster_custom_object(
        harness.GROUP, harness.VERSION, "ipvsnodereports"
    )
    return sorted(o["metadata"]["name"] for o in listed["items"] if o["spec"]["node"] == node)


@pytest.fixture
def node(admin: Any, ns: str) -> Iterator[str]:
    name = f"{ns[-20:].strip('-')}-big"
    core = harness.core(admin)
    core.create_node({"metadata": {"name": name, "labels": {"big": ns[-20:].strip("-")}}})
    yield name
    custom = harness.custom(admin)
    for slice_ in slices_of(admin, name):
        custom.delete_cluster_custom_object(
            harness.GROUP, harness.VERSION, "ipvsnodereports", slice_
        )
    for delete in (
        lambda: custom.delete_cluster_custom_object(
            harness.GROUP, harness.VERSION, "ipvsnodes", name
        ),
        lambda: core.delete_node(name),
    ):
        try:
            delete()
        except ApiException as exc:
            if exc.status != 404:
                raise


def report(reporter: NodeReporter, ns: str, generations: dict[str, int]) -> None:
    outcomes = {
        f"{ns}/{name}": Outcome(State.PROGRAMMED, roles=frozenset({Role.DIRECTOR}), generation=g)
        for name, g in generations.items()
    }
    reporter.report(node_status(outcomes, None, "test", conditions.now()))


def programmed(api: Any, ns: str, name: str) -> bool:
    obj = get_vs(api, ns, name) or {}
    cond = condition(obj, "Programmed")
    return cond.get("status") == "True" and cond.get("observedGeneration") == (
        obj.get("metadata") or {}
    ).get("generation")


def test_a_report_in_slices_programs_every_virtual_server_and_shrinks_back(
    admin: Any, ns: str, pool: PoolFactory, node: str, operator: harness.Operator
) -> None:
    pool(64)
    label = ns[-20:].strip("-")
    custom = harness.custom(admin)
    names = [f"vs-{i}" for i in range(COUNT)]
    for name in names:
        body = harness.virtual_server(name, nodeSelector={"matchLabels": {"big": label}})
        custom.create_namespaced_custom_object(
            harness.GROUP, harness.VERSION, ns, "virtualservers", body
        )
    reporter = NodeReporter(admin, node)
    reporter.budget = BUDGET
    report(reporter, ns, dict.fromkeys(names, 1))
    ipvs_node = custom.get_cluster_custom_object(harness.GROUP, harness.VERSION, "ipvsnodes", node)
    count = ipvs_node["status"]["reportSlices"]
    assert count >= 4 and ipvs_node["status"]["virtualServerCount"] == COUNT
    assert slices_of(admin, node) == sorted(slice_name(node, i) for i in range(1, count))
    assert len(ipvs_node["status"]["virtualServers"]) < COUNT
    wait_for("every VirtualServer Programmed", lambda: all(programmed(admin, ns, n) for n in names))

    # One VirtualServer changing costs one object written, whatever the node's size.
    custom.patch_namespaced_custom_object(
        harness.GROUP,
        harness.VERSION,
        ns,
        "virtualservers",
        "vs-7",
        {"spec": {"ports": [{"port": 81}]}},
    )
    wait_for("vs-7 generation 2", lambda: not programmed(admin, ns, "vs-7"))
    before = reporter.writes
    report(reporter, ns, {**dict.fromkeys(names, 1), "vs-7": 2})
    assert reporter.writes - before == 1
    wait_for("vs-7 Programmed again", lambda: programmed(admin, ns, "vs-7"))

    # Fewer VirtualServers: the report shrinks into the IPVSNode, and the slices go.
    report(reporter, ns, {"vs-7": 2, "vs-8": 1})
    assert slices_of(admin, node) == []
    ipvs_node = custom.get_cluster_custom_object(harness.GROUP, harness.VERSION, "ipvsnodes", node)
    assert ipvs_node["status"]["reportSlices"] == 1
    assert all(programmed(admin, ns, n) for n in ("vs-7", "vs-8"))
    wait_for("vs-9 no longer Programmed", lambda: not programmed(admin, ns, "vs-9"))


def test_a_restarted_agent_removes_the_slices_an_earlier_run_left(
    admin: Any, ns: str, node: str
) -> None:
    names = [f"vs-{i}" for i in range(COUNT)]
    first = NodeReporter(admin, node)
    first.budget = BUDGET
    report(first, ns, dict.fromkeys(names, 1))
    assert len(slices_of(admin, node)) >= 3
    # The agent restarts on a node that now directs two VirtualServers.
    second = NodeReporter(admin, node)
    second.budget = BUDGET
    report(second, ns, {"vs-1": 1, "vs-2": 1})
    assert slices_of(admin, node) == []
