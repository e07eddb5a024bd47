"""Turn raw Kubernetes objects (dicts) into validated, typed objects.

Every entry point validates with the CRD schema and the CEL mirrors first, so an object the API
server would refuse is refused here too, with the same field paths; only then is it built into
the types of :mod:`ipvs_api.types`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from ipvs_api import constants, schema
from ipvs_api.errors import FieldError, InvalidObject
from ipvs_api.rules import parse_cidr, parse_duration, parse_ip, parse_statuses
from ipvs_api.types import (
    AddressPool,
    AddressRange,
    Backends,
    BGPAdvertisement,
    BGPPeer,
    CheckType,
    DNSCheck,
    Feedback,
    FeedbackMode,
    Forwarding,
    ForwardingMethod,
    HealthCheck,
    HTTPCheck,
    IPAddress,
    IPFamily,
    LabelRequirement,
    LabelSelector,
    Layer2,
    MarkRange,
    OnFailure,
    Persistence,
    Protocol,
    Scheduler,
    SchedulerFlag,
    SecretKeyRef,
    ServicePort,
    StaticRealServer,
    TrafficPolicy,
    Tunnel,
    TunnelChecksum,
    TunnelType,
    UDPCheck,
    VirtualServer,
    VirtualServerSpec,
)


def _check(kind: str, obj: dict[str, Any], namespaced: bool) -> dict[str, Any]:
    """Validate envelope and body; return the defaulted object or raise InvalidObject."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name", ""))
    errors: list[FieldError] = []
    if obj.get("apiVersion") != constants.API_VERSION:
        errors.append(FieldError("apiVersion", f"must be {constants.API_VERSION}"))
    if obj.get("kind") != kind:
        errors.append(FieldError("kind", f"must be {kind}"))
    if not name:
        errors.append(FieldError("metadata.name", "Required value"))
    if namespaced and not meta.get("namespace"):
        errors.append(FieldError("metadata.namespace", "Required value"))
    defaulted, schema_errors = schema.validate(kind, obj)
    errors.extend(schema_errors)
    if errors:
        raise InvalidObject(kind, name, errors)
    return defaulted


def _ip(text: str) -> IPAddress:
    addr = parse_ip(text)
    assert addr is not None, "validated before"
    return addr


def label_selector(raw: dict[str, Any] | None) -> LabelSelector:
    raw = raw or {}
    return LabelSelector(
        match_labels=tuple(sorted(raw.get("matchLabels", {}).items())),
        match_expressions=tuple(
            LabelRequirement(e["key"], e["operator"], tuple(e.get("values", ())))
            for e in raw.get("matchExpressions", ())
        ),
    )


def virtual_server_spec(spec: dict[str, Any]) -> VirtualServerSpec:
    """Build the typed spec from a validated, defaulted ``spec``."""
    fwd = spec["forwarding"]
    tun = fwd.get("tunnel", {})
    backends = spec["backends"]
    pers = spec.get("persistence")
    return VirtualServerSpec(
        address=_ip(spec["address"]) if "address" in spec else None,
        address_pool=spec.get("addressPool"),
        ip_family=IPFamily(spec["ipFamily"]) if "ipFamily" in spec else None,
        sharing_key=spec.get("sharingKey"),
        fwmark=spec.get("fwmark"),
        ports=tuple(
            ServicePort(
                port=p["port"],
                protocol=Protocol(p["protocol"]),
                target_port=p.get("targetPort"),
                name=p.get("name"),
            )
            for p in spec.get("ports", ())
        ),
        scheduler=Scheduler(spec["scheduler"]["name"]),
        scheduler_flags=frozenset(SchedulerFlag(f) for f in spec["scheduler"].get("flags", ())),
        forwarding=Forwarding(
            method=ForwardingMethod(fwd["method"]),
            tunnel=Tunnel(
                type=TunnelType(tun.get("type", "ipip")),
                port=tun.get("port"),
                checksum=TunnelChecksum(tun.get("checksum", "nocsum")),
            ),
        ),
        persistence=None
        if pers is None
        else Persistence(
            timeout_seconds=pers["timeoutSeconds"],
            ipv4_prefix_length=pers["ipv4PrefixLength"],
            ipv6_prefix_length=pers["ipv6PrefixLength"],
            engine=pers.get("engine"),
        ),
        one_packet_scheduling=spec["onePacketScheduling"],
        backends=Backends(
            service=backends.get("service", {}).get("name"),
            static=tuple(
                StaticRealServer(
                    address=_ip(r["address"]),
                    port=r.get("port"),
                    weight=r.get("weight"),
                    upper_threshold=r.get("upperThreshold", 0),
                    lower_threshold=r.get("lowerThreshold"),
                    check_address=_ip(r["checkAddress"]) if "checkAddress" in r else None,
                )
                for r in backends.get("static", ())
            ),
            default_weight=backends["defaultWeight"],
        ),
        drain_timeout_seconds=spec["drainTimeoutSeconds"],
        traffic_policy=TrafficPolicy(spec["trafficPolicy"]),
        node_selector=label_selector(spec.get("nodeSelector")),
        health_check=health_check(spec["healthCheck"]) if "healthCheck" in spec else None,
        feedback=feedback(spec["feedback"]) if "feedback" in spec else None,
    )


def _seconds(text: str) -> float:
    found = parse_duration(text)
    assert found is not None, "validated before"
    return found


def health_check(raw: dict[str, Any]) -> HealthCheck:
    """Build a validated, defaulted ``spec.healthCheck``."""
    http, udp, dns = raw.get("http"), raw.get("udp"), raw.get("dns")
    return HealthCheck(
        type=CheckType(raw["type"]),
        port=raw.get("port"),
        interval=_seconds(raw["interval"]),
        timeout=_seconds(raw["timeout"]),
        failure_threshold=raw["failureThreshold"],
        success_threshold=raw["successThreshold"],
        initially_up=raw["initialState"] == "Up",
        on_failure=OnFailure(raw["onFailure"]),
        http=None
        if http is None
        else HTTPCheck(
            path=http["path"],
            host=http.get("host"),
            sni=http.get("sni"),
            statuses=parse_statuses(http["statuses"]),
            body_contains=http.get("bodyContains"),
        ),
        udp=None if udp is None else UDPCheck(udp["send"], udp.get("expect"), udp["requireReply"]),
        dns=None if dns is None else DNSCheck(dns["name"], dns["type"]),
    )


def feedback(raw: dict[str, Any]) -> Feedback:
    """Build a validated, defaulted ``spec.feedback``."""
    agent = raw["agent"]
    return Feedback(
        agent_port=agent["port"],
        agent_send=agent.get("send", ""),
        period=_seconds(raw["period"]),
        timeout=_seconds(raw["timeout"]),
        gain=raw["gain"],
        target=raw["targetLoadPercent"] / 100,
        scale=raw["scale"],
        min_weight=raw["minWeight"],
        threshold=raw["thresholdPercent"] / 100,
        blackout=_seconds(raw["blackout"]),
        expiry=_seconds(raw["expiry"]),
        mode=FeedbackMode(raw["mode"]),
    )


def virtual_server(obj: dict[str, Any]) -> VirtualServer:
    """Validate and build a VirtualServer; raises :class:`InvalidObject` naming each bad field."""
    checked = _check(constants.VIRTUAL_SERVER, obj, namespaced=True)
    meta = checked["metadata"]
    status = checked.get("status") or {}
    status_address = status.get("address")
    status_fwmark = status.get("firewallMark")
    return VirtualServer(
        namespace=meta["namespace"],
        name=meta["name"],
        uid=meta.get("uid", ""),
        created=str(meta.get("creationTimestamp", "")),
        generation=int(meta.get("generation", 0)),
        spec=virtual_server_spec(checked["spec"]),
        status_address=parse_ip(status_address) if status_address else None,
        status_fwmark=status_fwmark if _is_int(status_fwmark) else None,
        status_pool=str(status["addressPool"]) if status.get("addressPool") else None,
    )


def address_range(text: str) -> AddressRange:
    """Parse a validated pool entry (CIDR or ``first-last``); a reversed range is a ValueError."""
    if "-" in text:
        first, last = (_ip(p) for p in text.split("-"))
        if int(first) > int(last):
            raise ValueError(f"range {text} starts after it ends")
        return AddressRange(first, last)
    net = parse_cidr(text)
    assert net is not None, "validated before"
    return AddressRange(net.network_address, net.broadcast_address)


def address_pool(obj: dict[str, Any]) -> AddressPool:
    """Validate and build an AddressPool; raises :class:`InvalidObject` naming each bad field."""
    checked = _check(constants.ADDRESS_POOL, obj, namespaced=False)
    spec = checked["spec"]
    ranges: list[AddressRange] = []
    errors: list[FieldError] = []
    for i, entry in enumerate(spec.get("addresses", ())):
        try:
            ranges.append(address_range(entry))
        except ValueError as exc:
            errors.append(FieldError(f"spec.addresses[{i}]", str(exc)))
    if errors:
        raise InvalidObject(constants.ADDRESS_POOL, checked["metadata"]["name"], errors)
    return AddressPool(
        name=checked["metadata"]["name"],
        ranges=tuple(ranges),
        auto_assign=spec["autoAssign"],
        namespaces=frozenset(spec.get("namespaces", ())),
        namespace_selector=label_selector(spec["namespaceSelector"])
        if "namespaceSelector" in spec
        else None,
        generation=int(checked["metadata"].get("generation", 0)),
        firewall_marks=tuple(
            MarkRange(m["first"], m.get("last", m["first"])) for m in spec.get("firewallMarks", ())
        ),
        layer2=_layer2(spec["layer2"]) if "layer2" in spec else None,
        bgp=_bgp(spec["bgp"]) if "bgp" in spec else None,
    )


def _layer2(raw: dict[str, Any]) -> Layer2:
    selector = raw.get("nodeSelector")
    return Layer2(
        node_selector=label_selector(selector) if selector else LabelSelector(),
        interfaces=tuple(raw.get("interfaces", ())),
    )


def _bgp(raw: dict[str, Any]) -> BGPAdvertisement:
    selector = raw.get("nodeSelector")
    preference = raw.get("localPreference")
    return BGPAdvertisement(
        node_selector=label_selector(selector) if selector else LabelSelector(),
        peers=tuple(raw.get("peers", ())),
        communities=tuple(raw.get("communities", ())),
        local_preference=preference if isinstance(preference, int) else None,
    )


def bgp_peer(obj: dict[str, Any]) -> BGPPeer:
    """Validate and build a BGPPeer; raises :class:`InvalidObject` naming each bad field."""
    checked = _check(constants.BGP_PEER, obj, namespaced=False)
    spec = checked["spec"]
    secret = spec.get("passwordSecret")
    selector = spec.get("nodeSelector")
    return BGPPeer(
        name=checked["metadata"]["name"],
        address=_ip(spec["address"]),
        asn=int(spec["asn"]),
        local_asn=int(spec["localASN"]),
        port=int(spec["port"]),
        hold_time=int(spec["holdTimeSeconds"]),
        source_address=_ip(spec["sourceAddress"]) if "sourceAddress" in spec else None,
        password_secret=SecretKeyRef(secret["name"], secret["key"]) if secret else None,
        node_selector=label_selector(selector) if selector else LabelSelector(),
        generation=int(checked["metadata"].get("generation", 0)),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_manifests(paths: Iterable[Path | str]) -> Iterator[dict[str, Any]]:
    """Yield every object in the YAML files (multi-document; ``List`` kinds unwrapped)."""
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for doc in yaml.safe_load_all(fh):
                if not doc:
                    continue
                if str(doc.get("kind", "")).endswith("List") and "items" in doc:
                    yield from doc["items"]
                else:
                    yield doc


__all__ = [
    "address_pool",
    "address_range",
    "bgp_peer",
    "label_selector",
    "read_manifests",
    "virtual_server",
    "virtual_server_spec",
]
