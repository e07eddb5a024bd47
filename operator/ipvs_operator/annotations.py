"""Service annotations that tune the VirtualServer made for a LoadBalancer Service.

A Service has no field for a scheduler or a forwarding method, so these annotations carry the
VirtualServer fields that matter per Service. Each parser returns a piece of VirtualServer
``spec`` or an error naming the annotation, so a typo produces an Event that says where it is
instead of a silently different load balancer. docs/api.md ("LoadBalancer Services") lists them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ipvs_api.rules import parse_ip
from ipvs_api.types import (
    ForwardingMethod,
    IPAddress,
    Scheduler,
    SchedulerFlag,
    TunnelChecksum,
    TunnelType,
)

PREFIX: Final = "ipvs.io/"

SCHEDULER: Final = "ipvs.io/scheduler"
SCHEDULER_FLAGS: Final = "ipvs.io/scheduler-flags"
FORWARDING_METHOD: Final = "ipvs.io/forwarding-method"
TUNNEL_TYPE: Final = "ipvs.io/tunnel-type"
TUNNEL_PORT: Final = "ipvs.io/tunnel-port"
TUNNEL_CHECKSUM: Final = "ipvs.io/tunnel-checksum"
ADDRESS: Final = "ipvs.io/address"
ADDRESS_POOL: Final = "ipvs.io/address-pool"
SHARING_KEY: Final = "ipvs.io/sharing-key"
DRAIN_TIMEOUT: Final = "ipvs.io/drain-timeout"
PERSISTENCE_IPV4_PREFIX: Final = "ipvs.io/persistence-ipv4-prefix-length"
PERSISTENCE_IPV6_PREFIX: Final = "ipvs.io/persistence-ipv6-prefix-length"
ONE_PACKET_SCHEDULING: Final = "ipvs.io/one-packet-scheduling"
NODE_SELECTOR: Final = "ipvs.io/node-selector"

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SHARING_KEY = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


@dataclass
class Parsed:
    """What the annotations of one Service ask for."""

    #: Fragments merged into the VirtualServer spec (keys as in the CRD).
    spec: dict[str, Any] = field(default_factory=dict)
    #: Requested virtual addresses (ipvs.io/address), at most one per family.
    addresses: list[IPAddress] = field(default_factory=list)
    #: persistence prefix lengths, applied only with sessionAffinity ClientIP.
    persistence: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _int(value: str, low: int, high: int) -> int:
    number = int(value.strip())
    if not low <= number <= high:
        raise ValueError(f"must be between {low} and {high}")
    return number


def _choice(value: str, allowed: list[str]) -> str:
    text = value.strip()
    if text not in allowed:
        raise ValueError(f"must be one of {', '.join(allowed)}")
    return text


def _list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _bool(value: str) -> bool:
    text = value.strip().lower()
    if text not in ("true", "false"):
        raise ValueError("must be true or false")
    return text == "true"


def _match(value: str, pattern: re.Pattern[str], what: str, limit: int) -> str:
    text = value.strip()
    if len(text) > limit or not pattern.match(text):
        raise ValueError(f"must be {what}")
    return text


def _selector(value: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in _list(value):
        key, sep, val = part.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(val):
            raise ValueError("must be comma-separated key=value node labels")
        labels[key] = val
    if not labels:
        raise ValueError("must name at least one key=value node label")
    return labels


def _addresses(value: str) -> list[IPAddress]:
    found: list[IPAddress] = []
    for part in _list(value):
        addr = parse_ip(part)
        if addr is None:
            raise ValueError(f"{part!r} is not an IPv4 or IPv6 address")
        if any(a.version == addr.version for a in found):
            raise ValueError("at most one address per IP family")
        found.append(addr)
    if not found:
        raise ValueError("must list one address, or one IPv4 and one IPv6 address")
    return found


def _put(target: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value


_SCHEDULERS = [s.value for s in Scheduler]
_FLAGS = [f.value for f in SchedulerFlag]
_METHODS = [m.value for m in ForwardingMethod]
_TUNNELS = [t.value for t in TunnelType]
_CHECKSUMS = [c.value for c in TunnelChecksum]

#: annotation -> (parser, where the value goes in the VirtualServer spec)
_SPEC_FIELDS: dict[str, tuple[Callable[[str], Any], tuple[str, ...]]] = {
    SCHEDULER: (lambda v: _choice(v, _SCHEDULERS), ("scheduler", "name")),
    SCHEDULER_FLAGS: (lambda v: [_choice(f, _FLAGS) for f in _list(v)], ("scheduler", "flags")),
    FORWARDING_METHOD: (lambda v: _choice(v.upper(), _METHODS), ("forwarding", "method")),
    TUNNEL_TYPE: (lambda v: _choice(v, _TUNNELS), ("forwarding", "tunnel", "type")),
    TUNNEL_PORT: (lambda v: _int(v, 1, 65535), ("forwarding", "tunnel", "port")),
    TUNNEL_CHECKSUM: (lambda v: _choice(v, _CHECKSUMS), ("forwarding", "tunnel", "checksum")),
    ADDRESS_POOL: (
        lambda v: _match(v, _NAME, "the name of an AddressPool", 253),
        ("addressPool",),
    ),
    SHARING_KEY: (
        lambda v: _match(v, _SHARING_KEY, "letters, digits, '-', '_' or '.'", 128),
        ("sharingKey",),
    ),
    DRAIN_TIMEOUT: (lambda v: _int(v, 0, 86400), ("drainTimeoutSeconds",)),
    ONE_PACKET_SCHEDULING: (_bool, ("onePacketScheduling",)),
    NODE_SELECTOR: (_selector, ("nodeSelector", "matchLabels")),
}

_PERSISTENCE_FIELDS: dict[str, tuple[str, int, int]] = {
    PERSISTENCE_IPV4_PREFIX: ("ipv4PrefixLength", 0, 32),
    PERSISTENCE_IPV6_PREFIX: ("ipv6PrefixLength", 1, 128),
}

KNOWN: Final = frozenset({*_SPEC_FIELDS, *_PERSISTENCE_FIELDS, ADDRESS})


def parse(annotations: Mapping[str, str]) -> Parsed:
    """Read every ``ipvs.io/`` annotation; unknown ones are errors (they are usually typos)."""
    out = Parsed()
    for key in sorted(annotations):
        if not key.startswith(PREFIX):
            continue
        value = str(annotations[key])
        try:
            if key in _SPEC_FIELDS:
                parser, path = _SPEC_FIELDS[key]
                _put(out.spec, path, parser(value))
            elif key in _PERSISTENCE_FIELDS:
                name, low, high = _PERSISTENCE_FIELDS[key]
                out.persistence[name] = _int(value, low, high)
            elif key == ADDRESS:
                out.addresses = _addresses(value)
            else:
                raise ValueError("unknown annotation; see docs/api.md for the supported ones")
        except ValueError as exc:
            out.errors.append(f"annotation {key}={value!r}: {exc}")
    return out
