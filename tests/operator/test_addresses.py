"""Address allocation on a real kube-apiserver (issue point 2): requests, sharing, conflicts,
exhaustion and AddressPool status."""

from __future__ import annotations

from typing import Any

from tests.operator import harness
from tests.operator.conftest import PoolFactory
from tests.operator.harness import condition, get_vs, ingress, wait_for


def address_condition(api: Any, ns: str, name: str) -> dict[str, Any]:
    return condition(get_vs(api, ns, name), "AddressAllocated")


def settled(api: Any, ns: str, name: str) -> dict[str, Any] | None:
    """The VirtualServer once the operator judged its address (either way)."""
    vs = get_vs(api, ns, name)
    cond = condition(vs, "AddressAllocated")
    generation = (vs or {}).get("metadata", {}).get("generation")
    return vs if cond and cond.get("observedGeneration") == generation else None


def pool_status(api: Any, name: str) -> dict[str, Any]:
    obj = harness.custom(api).get_cluster_custom_object(
        harness.GROUP, harness.VERSION, "addresspools", name
    )
    status: dict[str, Any] = obj.get("status") or {}
    return status


def create_vs(api: Any, ns: str, name: str, **spec: Any) -> None:
    harness.custom(api).create_namespaced_custom_object(
        harness.GROUP, harness.VERSION, ns, "virtualservers", harness.virtual_server(name, **spec)
    )


def test_requested_addresses_are_honoured_from_every_source(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    _, (rng, *_) = pool(16, autoAssign=False)
    base = rng.split("-")[0].rsplit(".", 1)[0]
    core = harness.core(admin)
    core.create_namespaced_service(ns, harness.service("legacy", loadBalancerIP=f"{base}.7"))
    core.create_namespaced_service(
        ns, harness.service("noted", annotations={"ipvs.io/address": f"{base}.9"})
    )
    create_vs(admin, ns, "direct", address=f"{base}.11")
    create_vs(admin, ns, "outside", address="192.0.2.200")
    wait_for(
        "legacy", lambda: ingress(admin, ns, "legacy") == [{"ip": f"{base}.7", "ipMode": "Proxy"}]
    )
    wait_for(
        "noted", lambda: ingress(admin, ns, "noted") == [{"ip": f"{base}.9", "ipMode": "Proxy"}]
    )
    direct = wait_for("direct", lambda: settled(admin, ns, "direct"))
    assert direct["status"]["address"] == f"{base}.11"
    outside = wait_for("outside", lambda: settled(admin, ns, "outside"))
    cond = condition(outside, "AddressAllocated")
    assert (cond["status"], cond["reason"]) == ("False", "AddressNotInPool")
    assert "address" not in outside["status"]
    assert condition(outside, "Ready")["reason"] == "AddressNotInPool"


def test_services_with_one_sharing_key_share_an_address(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool(8)
    core = harness.core(admin)
    key = {"ipvs.io/sharing-key": "edge"}
    core.create_namespaced_service(ns, harness.service("web", annotations=key))
    core.create_namespaced_service(
        ns,
        harness.service(
            "dns", annotations=key, ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]
        ),
    )
    core.create_namespaced_service(ns, harness.service("web2", annotations=key))
    web = wait_for("web", lambda: ingress(admin, ns, "web"))
    dns = wait_for("dns", lambda: ingress(admin, ns, "dns"))
    web2 = wait_for("web2", lambda: ingress(admin, ns, "web2"))
    assert web == dns  # different ports: one address
    assert web2 != web  # the same port needs another address; no conflict
    assert address_condition(admin, ns, "web2")["status"] == "True"


def test_a_real_conflict_goes_to_the_later_object(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    _, (rng, *_) = pool(8)
    address = rng.split("-")[0]
    create_vs(admin, ns, "first", address=address)
    first = wait_for("first", lambda: settled(admin, ns, "first"))
    assert first["status"]["address"] == address
    create_vs(admin, ns, "second", address=address)
    second = wait_for("second", lambda: settled(admin, ns, "second"))
    cond = condition(second, "AddressAllocated")
    assert (cond["status"], cond["reason"]) == ("False", "AddressConflict")
    assert f"{ns}/first" in cond["message"] and "80/TCP" in cond["message"]
    assert harness.get_vs(admin, ns, "first") == first  # untouched
    wait_for(
        "an AddressConflict Event",
        lambda: (
            ("Warning", "AddressConflict")
            in [e[:2] for e in harness.events(admin, ns, name="second")]
        ),
    )
    harness.custom(admin).delete_namespaced_custom_object(
        harness.GROUP, harness.VERSION, ns, "virtualservers", "first"
    )
    wait_for(
        "the address to pass to the waiting object",
        lambda: (get_vs(admin, ns, "second") or {}).get("status", {}).get("address") == address,
    )


def test_an_exhausted_pool_is_a_condition_and_events(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool_name, _ = pool(2)
    core = harness.core(admin)
    core.create_namespaced_service(ns, harness.service("a"))
    wait_for("a", lambda: ingress(admin, ns, "a"))
    core.create_namespaced_service(ns, harness.service("b"))
    wait_for("b", lambda: ingress(admin, ns, "b"))
    core.create_namespaced_service(ns, harness.service("c"))
    wait_for(
        "PoolExhausted on c",
        lambda: address_condition(admin, ns, "c").get("reason") == "PoolExhausted",
    )
    wait_for(
        "a PoolExhausted Event on the Service",
        lambda: (
            ("Warning", "PoolExhausted") in [e[:2] for e in harness.events(admin, ns, name="c")]
        ),
    )
    status = wait_for(
        "pool status 2/0", lambda: (s := pool_status(admin, pool_name)).get("available") == 0 and s
    )
    assert status["allocated"] == 2
    wait_for(
        "a PoolExhausted Event on the AddressPool",
        lambda: (
            ("Warning", "PoolExhausted")
            in [e[:2] for e in harness.events(admin, "default", name=pool_name)]
        ),
    )
    core.delete_namespaced_service("a", ns)
    wait_for("c to get the freed address", lambda: ingress(admin, ns, "c"))


def test_address_pool_status_reports_overlap_and_invalid_ranges(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    good, (rng, *_) = pool(8)
    first = rng.split("-")[0]
    prefix = first.rsplit(".", 1)[0]
    overlap, _ = pool(name=f"{ns}-overlap", addresses=[f"{prefix}.4-{prefix}.20"])
    invalid, _ = pool(name=f"{ns}-invalid", addresses=[f"{prefix}.200-{prefix}.100"])

    def ready(name: str) -> dict[str, Any]:
        return condition({"status": pool_status(admin, name)}, "Ready")

    wait_for("Overlap", lambda: ready(overlap).get("reason") == "Overlap")
    assert f"AddressPool {good}" in ready(overlap)["message"]
    wait_for("InvalidRange", lambda: ready(invalid).get("reason") == "InvalidRange")
    status = wait_for("the good pool's status", lambda: (s := pool_status(admin, good)) and s)
    assert (status["allocated"], status["available"]) == (0, 8)
    assert ready(good)["status"] == "True"
    # Only the good pool hands out addresses.
    create_vs(admin, ns, "vs")
    vs = wait_for("an address", lambda: settled(admin, ns, "vs"))
    assert vs["status"]["addressPool"] == good
    wait_for("allocated 1", lambda: pool_status(admin, good).get("allocated") == 1)


def test_an_older_claimant_never_takes_a_live_address_from_another_namespace(
    admin: Any, ns: str, other_ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    """Whoever holds an address keeps it; the claimant is told so without learning who holds it.

    The claimant is made first (so it is the older object), settles on an address of its own,
    and only then asks for the address a Service in another namespace holds.
    """
    pool(8, name=f"{other_ns}-shared", namespaces=[ns, other_ns])  # no name of ns in it
    create_vs(admin, other_ns, "claimant")
    wait_for("the claimant's own address", lambda: settled(admin, other_ns, "claimant"))
    harness.core(admin).create_namespaced_service(ns, harness.service("web"))
    (held,) = wait_for("the Service's address", lambda: ingress(admin, ns, "web"))
    holder = wait_for("the holder to settle", lambda: settled(admin, ns, "web"))
    assert holder["status"]["address"] == held["ip"]
    harness.custom(admin).patch_namespaced_custom_object(
        harness.GROUP,
        harness.VERSION,
        other_ns,
        "virtualservers",
        "claimant",
        {"spec": {"address": held["ip"]}},
    )
    claimant = wait_for(
        "the claimant to be judged on its request",
        lambda: (
            (vs := settled(admin, other_ns, "claimant"))
            and vs["metadata"]["generation"] == 2
            and vs
        ),
    )
    cond = condition(claimant, "AddressAllocated")
    assert (cond["status"], cond["reason"]) == ("False", "AddressConflict")
    assert cond["message"] == (
        f"{held['ip']} port 80/TCP is in use by an object in another namespace"
    )
    assert "address" not in claimant["status"]
    # The holder keeps its address, its status and its Service's ingress.
    assert harness.get_vs(admin, ns, "web") == holder
    assert ingress(admin, ns, "web") == [held]
    wait_for(
        "the AddressConflict Event",
        lambda: (
            ("Warning", "AddressConflict")
            in [e[:2] for e in harness.events(admin, other_ns, name="claimant")]
        ),
    )
    told = harness.events(admin, other_ns)
    assert not [e for e in told if ns in (e[2] or "")], f"{ns} named to another tenant: {told}"
    assert ("Warning", "AddressChanged") not in [e[:2] for e in harness.events(admin, ns)]
