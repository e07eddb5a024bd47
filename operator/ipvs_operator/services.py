"""A LoadBalancer Service as VirtualServers: pure, one VirtualServer per IP family.

The operator treats a Service as a VirtualServer written for the user: everything below decides
what that VirtualServer says, and the shared validation (:func:`ipvs_api.load.virtual_server`)
judges it exactly as the API server would, so an invalid combination becomes an Event on the
Service instead of a failed write and a retry loop.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ipvs_api import conditions, constants, load, schema
from ipvs_api.errors import InvalidObject
from ipvs_api.rules import parse_ip
from ipvs_api.types import IPAddress, IPFamily
from ipvs_operator import annotations as ann
from ipvs_operator.status import describe_announcement

#: kube-proxy's default for sessionAffinityConfig.clientIP.timeoutSeconds.
DEFAULT_AFFINITY_SECONDS: Final = 10800
_IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUFFIX: Final = {IPFamily.IPV4: "-v4", IPFamily.IPV6: "-v6"}


def is_ours(service: Mapping[str, Any], default_load_balancer: bool) -> bool:
    """A LoadBalancer Service of our class, or of no class when we are the cluster default."""
    spec = service.get("spec") or {}
    if spec.get("type") != "LoadBalancer":
        return False
    cls = spec.get("loadBalancerClass")
    return cls == constants.LOAD_BALANCER_CLASS or (cls is None and default_load_balancer)


def families(service: Mapping[str, Any]) -> list[IPFamily]:
    """The Service's families in its order; the first (primary) one cannot change."""
    found = [IPFamily(f) for f in (service.get("spec") or {}).get("ipFamilies") or ["IPv4"]]
    return found or [IPFamily.IPV4]


def virtual_server_name(service_name: str, family: IPFamily, primary: IPFamily) -> str:
    """``<svc>`` for the primary family, ``<svc>-v4``/``<svc>-v6`` for the secondary one.

    Keyed to the primary family, which is immutable, so turning a single-stack Service
    dual-stack adds one VirtualServer and renames nothing.
    """
    return service_name if family is primary else service_name + _SUFFIX[family]


@dataclass(frozen=True)
class Plan:
    """The VirtualServers a Service should have, or why it cannot have them."""

    manifests: tuple[dict[str, Any], ...] = ()
    errors: tuple[str, ...] = ()


def _target_port(port: Mapping[str, Any], method: str, errors: list[str]) -> int | str | None:
    """Where a Service port's traffic goes, in terms the agents resolve from EndpointSlices.

    EndpointSlice ports carry the *Service* port's name with the resolved number, so a named
    Service port resolves per endpoint even when its targetPort names a container port.
    """
    number = int(port["port"])
    name = port.get("name") or ""
    target = port.get("targetPort", number)
    label = f"port {name or number}"
    if method != "NAT":
        # DR and TUN keep the destination port: the real servers must listen on the port itself.
        if isinstance(target, int) and target != number:
            errors.append(
                f"{label}: forwarding {method} cannot change the port "
                f"(targetPort {target} differs from port {number}); use NAT or targetPort {number}"
            )
        return None
    if name and _IANA_SVC_NAME.match(name) and len(name) <= 15:
        return name
    if isinstance(target, int):
        return None if target == number else target
    if name:
        errors.append(
            f"{label}: the port name must be a valid IANA service name (at most 15 characters) "
            f"when targetPort {target!r} names a container port"
        )
    else:
        errors.append(f"{label}: name the Service port when targetPort {target!r} is a name")
    return None


def _ports(service: Mapping[str, Any], method: str, errors: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for port in (service.get("spec") or {}).get("ports") or ():
        entry: dict[str, Any] = {"port": int(port["port"]), "protocol": port.get("protocol", "TCP")}
        if port.get("name") and _IANA_SVC_NAME.match(port["name"]):
            entry["name"] = port["name"]
        target = _target_port(port, method, errors)
        if target is not None:
            entry["targetPort"] = target
        out.append(entry)
    if not out:
        errors.append("the Service has no ports")
    return out


def _requested(
    service: Mapping[str, Any], parsed: ann.Parsed, fams: Sequence[IPFamily]
) -> dict[IPFamily, IPAddress]:
    """Requested addresses by family: ipvs.io/address, else the deprecated spec.loadBalancerIP."""
    addresses = list(parsed.addresses)
    legacy = (service.get("spec") or {}).get("loadBalancerIP")
    if not addresses and legacy:
        addr = parse_ip(str(legacy))
        if addr is None:
            parsed.errors.append(f"spec.loadBalancerIP {legacy!r} is not an IP address")
        else:
            addresses = [addr]
    out: dict[IPFamily, IPAddress] = {}
    for addr in addresses:
        family = IPFamily.of(addr)
        if family not in fams:
            parsed.errors.append(
                f"requested address {addr} is {family.value} but the Service's ipFamilies are "
                f"{', '.join(f.value for f in fams)}"
            )
        else:
            out[family] = addr
    return out


def _persistence(service: Mapping[str, Any], parsed: ann.Parsed) -> dict[str, Any] | None:
    spec = service.get("spec") or {}
    if spec.get("sessionAffinity") != "ClientIP":
        if parsed.persistence:
            parsed.errors.append("persistence prefix annotations need sessionAffinity: ClientIP")
        return None
    config = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
    seconds = int(config.get("timeoutSeconds") or DEFAULT_AFFINITY_SECONDS)
    return {"timeoutSeconds": seconds, **parsed.persistence}


def _owner(service: Mapping[str, Any]) -> dict[str, Any]:
    meta = service["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
    }


def labels_for(service_name: str) -> dict[str, str]:
    return {
        constants.LABEL_SERVICE_NAME: service_name,
        constants.LABEL_MANAGED_BY: constants.MANAGED_BY,
    }


def plan(service: Mapping[str, Any]) -> Plan:
    """The VirtualServer manifests (metadata and defaulted spec) for a Service we serve."""
    meta = service.get("metadata") or {}
    name, namespace = meta.get("name", ""), meta.get("namespace", "")
    parsed = ann.parse(meta.get("annotations") or {})
    fams = families(service)
    method = (parsed.spec.get("forwarding") or {}).get("method", "NAT")
    errors = parsed.errors
    ports = _ports(service, method, errors)
    requested = _requested(service, parsed, fams)
    persistence = _persistence(service, parsed)
    if errors:
        return Plan(errors=tuple(errors))
    base: dict[str, Any] = copy.deepcopy(parsed.spec)
    base["ports"] = ports
    base["backends"] = {"service": {"name": name}}
    if persistence is not None:
        base["persistence"] = persistence
    if (service.get("spec") or {}).get("externalTrafficPolicy") == "Local":
        base["trafficPolicy"] = "Local"
    manifests: list[dict[str, Any]] = []
    problems: list[str] = []
    for family in fams:
        spec = copy.deepcopy(base)
        spec["ipFamily"] = family.value
        if family in requested:
            spec["address"] = str(requested[family])
        manifest = {
            "apiVersion": constants.API_VERSION,
            "kind": constants.VIRTUAL_SERVER,
            "metadata": {
                "name": virtual_server_name(name, family, fams[0]),
                "namespace": namespace,
                "labels": labels_for(name),
                "ownerReferences": [_owner(service)],
            },
            "spec": spec,
        }
        try:
            load.virtual_server(manifest)
        except InvalidObject as exc:
            problems.extend(f"{family.value}: {e}" for e in exc.errors)
            continue
        # Defaults filled in as the API server would, so drift is a plain comparison.
        manifest["spec"] = defaulted_spec(manifest)
        manifests.append(manifest)
    if problems:
        return Plan(errors=tuple(problems))
    return Plan(manifests=tuple(manifests))


def defaulted_spec(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as the API server stores it (CRD defaults filled), for drift comparison."""
    out, _ = schema.validate(constants.VIRTUAL_SERVER, dict(manifest))
    spec: dict[str, Any] = out.get("spec") or {}
    return spec


def needs_update(manifest: Mapping[str, Any], existing: Mapping[str, Any]) -> bool:
    """Whether the stored VirtualServer differs from what the Service asks for."""
    meta = existing.get("metadata") or {}
    labels = meta.get("labels") or {}
    want_meta = manifest["metadata"]
    if any(labels.get(k) != v for k, v in want_meta["labels"].items()):
        return True
    uids = {o.get("uid") for o in meta.get("ownerReferences") or ()}
    if want_meta["ownerReferences"][0]["uid"] not in uids:
        return True
    return bool(manifest["spec"] != (existing.get("spec") or {}))


def merge_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) turning ``old`` into ``new``; lists are replaced whole."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_diff(before, value)
            if nested:
                patch[key] = nested
        elif value != before:
            patch[key] = copy.deepcopy(value)
    return patch


def update_patch(manifest: Mapping[str, Any], existing: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch giving the stored VirtualServer our spec, labels and owner.

    It carries the resourceVersion it was computed from, so a concurrent change makes it fail
    with 409 (and the Service is reconciled again) instead of silently mixing two specs.
    """
    meta = existing.get("metadata") or {}
    owner = manifest["metadata"]["ownerReferences"][0]
    others = [o for o in meta.get("ownerReferences") or () if o.get("kind") != "Service"]
    return {
        "metadata": {
            "resourceVersion": meta.get("resourceVersion"),
            "labels": dict(manifest["metadata"]["labels"]),
            "ownerReferences": [*others, owner],
        },
        "spec": merge_diff(existing.get("spec") or {}, manifest["spec"]),
    }


def announced_condition(
    announcements: Sequence[tuple[IPAddress, Mapping[str, Any] | None]],
    conditions_now: list[dict[str, Any]],
    generation: int,
) -> list[dict[str, Any]]:
    """The Service's conditions with ``ipvs.io/Announced`` set from its VirtualServers'
    ``status.announcement`` (address, announcement or None), so ``kubectl describe service``
    names the announcing nodes after the Events are gone. A Service whose addresses were never
    announced gets no such condition."""
    done = [(a, x) for a, x in announcements if x]
    missing = [str(a) for a, x in announcements if not x]
    had = any(c.get("type") == conditions.SERVICE_ANNOUNCED for c in conditions_now)
    if not done and not had:
        return conditions_now
    parts = [f"{a} {describe_announcement(x)}" for a, x in done if x]
    if missing:
        parts.append("not announced: " + ", ".join(missing))
    message = "; ".join(parts)
    ok = bool(done) and not missing
    reason = conditions.ANNOUNCED if ok else conditions.NOT_ANNOUNCED
    return conditions.set_condition(
        conditions_now, conditions.SERVICE_ANNOUNCED, ok, reason, message, generation
    )


def ingress(addresses: Sequence[IPAddress]) -> list[dict[str, str]]:
    """status.loadBalancer.ingress: ipMode Proxy tells kube-proxy to leave the address alone."""
    return [{"ip": str(a), "ipMode": "Proxy"} for a in addresses]
