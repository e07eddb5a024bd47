"""LoadBalancer Services become VirtualServers, on a real kube-apiserver (issue point 1)."""

from __future__ import annotations

import ipaddress
from typing import Any

from tests.operator import harness
from tests.operator.conftest import PoolFactory
from tests.operator.harness import condition, get_vs, ingress, wait_for


def allocated(api: Any, ns: str, name: str) -> dict[str, Any] | None:
    vs = get_vs(api, ns, name)
    return vs if condition(vs, "AddressAllocated").get("status") == "True" else None


def test_service_gets_an_owned_virtual_server_and_an_ingress(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool_name, _ = pool(8)
    notes = {
        "ipvs.io/scheduler": "mh",
        "ipvs.io/scheduler-flags": "mh-fallback",
        "ipvs.io/drain-timeout": "45",
        "ipvs.io/address-pool": pool_name,
    }
    body = harness.service(
        "web",
        annotations=notes,
        ports=[
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns-port"},
        ],
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
    )
    svc = harness.core(admin).create_namespaced_service(ns, body)
    vs = wait_for("the VirtualServer to get an address", lambda: allocated(admin, ns, "web"))
    meta, spec = vs["metadata"], vs["spec"]
    assert meta["labels"]["ipvs.io/service-name"] == "web"
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "name": "web",
            "uid": svc.metadata.uid,
            "controller": True,
        }
    ]
    assert spec["scheduler"] == {"name": "mh", "flags": ["mh-fallback"]}
    assert spec["drainTimeoutSeconds"] == 45
    assert spec["persistence"]["timeoutSeconds"] == 600
    assert spec["backends"] == {"service": {"name": "web"}, "defaultWeight": 1}
    # EndpointSlice ports carry the Service port names, so the agents resolve by name.
    assert [(p["name"], p["port"], p["protocol"], p["targetPort"]) for p in spec["ports"]] == [
        ("http", 80, "TCP", "http"),
        ("dns", 53, "UDP", "dns"),
    ]
    address = vs["status"]["address"]
    assert vs["status"]["addressPool"] == pool_name
    assert ipaddress.ip_address(address) in ipaddress.ip_network("10.77.0.0/16")
    wait_for(
        "status.loadBalancer.ingress",
        lambda: ingress(admin, ns, "web") == [{"ip": address, "ipMode": "Proxy"}],
    )
    wait_for(
        "an AddressAllocated Event on the Service",
        lambda: any(r == "AddressAllocated" for _, r, _ in harness.events(admin, ns, name="web")),
    )


def test_default_load_balancer_takes_classless_services_but_not_other_classes(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool(4)
    core = harness.core(admin)
    core.create_namespaced_service(ns, harness.service("other", lb_class="example.com/lb"))
    core.create_namespaced_service(ns, harness.service("plain", lb_class=None))
    wait_for("the classless Service's address", lambda: ingress(admin, ns, "plain"))
    # Handled in order, so by now the other class's Service has been seen and left alone.
    assert get_vs(admin, ns, "other") is None
    assert ingress(admin, ns, "other") == []


def test_invalid_annotation_is_an_event_and_changes_nothing(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool(4)
    core = harness.core(admin)
    core.create_namespaced_service(ns, harness.service("web"))
    before = wait_for("the VirtualServer", lambda: allocated(admin, ns, "web"))
    core.patch_namespaced_service(
        "web",
        ns,
        {
            "metadata": {
                "annotations": {"ipvs.io/scheduler": "fastest", "ipvs.io/drain-timeout": "5"}
            }
        },
    )
    warning = wait_for(
        "an InvalidAnnotation Event",
        lambda: [e for e in harness.events(admin, ns, name="web") if e[1] == "InvalidAnnotation"],
    )
    assert warning[0][0] == "Warning" and "ipvs.io/scheduler='fastest'" in warning[0][2]
    after = get_vs(admin, ns, "web")
    assert after is not None
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["spec"] == before["spec"]
    assert ingress(admin, ns, "web") == [{"ip": before["status"]["address"], "ipMode": "Proxy"}]
    # Fixed: both annotations apply at once.
    core.patch_namespaced_service(
        "web", ns, {"metadata": {"annotations": {"ipvs.io/scheduler": "rr"}}}
    )
    fixed = wait_for(
        "the corrected scheduler",
        lambda: (v := get_vs(admin, ns, "web")) and v["spec"]["scheduler"]["name"] == "rr" and v,
    )
    assert fixed["spec"]["drainTimeoutSeconds"] == 5
    assert fixed["status"]["address"] == before["status"]["address"]


def test_type_change_and_deletion_clean_up(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool_name, _ = pool(4)
    core = harness.core(admin)
    core.create_namespaced_service(ns, harness.service("web"))
    core.create_namespaced_service(ns, harness.service("api"))
    wait_for("two addresses", lambda: ingress(admin, ns, "web") and ingress(admin, ns, "api"))
    core.patch_namespaced_service(
        "web", ns, {"spec": {"type": "ClusterIP", "loadBalancerClass": None}}
    )
    wait_for("the VirtualServer of web to go", lambda: get_vs(admin, ns, "web") is None)
    wait_for("web's ingress to be cleared", lambda: ingress(admin, ns, "web") == [])
    core.delete_namespaced_service("api", ns)
    wait_for("the VirtualServer of api to go", lambda: get_vs(admin, ns, "api") is None)
    wait_for(
        "the pool to count no allocation",
        lambda: _pool_status(admin, pool_name).get("allocated") == 0,
    )


def test_dual_stack_service_gets_one_virtual_server_per_family(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool(4, v6=True)
    body = harness.service("web", ipFamilyPolicy="RequireDualStack", ipFamilies=["IPv4", "IPv6"])
    harness.core(admin).create_namespaced_service(ns, body)
    v4 = wait_for("the IPv4 VirtualServer", lambda: allocated(admin, ns, "web"))
    v6 = wait_for("the IPv6 VirtualServer", lambda: allocated(admin, ns, "web-v6"))
    assert (v4["spec"]["ipFamily"], v6["spec"]["ipFamily"]) == ("IPv4", "IPv6")
    assert ipaddress.ip_address(v6["status"]["address"]).version == 6
    wait_for(
        "both addresses in the Service, primary family first",
        lambda: (
            ingress(admin, ns, "web")
            == [
                {"ip": v4["status"]["address"], "ipMode": "Proxy"},
                {"ip": v6["status"]["address"], "ipMode": "Proxy"},
            ]
        ),
    )


def test_the_operator_writes_status_only_never_a_user_spec(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool(4)
    custom = harness.custom(admin)
    custom.create_namespaced_custom_object(
        harness.GROUP, harness.VERSION, ns, "virtualservers", harness.virtual_server("mine")
    )
    vs = wait_for("an address", lambda: allocated(admin, ns, "mine"))
    assert vs["metadata"]["generation"] == 1
    assert "finalizers" not in vs["metadata"] and "annotations" not in vs["metadata"]
    # Server-side field ownership: the operator's manager owns fields of the status only.
    operator_entries = [
        m for m in vs["metadata"]["managedFields"] if m["manager"] == "ipvs-operator"
    ]
    assert operator_entries and all(m.get("subresource") == "status" for m in operator_entries)


def _pool_status(api: Any, name: str) -> dict[str, Any]:
    obj = harness.custom(api).get_cluster_custom_object(
        harness.GROUP, harness.VERSION, "addresspools", name
    )
    status: dict[str, Any] = obj.get("status") or {}
    return status
