"""Typed, immutable views of the v1alpha1 objects, in LVS vocabulary.

Built only from objects that passed :func:`ipvs_api.schema.validate`, so every field here is
already defaulted and consistent; the planners in the operator and the agent work on these.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Scheduler(StrEnum):
    """Kernel IPVS schedulers, by the name the kernel module registers."""

    RR = "rr"
    WRR = "wrr"
    LC = "lc"
    WLC = "wlc"
    LBLC = "lblc"
    LBLCR = "lblcr"
    DH = "dh"
    SH = "sh"
    SED = "sed"
    NQ = "nq"
    MH = "mh"
    FO = "fo"
    OVF = "ovf"
    TWOS = "twos"


class SchedulerFlag(StrEnum):
    """Scheduler flags; the kernel reuses three generic bits, named per scheduler here."""

    SH_FALLBACK = "sh-fallback"
    SH_PORT = "sh-port"
    MH_FALLBACK = "mh-fallback"
    MH_PORT = "mh-port"


class ForwardingMethod(StrEnum):
    NAT = "NAT"
    DR = "DR"
    TUN = "TUN"


class TunnelType(StrEnum):
    IPIP = "ipip"
    GUE = "gue"
    GRE = "gre"


class TunnelChecksum(StrEnum):
    NOCSUM = "nocsum"
    CSUM = "csum"
    REMCSUM = "remcsum"


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class IPFamily(StrEnum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"

    @classmethod
    def of(cls, addr: IPAddress) -> IPFamily:
        return cls.IPV4 if addr.version == 4 else cls.IPV6


class TrafficPolicy(StrEnum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        inside = labels.get(self.key) in self.values
        return inside if self.operator == "In" else not inside


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A Kubernetes label selector; the empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[LabelRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of a virtual service; ``target_port`` None means the same port."""

    port: int
    protocol: Protocol = Protocol.TCP
    target_port: int | str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Tunnel:
    type: TunnelType = TunnelType.IPIP
    port: int | None = None
    checksum: TunnelChecksum = TunnelChecksum.NOCSUM


@dataclass(frozen=True, slots=True)
class Forwarding:
    method: ForwardingMethod = ForwardingMethod.NAT
    tunnel: Tunnel = field(default_factory=Tunnel)


@dataclass(frozen=True, slots=True)
class Persistence:
    timeout_seconds: int = 300
    ipv4_prefix_length: int = 32
    ipv6_prefix_length: int = 128
    engine: str | None = None


@dataclass(frozen=True, slots=True)
class StaticRealServer:
    address: IPAddress
    port: int | None = None
    weight: int | None = None
    upper_threshold: int = 0
    lower_threshold: int | None = None
    #: Where the health check connects instead of ``address`` (keepalived's connect_ip).
    check_address: IPAddress | None = None


class CheckType(StrEnum):
    """What a health check does to a real server (no exec: it would run code on nodes)."""

    TCP = "TCP"
    HTTP = "HTTP"
    HTTPS = "HTTPS"
    UDP = "UDP"
    DNS = "DNS"


class OnFailure(StrEnum):
    """What a failed real server becomes: quiesced (weight 0, keepalived's inhibit_on_failure:
    its connections finish, it gets no new ones) or removed from the table."""

    QUIESCE = "Quiesce"
    REMOVE = "Remove"


@dataclass(frozen=True, slots=True)
class HTTPCheck:
    path: str = "/"
    #: Host header; None: the address checked.
    host: str | None = None
    #: TLS server name (HTTPS); None: ``host`` when set.
    sni: str | None = None
    #: Inclusive status ranges that count as healthy.
    statuses: tuple[tuple[int, int], ...] = ((200, 299),)
    #: Text the first 64 KiB of the body must contain.
    body_contains: str | None = None


@dataclass(frozen=True, slots=True)
class UDPCheck:
    send: str
    #: Text the reply must contain; None: any reply.
    expect: str | None = None
    #: False: silence counts as healthy, only an ICMP error (port unreachable) fails.
    require_reply: bool = True


@dataclass(frozen=True, slots=True)
class DNSCheck:
    name: str
    type: str = "A"


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One check per static real server, run by every director from its own node.

    Durations are seconds. The thresholds make one rise/fall state machine whatever the type.
    """

    type: CheckType
    port: int | None = None
    interval: float = 5.0
    timeout: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 2
    #: False (``initialState: Down``, keepalived's alpha): down until the first success.
    initially_up: bool = True
    on_failure: OnFailure = OnFailure.QUIESCE
    http: HTTPCheck | None = None
    udp: UDPCheck | None = None
    dns: DNSCheck | None = None


class FeedbackMode(StrEnum):
    """What the feedback law steers each real server's load toward."""

    #: ``targetLoadPercent`` (the LVS law): below it a weight rises, above it it falls.
    TARGET = "Target"
    #: The mean load of the VirtualServer's real servers: utilisation evens out, and the
    #: weights end up in proportion to capacity.
    BALANCE = "Balance"


@dataclass(frozen=True, slots=True)
class Feedback:
    """LVS dynamic feedback: load from each real server's agent (HAProxy agent-check protocol)
    moves its weight by ``gain * cbrt(target - load)`` every ``period``, between ``min_weight``
    and ``scale`` times the configured weight; the kernel is written only past ``threshold``.
    Durations are seconds, ``target`` and ``threshold`` fractions."""

    agent_port: int
    agent_send: str = ""
    period: float = 5.0
    timeout: float = 1.0
    gain: int = 5
    target: float = 0.95
    scale: int = 10
    min_weight: int = 1
    threshold: float = 0.15
    blackout: float = 10.0
    expiry: float = 180.0
    mode: FeedbackMode = FeedbackMode.TARGET


@dataclass(frozen=True, slots=True)
class Backends:
    """Exactly one of ``service`` (a Service name) or ``static`` is in use."""

    service: str | None = None
    static: tuple[StaticRealServer, ...] = ()
    default_weight: int = 1


@dataclass(frozen=True, slots=True)
class VirtualServerSpec:
    backends: Backends
    address: IPAddress | None = None
    address_pool: str | None = None
    ip_family: IPFamily | None = None
    sharing_key: str | None = None
    fwmark: int | None = None
    ports: tuple[ServicePort, ...] = ()
    scheduler: Scheduler = Scheduler.WLC
    scheduler_flags: frozenset[SchedulerFlag] = frozenset()
    forwarding: Forwarding = field(default_factory=Forwarding)
    persistence: Persistence | None = None
    one_packet_scheduling: bool = False
    drain_timeout_seconds: int = 300
    traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    node_selector: LabelSelector = field(default_factory=LabelSelector)
    health_check: HealthCheck | None = None
    feedback: Feedback | None = None

    @property
    def family(self) -> IPFamily:
        """The family of the virtual address: from address, else ipFamily, else IPv4."""
        if self.address is not None:
            return IPFamily.of(self.address)
        return self.ip_family or IPFamily.IPV4


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """A validated VirtualServer with the identity the agents report against."""

    namespace: str
    name: str
    spec: VirtualServerSpec
    generation: int = 0
    uid: str = ""
    #: metadata.creationTimestamp (RFC 3339); the earlier object wins a conflict.
    created: str = ""
    #: The address the operator allocated (status.address), when spec.address is unset.
    status_address: IPAddress | None = None
    #: The firewall mark the operator admitted (status.firewallMark); only then is spec.fwmark
    #: programmed in a cluster.
    status_fwmark: int | None = None
    #: The AddressPool the address came from (status.addressPool).
    status_pool: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def address(self) -> IPAddress | None:
        """The virtual address to program: requested, else allocated, else none yet."""
        return self.spec.address or self.status_address


@dataclass(frozen=True, slots=True)
class AddressRange:
    """An inclusive range of addresses of one family (a CIDR is a range too)."""

    first: IPAddress
    last: IPAddress

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1

    def __contains__(self, addr: object) -> bool:
        return (
            isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address)
            and addr.version == self.first.version
            and int(self.first) <= int(addr) <= int(self.last)
        )


@dataclass(frozen=True, slots=True)
class MarkRange:
    """An inclusive range of firewall marks."""

    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, mark: object) -> bool:
        return isinstance(mark, int) and self.first <= mark <= self.last


@dataclass(frozen=True, slots=True)
class Layer2:
    """Where a pool's addresses are announced on the local network (ARP, NDP)."""

    #: Nodes that may announce (the VirtualServer's own nodeSelector applies too).
    node_selector: LabelSelector = field(default_factory=LabelSelector)
    #: Interface names or * patterns; empty: the interfaces whose subnet holds the address.
    interfaces: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BGPAdvertisement:
    """How a pool's addresses are announced over BGP (AddressPool ``spec.bgp``)."""

    #: Nodes that announce (the VirtualServer's own nodeSelector applies too).
    node_selector: LabelSelector = field(default_factory=LabelSelector)
    #: BGPPeer names to announce to; empty: every peer of the node.
    peers: tuple[str, ...] = ()
    #: Communities as ExaBGP and routers write them (``64512:100``, ``no-export``).
    communities: tuple[str, ...] = ()
    local_preference: int | None = None


@dataclass(frozen=True, slots=True)
class SecretKeyRef:
    name: str
    key: str = "password"


@dataclass(frozen=True, slots=True)
class BGPPeer:
    """A router the agents open BGP sessions with."""

    name: str
    address: IPAddress
    asn: int
    local_asn: int
    port: int = 179
    hold_time: int = 90
    source_address: IPAddress | None = None
    password_secret: SecretKeyRef | None = None
    #: Nodes that peer with this router.
    node_selector: LabelSelector = field(default_factory=LabelSelector)
    generation: int = 0


@dataclass(frozen=True, slots=True)
class AddressPool:
    name: str
    ranges: tuple[AddressRange, ...]
    auto_assign: bool = True
    namespaces: frozenset[str] = frozenset()
    namespace_selector: LabelSelector | None = None
    generation: int = 0
    #: Firewall marks granted to VirtualServers (spec.fwmark) of the admitted namespaces.
    firewall_marks: tuple[MarkRange, ...] = ()
    #: Announce the addresses on layer 2 (None: not announced by the agents on layer 2).
    layer2: Layer2 | None = None
    #: Announce the addresses over BGP (None: not announced over BGP).
    bgp: BGPAdvertisement | None = None

    def grants(self, mark: int) -> bool:
        """Whether the pool lists ``mark`` among its firewall marks."""
        return any(mark in r for r in self.firewall_marks)

    def admits(self, namespace: str, labels: Mapping[str, str]) -> bool:
        """Whether objects in this namespace may take addresses from the pool."""
        if not self.namespaces and self.namespace_selector is None:
            return True
        if namespace in self.namespaces:
            return True
        return self.namespace_selector is not None and self.namespace_selector.matches(labels)

    def __contains__(self, addr: object) -> bool:
        return any(addr in r for r in self.ranges)
