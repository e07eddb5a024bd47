"""LoadBalancer Services as VirtualServers, and the annotations that tune them."""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

from ipvs_api import constants
from ipvs_api.types import IPFamily
from ipvs_operator import annotations as ann
from ipvs_operator import services


def svc(
    *,
    ports: list[dict[str, Any]] | None = None,
    notes: dict[str, str] | None = None,
    families: list[str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "u-1",
            "annotations": notes or {},
        },
        "spec": {
            "type": "LoadBalancer",
            "loadBalancerClass": constants.LOAD_BALANCER_CLASS,
            "ipFamilies": families or ["IPv4"],
            "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            **spec,
        },
    }


def test_class_and_default_load_balancer() -> None:
    ours = svc()
    assert services.is_ours(ours, default_load_balancer=False)
    classless = svc()
    del classless["spec"]["loadBalancerClass"]
    assert not services.is_ours(classless, default_load_balancer=False)
    assert services.is_ours(classless, default_load_balancer=True)
    other = svc(loadBalancerClass="example.com/lb")
    assert not services.is_ours(other, default_load_balancer=True)
    assert not services.is_ours(svc(type="ClusterIP"), default_load_balancer=True)


def test_one_virtual_server_owned_and_labelled() -> None:
    plan = services.plan(svc())
    assert not plan.errors
    (vs,) = plan.manifests
    meta = vs["metadata"]
    assert (meta["name"], meta["namespace"]) == ("web", "shop")
    assert meta["labels"][constants.LABEL_SERVICE_NAME] == "web"
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u-1", "controller": True}
    ]
    assert vs["spec"]["backends"] == {"service": {"name": "web"}, "defaultWeight": 1}
    assert vs["spec"]["ipFamily"] == "IPv4"


def test_ports_map_by_service_port_name_else_number() -> None:
    plan = services.plan(
        svc(
            ports=[
                {"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
            ]
        )
    )
    assert plan.manifests[0]["spec"]["ports"] == [
        {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
    ]
    single = services.plan(svc(ports=[{"port": 443, "targetPort": 8443}]))
    assert single.manifests[0]["spec"]["ports"] == [
        {"port": 443, "protocol": "TCP", "targetPort": 8443}
    ]
    same = services.plan(svc(ports=[{"port": 443, "targetPort": 443}]))
    assert "targetPort" not in same.manifests[0]["spec"]["ports"][0]


def test_unnamed_port_with_a_named_target_cannot_be_resolved() -> None:
    plan = services.plan(svc(ports=[{"port": 80, "targetPort": "web"}]))
    assert plan.errors and "name the Service port" in plan.errors[0]


def test_annotations_become_fields() -> None:
    notes = {
        ann.SCHEDULER: "mh",
        ann.SCHEDULER_FLAGS: "mh-fallback, mh-port",
        ann.ADDRESS_POOL: "edge",
        ann.SHARING_KEY: "shared-1",
        ann.DRAIN_TIMEOUT: "30",
        ann.NODE_SELECTOR: "edge=true,zone=a",
    }
    spec = services.plan(svc(notes=notes)).manifests[0]["spec"]
    assert spec["scheduler"] == {"name": "mh", "flags": ["mh-fallback", "mh-port"]}
    assert spec["addressPool"] == "edge"
    assert spec["sharingKey"] == "shared-1"
    assert spec["drainTimeoutSeconds"] == 30
    assert spec["nodeSelector"] == {"matchLabels": {"edge": "true", "zone": "a"}}


def test_tunnel_forwarding_keeps_ports_and_refuses_remapping() -> None:
    notes = {
        ann.FORWARDING_METHOD: "tun",
        ann.TUNNEL_TYPE: "gue",
        ann.TUNNEL_PORT: "6080",
    }
    ok = services.plan(svc(notes=notes, ports=[{"name": "http", "port": 80, "targetPort": 80}]))
    spec = ok.manifests[0]["spec"]
    assert spec["forwarding"] == {
        "method": "TUN",
        "tunnel": {"type": "gue", "port": 6080, "checksum": "nocsum"},
    }
    assert spec["ports"] == [{"name": "http", "port": 80, "protocol": "TCP"}]
    remap = services.plan(svc(notes=notes))  # targetPort 8080 != 80
    assert remap.errors and "cannot change the port" in remap.errors[0]


def test_session_affinity_is_persistence() -> None:
    plan = services.plan(
        svc(
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}},
            notes={ann.PERSISTENCE_IPV4_PREFIX: "24"},
        )
    )
    assert plan.manifests[0]["spec"]["persistence"] == {
        "timeoutSeconds": 600,
        "ipv4PrefixLength": 24,
        "ipv6PrefixLength": 128,
    }
    default = services.plan(svc(sessionAffinity="ClientIP")).manifests[0]["spec"]
    assert default["persistence"]["timeoutSeconds"] == services.DEFAULT_AFFINITY_SECONDS
    alone = services.plan(svc(notes={ann.PERSISTENCE_IPV4_PREFIX: "24"}))
    assert alone.errors


def test_external_traffic_policy_local() -> None:
    spec = services.plan(svc(externalTrafficPolicy="Local")).manifests[0]["spec"]
    assert spec["trafficPolicy"] == "Local"


def test_invalid_and_unknown_annotations_are_errors_naming_them() -> None:
    plan = services.plan(
        svc(
            notes={
                ann.SCHEDULER: "fastest",
                ann.DRAIN_TIMEOUT: "-1",
                "ipvs.io/schedular": "rr",
                "example.com/other": "ignored",
            }
        )
    )
    assert not plan.manifests
    text = "\n".join(plan.errors)
    assert "ipvs.io/scheduler='fastest'" in text
    assert "ipvs.io/drain-timeout" in text
    assert "ipvs.io/schedular" in text and "unknown annotation" in text
    assert "example.com" not in text


def test_cross_field_rules_are_judged_like_the_api_server() -> None:
    # sh-fallback belongs to sh, not to the default scheduler (a CEL rule of the CRD).
    plan = services.plan(svc(notes={ann.SCHEDULER_FLAGS: "sh-fallback"}))
    assert plan.errors and "flags must belong to the scheduler" in plan.errors[0]


def test_dual_stack_is_one_virtual_server_per_family() -> None:
    plan = services.plan(
        svc(families=["IPv6", "IPv4"], notes={ann.ADDRESS: "192.0.2.7, 2001:db8::7"})
    )
    names = [
        (m["metadata"]["name"], m["spec"]["ipFamily"], m["spec"]["address"]) for m in plan.manifests
    ]
    assert names == [("web", "IPv6", "2001:db8::7"), ("web-v4", "IPv4", "192.0.2.7")]
    assert services.virtual_server_name("web", IPFamily.IPV6, IPFamily.IPV4) == "web-v6"


def test_requested_addresses_must_fit_the_families() -> None:
    legacy = services.plan(svc(loadBalancerIP="192.0.2.9")).manifests[0]["spec"]
    assert legacy["address"] == "192.0.2.9"
    wrong = services.plan(svc(notes={ann.ADDRESS: "2001:db8::1"}))
    assert wrong.errors and "ipFamilies" in wrong.errors[0]
    two = services.plan(svc(notes={ann.ADDRESS: "192.0.2.1,192.0.2.2"}))
    assert two.errors and "one address per IP family" in two.errors[0]


def test_drift_is_judged_on_the_defaulted_spec() -> None:
    (manifest,) = services.plan(svc()).manifests
    stored = copy.deepcopy(manifest)
    assert stored["spec"] == services.defaulted_spec(manifest)  # plans carry the defaults
    stored["metadata"]["resourceVersion"] = "7"
    assert not services.needs_update(manifest, stored)
    (changed,) = services.plan(svc(notes={ann.SCHEDULER: "rr"})).manifests
    assert services.needs_update(changed, stored)
    patch = services.update_patch(changed, stored)
    assert patch["spec"] == {"scheduler": {"name": "rr"}}
    assert patch["metadata"]["resourceVersion"] == "7"
    (plain,) = services.plan(svc()).manifests
    with_affinity = copy.deepcopy(stored)
    with_affinity["spec"]["persistence"] = {"timeoutSeconds": 5}
    assert services.update_patch(plain, with_affinity)["spec"] == {"persistence": None}


def test_ingress_uses_proxy_mode() -> None:
    assert services.ingress([ipaddress.ip_address("192.0.2.1")]) == [
        {"ip": "192.0.2.1", "ipMode": "Proxy"}
    ]


def test_the_service_names_its_announcing_nodes_in_a_condition() -> None:
    v4, v6 = ipaddress.ip_address("192.0.2.1"), ipaddress.ip_address("2001:db8::1")
    l2 = {"mode": "Layer2", "nodes": ["n1"]}
    other = {"type": "example.com/Other", "status": "True"}  # another controller's: kept
    # Never announced (no pool with layer2): no condition at all.
    assert services.announced_condition([(v4, None)], [other], 3) == [other]
    both = services.announced_condition([(v4, l2), (v6, l2)], [other], 3)
    assert both[0] == other
    (mine,) = [c for c in both if c["type"] == "ipvs.io/Announced"]
    assert (mine["status"], mine["reason"], mine["observedGeneration"]) == ("True", "Announced", 3)
    assert mine["message"] == "192.0.2.1 on layer 2 by n1; 2001:db8::1 on layer 2 by n1"
    # One address lost its announcer: False, and the message says which.
    half = services.announced_condition([(v4, l2), (v6, None)], both, 3)
    (mine,) = [c for c in half if c["type"] == "ipvs.io/Announced"]
    assert (mine["status"], mine["reason"]) == ("False", "NotAnnounced")
    assert mine["message"] == "192.0.2.1 on layer 2 by n1; not announced: 2001:db8::1"
