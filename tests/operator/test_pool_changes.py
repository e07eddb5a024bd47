"""Pools change without outages (issue 8): a pool deleted and applied again, or edited into a
state it cannot serve in, takes no address from the objects that hold one.

No agent runs here: the test reports the VirtualServers programmed in an IPVSNode the way an
agent would, and writes the Services' EndpointSlices, so Ready and Programmed are real status
the operator aggregates — and must not flip because a pool changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.operator import harness
from tests.operator.conftest import PoolFactory
from tests.operator.harness import Recorder, condition, get_vs, ingress, wait_for
from tests.operator.test_status import Nodes, endpoint_slice

SERVICES = ("web-a", "web-b")


@pytest.fixture
def nodes(admin: Any, ns: str) -> Iterator[Nodes]:
    made = Nodes(admin, ns[-20:].strip("-"))
    yield made
    made.remove()


def allocated(api: Any, ns: str, name: str) -> dict[str, Any]:
    return condition(get_vs(api, ns, name), "AddressAllocated")


def pool_ready(api: Any, name: str) -> dict[str, Any]:
    obj = harness.custom(api).get_cluster_custom_object(
        harness.GROUP, harness.VERSION, "addresspools", name
    )
    return condition(obj, "Ready")


def test_pools_deleted_and_edited_take_no_address_away(
    admin: Any,
    ns: str,
    pool: PoolFactory,
    nodes: Nodes,
    record: Callable[..., Recorder],
    operator: harness.Operator,
) -> None:
    older, (older_range,) = pool(4, autoAssign=False)  # made first: the older of the two
    name, (holders_range,) = pool(8)
    custom, core = harness.custom(admin), harness.core(admin)
    spec = custom.get_cluster_custom_object(harness.GROUP, harness.VERSION, "addresspools", name)[
        "spec"
    ]

    # Two Services with an address each, served by an agent that programmed them.
    node = nodes.add("director", {})
    for svc in SERVICES:
        core.create_namespaced_service(ns, harness.service(svc))
        harness.discovery(admin).create_namespaced_endpoint_slice(
            ns, endpoint_slice(svc, ["10.1.0.1"], [])
        )

    def vs(name: str) -> dict[str, Any]:
        found = get_vs(admin, ns, name)
        assert found is not None, name
        return found

    def has_ingress(name: str) -> Callable[[], list[dict[str, Any]]]:
        return lambda: ingress(admin, ns, name)

    def ready(name: str) -> Callable[[], bool]:
        return lambda: condition(vs(name), "Ready").get("status") == "True"

    held = {svc: wait_for(f"{svc}'s ingress", has_ingress(svc)) for svc in SERVICES}
    nodes.report(
        node,
        [
            {
                "namespace": ns,
                "name": svc,
                "observedGeneration": vs(svc)["metadata"]["generation"],
                "roles": ["Director"],
                "state": "Programmed",
            }
            for svc in SERVICES
        ],
    )
    for svc in SERVICES:
        wait_for(f"{svc} Ready", ready(svc))
    addresses = {svc: vs(svc)["status"]["address"] for svc in SERVICES}
    assert {svc: [i["ip"] for i in held[svc]] for svc in SERVICES} == {
        svc: [a] for svc, a in addresses.items()
    }
    servers = record(
        custom.list_namespaced_custom_object, harness.GROUP, harness.VERSION, ns, "virtualservers"
    )
    services = record(core.list_namespaced_service, ns)

    def all_reasons(reason: str) -> bool:
        return all(allocated(admin, ns, svc).get("reason") == reason for svc in SERVICES)

    # Deleted (a GitOps prune) ...
    custom.delete_cluster_custom_object(harness.GROUP, harness.VERSION, "addresspools", name)
    wait_for("AddressRetained", lambda: all_reasons("AddressRetained"))
    message = allocated(admin, ns, SERVICES[0])["message"]
    assert message == (
        f"AddressPool {name} does not exist: keeping {addresses[SERVICES[0]]} until it exists again"
    )
    # ... and applied again: the same addresses, Allocated as before.
    custom.create_cluster_custom_object(
        harness.GROUP,
        harness.VERSION,
        "addresspools",
        {**harness.address_pool(name, None), "spec": spec},
    )
    wait_for("Allocated again", lambda: all_reasons("Allocated"))
    wait_for("the pool Ready again", lambda: pool_ready(admin, name).get("status") == "True")

    # Edited into an overlap with the older pool: not ready, and its holders keep their addresses.
    first, _ = older_range.split("-")
    overlapping = {**spec, "addresses": [holders_range, f"{first}-{first}"]}
    custom.patch_cluster_custom_object(
        harness.GROUP, harness.VERSION, "addresspools", name, {"spec": overlapping}
    )
    wait_for("Overlap", lambda: pool_ready(admin, name).get("reason") == "Overlap")
    wait_for("AddressRetained again", lambda: all_reasons("AddressRetained"))
    wait_for(
        "the pool to count what its holders keep",
        lambda: (
            "2 addresses in use stay with their holders until it is ready"
            in pool_ready(admin, name).get("message", "")
        ),
    )
    # Fixed: Ready, and everything as before.
    custom.patch_cluster_custom_object(
        harness.GROUP,
        harness.VERSION,
        "addresspools",
        name,
        {"spec": {"addresses": [holders_range]}},
    )
    wait_for("Ready", lambda: pool_ready(admin, name).get("status") == "True")
    wait_for("Allocated once more", lambda: all_reasons("Allocated"))
    assert pool_ready(admin, older)["status"] == "True"

    # Every status written meanwhile had the address, and Programmed and Ready never flipped.
    written = [obj for kind, obj in servers.stop() if kind != "DELETED"]
    assert len(written) >= 4 * len(SERVICES), "the watch saw the operator's writes"
    for obj in written:
        svc, status = obj["metadata"]["name"], obj.get("status") or {}
        assert status.get("address") == addresses[svc], f"{svc}: {status}"
        for type_ in ("Programmed", "Ready"):
            assert condition(obj, type_).get("status") == "True", f"{svc} {type_}: {status}"
    for _, obj in services.stop():
        svc = obj["metadata"]["name"]
        ingress_now = (((obj.get("status") or {}).get("load_balancer") or {}).get("ingress")) or []
        assert [i["ip"] for i in ingress_now] == [addresses[svc]], f"{svc}: {ingress_now}"
    wait_for(
        "an AddressRetained Event",
        lambda: (
            ("Warning", "AddressRetained")
            in [e[:2] for e in harness.events(admin, ns, name=SERVICES[0])]
        ),
    )
