"""Python mirrors of the CRDs' CEL validation rules.

The CEL rules in ``crds/`` are the contract the API server enforces at ``kubectl apply``. The
agent also accepts manifests that never met an API server (``ipvs-agent plan -f``), so each rule
is mirrored here with the *same message* at the *same schema location*; a unit test fails when
the two sets differ, and the invalid-object corpus is judged by both. Each check receives the
defaulted node exactly as CEL's ``self`` would and returns True when the node is valid.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipvs_api.constants import MASQUERADE_MARK

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Rule:
    """One mirrored CEL rule: the message and fieldPath are copied verbatim from the CRD."""

    message: str
    check: Callable[[Any], bool]
    field_path: str = ""


def parse_ip(text: str) -> IPAddress | None:
    """Parse like Kubernetes CEL ``ip()``: no zones, no IPv4-mapped IPv6, no leading zeros."""
    if not isinstance(text, str):
        return None  # what ip_address made of it before; the schema names the wrong type
    return _parse_ip(text)


@functools.lru_cache(maxsize=1024)  # one object's validation parses each address 4 times
def _parse_ip(text: str) -> IPAddress | None:
    if "%" in text:
        return None
    try:  # IPv4 as inet_pton reads it, in C, when it is the address's one spelling ...
        packed = socket.inet_pton(socket.AF_INET, text)
    except OSError:
        pass
    else:  # ... (inet_pton takes forms ipaddress refuses; those go the long way below)
        if socket.inet_ntoa(packed) == text:
            return ipaddress.IPv4Address(packed)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return None
    return addr


def is_ip(text: str) -> bool:
    """CEL ``isIP``."""
    return parse_ip(text) is not None


def family(text: str) -> int:
    """CEL ``ip(x).family()``: 4 or 6 (0 when not an address)."""
    addr = parse_ip(text)
    return 0 if addr is None else addr.version


def is_global_unicast(addr: IPAddress) -> bool:
    """Go's ``netip.Addr.IsGlobalUnicast``, which CEL's ``isGlobalUnicast`` uses."""
    if isinstance(addr, ipaddress.IPv4Address):
        # As integers: the agent asks for every real server when it plans from nothing, and
        # the ipaddress properties (a network containment test each) were a tenth of that.
        n = int(addr)
        return not (
            n == 0  # unspecified
            or n == 0xFFFFFFFF  # limited broadcast
            or n >> 24 == 127  # loopback, 127.0.0.0/8
            or n >> 28 == 0xE  # multicast, 224.0.0.0/4
            or n >> 16 == 0xA9FE  # link-local, 169.254.0.0/16
        )
    return not (addr.is_unspecified or addr.is_loopback or addr.is_multicast or addr.is_link_local)


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """Parse like CEL ``cidr()`` with ``masked() == self``: address/prefix, no host bits."""
    if "/" not in text or "%" in text:
        return None
    addr, _, prefix = text.partition("/")
    if not prefix.isdigit() or parse_ip(addr) is None:
        return None
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None


#: Durations as the Gateway API writes them (GEP-2257): up to four number+unit pairs, e.g.
#: ``500ms``, ``2s``, ``1m30s``; CEL's ``duration()`` parses every one of them.
DURATION_PATTERN = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float | None:
    """Seconds of a duration in :data:`DURATION_PATTERN` (None when it is not one)."""
    if not re.fullmatch(DURATION_PATTERN, text):
        return None
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))


def _seconds(text: str) -> float:
    found = parse_duration(text)
    return -1.0 if found is None else found


def parse_statuses(text: str) -> tuple[tuple[int, int], ...]:
    """``200-299,401`` → ((200, 299), (401, 401)); the pattern was checked before."""
    ranges = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        ranges.append((int(first), int(last or first)))
    return tuple(ranges)


def _has(node: dict[str, Any], key: str) -> bool:
    return key in node


def _ports(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("ports", []))


def _static(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("backends", {}).get("static", []))


def _all_udp(spec: dict[str, Any]) -> bool:
    return _has(spec, "ports") and all(p.get("protocol") == "UDP" for p in spec["ports"])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fwmark_exclusive(s: dict[str, Any]) -> bool:
    return not _has(s, "fwmark") or not any(
        _has(s, k) for k in ("address", "addressPool", "ports", "sharingKey")
    )


def _family_matches(s: dict[str, Any]) -> bool:
    if not (_has(s, "address") and _has(s, "ipFamily") and is_ip(s["address"])):
        return True
    return bool((s["ipFamily"] == "IPv4") == (family(s["address"]) == 4))


def _no_remap_ports(s: dict[str, Any]) -> bool:
    return s["forwarding"]["method"] == "NAT" or all(
        "targetPort" not in p or (_is_int(p["targetPort"]) and p["targetPort"] == p["port"])
        for p in _ports(s)
    )


def _no_remap_static(s: dict[str, Any]) -> bool:
    if s["forwarding"]["method"] == "NAT":
        return True
    return all(
        "port" not in r or (_has(s, "ports") and all(p["port"] == r["port"] for p in s["ports"]))
        for r in _static(s)
    )


def _static_port_unambiguous(s: dict[str, Any]) -> bool:
    return len(_ports(s)) <= 1 or all("port" not in r for r in _static(s))


def _named_target_needs_service(s: dict[str, Any]) -> bool:
    if "static" not in s.get("backends", {}):
        return True
    return all("targetPort" not in p or _is_int(p["targetPort"]) for p in _ports(s))


def _static_same_family(s: dict[str, Any]) -> bool:
    if s["forwarding"]["method"] == "TUN" or not (_has(s, "address") and is_ip(s["address"])):
        return True
    want = family(s["address"])
    return all(not is_ip(r["address"]) or family(r["address"]) == want for r in _static(s))


def _static_family_matches_ip_family(s: dict[str, Any]) -> bool:
    if s["forwarding"]["method"] == "TUN" or not _has(s, "ipFamily"):
        return True
    want = 4 if s["ipFamily"] == "IPv4" else 6
    return all(not is_ip(r["address"]) or family(r["address"]) == want for r in _static(s))


def _target_port_ok(v: Any) -> bool:
    if _is_int(v):
        return bool(1 <= v <= 65535)
    return bool(
        re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", v) and len(v) <= 15 and re.search("[a-z]", v)
    )


def _unique_names(ports: list[dict[str, Any]]) -> bool:
    names = [p["name"] for p in ports if "name" in p]
    return len(names) == len(set(names))


def _unique_static(servers: list[dict[str, Any]]) -> bool:
    keys = [(r["address"], r.get("port", 0)) for r in servers]
    return len(keys) == len(set(keys))


def _thresholds(r: dict[str, Any]) -> bool:
    return "lowerThreshold" not in r or (
        "upperThreshold" in r and r["lowerThreshold"] <= r["upperThreshold"]
    )


def _vip_ok(v: str) -> bool:
    addr = parse_ip(v)
    return addr is not None and is_global_unicast(addr)


def _real_server_ok(v: str) -> bool:
    addr = parse_ip(v)
    return addr is not None and is_global_unicast(addr)


def _pool_entry_ok(v: str) -> bool:
    if "-" in v:
        parts = v.split("-")
        return (
            len(parts) == 2
            and is_ip(parts[0])
            and is_ip(parts[1])
            and (family(parts[0]) == family(parts[1]))
        )
    return parse_cidr(v) is not None


def _grants_something(s: dict[str, Any]) -> bool:
    return len(s.get("addresses", [])) > 0 or len(s.get("firewallMarks", [])) > 0


def _marks_avoid_masquerade_bit(r: dict[str, Any]) -> bool:
    """No mark in [first, last] has the agent's masquerade bit set.

    CEL has no bitwise operators, so the CRD says it with division; this is the same rule in
    bits: the lowest mark at or above ``first`` with the bit set lies beyond ``last``.
    """
    first, last, bit = r["first"], r.get("last", r["first"]), MASQUERADE_MARK
    lowest = first if first & bit else (first & ~(2 * bit - 1)) | bit
    return bool(lowest > last)


def _community_ok(v: str) -> bool:
    """CEL: a well-known name, or ASN:value (1-5 digits each, at most 65535)."""
    if v in ("no-export", "no-advertise"):
        return True
    high, colon, low = v.partition(":")
    parts = (high, low)
    digits = all(p.isascii() and p.isdigit() and 1 <= len(p) <= 5 for p in parts)
    return bool(colon) and digits and all(int(p) <= 65535 for p in parts)


def _peer_address_ok(v: str) -> bool:
    addr = parse_ip(v)
    return addr is not None and (is_global_unicast(addr) or addr.is_link_local)


def _source_family_matches(s: dict[str, Any]) -> bool:
    if not _has(s, "sourceAddress") or not is_ip(s["address"]) or not is_ip(s["sourceAddress"]):
        return True
    return family(s["sourceAddress"]) == family(s["address"])


def _requirement_ok(r: dict[str, Any]) -> bool:
    return (r["operator"] in ("In", "NotIn")) == (len(r.get("values", [])) > 0)


_REQUIREMENT = Rule(
    "values must be non-empty for In and NotIn and absent for Exists and DoesNotExist",
    _requirement_ok,
    "values",
)

#: Rules by (kind, schema location); a location is a dotted path with ``[]`` for list items.
RULES: dict[tuple[str, str], tuple[Rule, ...]] = {
    ("VirtualServer", "spec"): (
        Rule(
            "fwmark excludes address, addressPool, sharingKey and ports: a firewall-mark service "
            "matches packets by mark, not by address and port",
            _fwmark_exclusive,
            "fwmark",
        ),
        Rule(
            "ports is required unless fwmark is set",
            lambda s: _has(s, "fwmark") or len(_ports(s)) > 0,
            "ports",
        ),
        Rule("ipFamily must match the family of address", _family_matches, "ipFamily"),
        Rule(
            "DR and TUN cannot remap ports: targetPort must be omitted or equal port",
            _no_remap_ports,
            "ports",
        ),
        Rule(
            "DR and TUN cannot remap ports: a static real server's port must be omitted or equal "
            "the service port",
            _no_remap_static,
            "backends.static",
        ),
        Rule(
            "with several ports a static real server's port is ambiguous: omit it and set "
            "ports[].targetPort",
            _static_port_unambiguous,
            "backends.static",
        ),
        Rule(
            "a named targetPort needs Service backends: static real servers have no named ports",
            _named_target_needs_service,
            "ports",
        ),
        Rule(
            "onePacketScheduling is only for UDP: every port must use protocol UDP",
            lambda s: not s["onePacketScheduling"] or _all_udp(s),
            "onePacketScheduling",
        ),
        Rule(
            "onePacketScheduling needs DR or TUN: with NAT the kernel keeps no connection to "
            "translate the replies back to the virtual address",
            lambda s: not s["onePacketScheduling"] or s["forwarding"]["method"] != "NAT",
            "onePacketScheduling",
        ),
        Rule(
            "persistence engine sip works on UDP only: every port must use protocol UDP",
            lambda s: "engine" not in s.get("persistence", {}) or _all_udp(s),
            "persistence.engine",
        ),
        Rule(
            "trafficPolicy Local needs Service backends: static real servers have no node",
            lambda s: s["trafficPolicy"] == "Cluster" or "service" in s["backends"],
            "trafficPolicy",
        ),
        Rule(
            "real servers must have the address family of the virtual address; only TUN may "
            "cross families",
            _static_same_family,
            "backends.static",
        ),
        Rule(
            "real servers must have the address family of ipFamily; only TUN may cross families",
            _static_family_matches_ip_family,
            "backends.static",
        ),
        Rule(
            "healthCheck checks static real servers: endpoints of a Service have Kubernetes "
            "readiness",
            lambda s: "healthCheck" not in s or "static" in s["backends"],
            "healthCheck",
        ),
        Rule(
            "a firewall-mark service has no port to check: set healthCheck.port",
            lambda s: "healthCheck" not in s or "fwmark" not in s or "port" in s["healthCheck"],
            "healthCheck.port",
        ),
        Rule(
            "checkAddress needs healthCheck: it is where the check connects",
            lambda s: "healthCheck" in s or all("checkAddress" not in r for r in _static(s)),
            "backends.static",
        ),
    ),
    ("VirtualServer", "spec.healthCheck"): (
        Rule(
            "timeout must not exceed interval: one probe per real server at a time",
            lambda h: _seconds(h["timeout"]) <= _seconds(h["interval"]),
            "timeout",
        ),
        Rule(
            "http is only valid with type HTTP or HTTPS",
            lambda h: "http" not in h or h["type"] in ("HTTP", "HTTPS"),
            "http",
        ),
        Rule(
            "sni is only valid with type HTTPS",
            lambda h: "sni" not in h.get("http", {}) or h["type"] == "HTTPS",
            "http.sni",
        ),
        Rule(
            "udp is required for type UDP and only valid with it",
            lambda h: (h["type"] == "UDP") == ("udp" in h),
            "udp",
        ),
        Rule(
            "dns is required for type DNS and only valid with it",
            lambda h: (h["type"] == "DNS") == ("dns" in h),
            "dns",
        ),
    ),
    ("VirtualServer", "spec.healthCheck.interval"): (
        Rule("must be between 100ms and 1h", lambda d: 0.1 <= _seconds(d) <= 3600),
    ),
    ("VirtualServer", "spec.healthCheck.timeout"): (
        Rule("must be at least 10ms", lambda d: _seconds(d) >= 0.01),
    ),
    ("VirtualServer", "spec.healthCheck.http.statuses"): (
        Rule(
            "each range must start at or below its end, e.g. 200-299",
            lambda t: all(a <= b for a, b in parse_statuses(t)),
        ),
    ),
    ("VirtualServer", "spec.feedback"): (
        Rule(
            "timeout must not exceed period: one poll per feedback agent at a time",
            lambda f: _seconds(f["timeout"]) <= _seconds(f["period"]),
            "timeout",
        ),
        Rule(
            "expiry must be longer than period: a fresh report would go stale between polls",
            lambda f: _seconds(f["expiry"]) > _seconds(f["period"]),
            "expiry",
        ),
    ),
    ("VirtualServer", "spec.feedback.period"): (
        Rule("must be between 100ms and 1h", lambda d: 0.1 <= _seconds(d) <= 3600),
    ),
    ("VirtualServer", "spec.feedback.timeout"): (
        Rule("must be at least 10ms", lambda d: _seconds(d) >= 0.01),
    ),
    ("VirtualServer", "spec.address"): (
        Rule(
            "must be a unicast IPv4 or IPv6 address, not loopback, link-local, multicast or "
            "unspecified, e.g. 192.0.2.10 or 2001:db8::10",
            _vip_ok,
        ),
    ),
    ("VirtualServer", "spec.ports"): (Rule("port names must be unique", _unique_names),),
    ("VirtualServer", "spec.ports[].targetPort"): (
        Rule(
            "must be a port number 1-65535 or an IANA service name (at most 15 lowercase letters, "
            "digits and '-', at least one letter)",
            _target_port_ok,
        ),
    ),
    ("VirtualServer", "spec.scheduler"): (
        Rule(
            "flags must belong to the scheduler: sh-fallback and sh-port for sh, mh-fallback and "
            "mh-port for mh; other schedulers take none",
            lambda s: all(f.startswith(s["name"] + "-") for f in s.get("flags", [])),
            "flags",
        ),
    ),
    ("VirtualServer", "spec.forwarding"): (
        Rule(
            "tunnel is only valid with method TUN",
            lambda f: "tunnel" not in f or f["method"] == "TUN",
            "tunnel",
        ),
    ),
    ("VirtualServer", "spec.forwarding.tunnel"): (
        Rule(
            "port is required for tunnel type gue and only valid with it",
            lambda t: ("port" in t) == (t["type"] == "gue"),
            "port",
        ),
        Rule(
            "checksum remcsum is only valid with tunnel type gue",
            lambda t: t["checksum"] != "remcsum" or t["type"] == "gue",
            "checksum",
        ),
    ),
    ("VirtualServer", "spec.backends"): (
        Rule(
            "exactly one of service or static must be set",
            lambda b: ("service" in b) != ("static" in b),
        ),
    ),
    ("VirtualServer", "spec.backends.static"): (
        Rule("each real server (address and port) must be listed once", _unique_static),
    ),
    ("VirtualServer", "spec.backends.static[]"): (
        Rule(
            "lowerThreshold needs upperThreshold and must not exceed it",
            _thresholds,
            "lowerThreshold",
        ),
    ),
    ("VirtualServer", "spec.backends.static[].address"): (
        Rule(
            "must be a unicast IPv4 or IPv6 address, not loopback, link-local (169.254.0.0/16 "
            "and fe80::/10, where cloud metadata services answer), multicast or unspecified",
            _real_server_ok,
        ),
    ),
    ("VirtualServer", "spec.backends.static[].checkAddress"): (
        Rule(
            "must be a unicast IPv4 or IPv6 address, not loopback, link-local (169.254.0.0/16 "
            "and fe80::/10, where cloud metadata services answer), multicast or unspecified",
            _real_server_ok,
        ),
    ),
    ("VirtualServer", "spec.fwmark"): (
        Rule(
            "must not set bit 0x2000 (8192): the node agent marks NAT traffic with it, and a "
            "firewall-mark service with that bit would capture it",
            lambda m: (m // 8192) % 2 == 0,
        ),
    ),
    ("VirtualServer", "spec.nodeSelector.matchExpressions[]"): (_REQUIREMENT,),
    ("AddressPool", "spec"): (
        Rule(
            "addresses or firewallMarks is required: a pool grants addresses, firewall marks or "
            "both",
            _grants_something,
            "addresses",
        ),
    ),
    ("AddressPool", "spec.firewallMarks[]"): (
        Rule(
            "last must not be less than first",
            lambda r: "last" not in r or r["last"] >= r["first"],
            "last",
        ),
        Rule(
            "must not contain a mark with bit 0x2000 (8192) set: the agent marks NAT traffic with "
            "0x2000 (8192) to masquerade it",
            _marks_avoid_masquerade_bit,
        ),
    ),
    ("AddressPool", "spec.addresses[]"): (
        Rule(
            "must be a CIDR without host bits (192.0.2.0/28) or a range of two addresses of one "
            "family (192.0.2.10-192.0.2.20)",
            _pool_entry_ok,
        ),
    ),
    ("AddressPool", "spec.namespaceSelector.matchExpressions[]"): (_REQUIREMENT,),
    ("AddressPool", "spec.layer2.nodeSelector.matchExpressions[]"): (_REQUIREMENT,),
    ("AddressPool", "spec.bgp.nodeSelector.matchExpressions[]"): (_REQUIREMENT,),
    ("AddressPool", "spec.bgp.communities[]"): (
        Rule("must be ASN:value with each part 0-65535, or no-export, no-advertise", _community_ok),
    ),
    ("BGPPeer", "spec"): (
        Rule(
            "sourceAddress must be of the same family as address",
            _source_family_matches,
            "sourceAddress",
        ),
    ),
    ("BGPPeer", "spec.address"): (Rule("must be a unicast IP address", _peer_address_ok),),
    ("BGPPeer", "spec.holdTimeSeconds"): (
        Rule("must be 0 or at least 3", lambda v: v == 0 or v >= 3),
    ),
    ("BGPPeer", "spec.sourceAddress"): (Rule("must be an IP address", is_ip),),
    ("BGPPeer", "spec.nodeSelector.matchExpressions[]"): (_REQUIREMENT,),
}
