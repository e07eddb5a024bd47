"""Desired kernel state: VirtualServers and endpoints in, one node's IPVS table out.

Pure functions only. A VirtualServer that cannot be programmed on this node becomes an
:class:`Outcome` that says why, and never disturbs the others: each object is translated on
its own, and even an unexpected exception is caught per object.

Besides the director's table, the plan holds the node's part as a real server of DR and TUN
services (:attr:`Plan.real_servers`): which network namespaces on this node — the node's own,
or a pod's — must hold which VIPs and decapsulate which tunnels. Facts only the kernel knows
(whether a DR real server is on the director's L2 segment) come in as :class:`Route` values
that the shell looked up.
"""

from __future__ import annotations

import ipaddress
import operator
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from ipvs_agent import model
from ipvs_agent.health.verdict import Adjustment, Adjustments, RealServerHealth, RealServerKey
from ipvs_agent.host.realserver import Decap, RealServerSpec
from ipvs_agent.host.sysctl import Needs
from ipvs_agent.model import (
    AddressFamily,
    DesiredService,
    DesiredTable,
    Dest,
    DestKey,
    KernelInfo,
    Service,
    ServiceFlag,
    ServiceKey,
)
from ipvs_api.endpoints import Endpoint
from ipvs_api.rules import is_global_unicast
from ipvs_api.types import (
    ForwardingMethod,
    IPAddress,
    IPFamily,
    Protocol,
    SchedulerFlag,
    ServicePort,
    TrafficPolicy,
    TunnelChecksum,
    TunnelType,
    VirtualServer,
)

#: Endpoints by (namespace, Service name).
EndpointIndex = Mapping[tuple[str, str], Sequence[Endpoint]]


class State(StrEnum):
    """Per-node state of one VirtualServer, as reported in IPVSNode status."""

    PROGRAMMED = "Programmed"
    PENDING = "Pending"
    FAILED = "Failed"
    UNSUPPORTED = "Unsupported"


class Role(StrEnum):
    DIRECTOR = "Director"
    REAL_SERVER = "RealServer"


@dataclass(frozen=True)
class Node:
    """What the planner needs to know about the node it plans for."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    kernel: KernelInfo | None = None
    #: The node's own addresses (the Node's ``status.addresses``): a static real server or an
    #: endpoint at one of them is served by the node's own network namespace (host network).
    addresses: frozenset[IPAddress] = frozenset()
    #: Ports of the node's own services (kubelet, API server, etcd, sshd, the agent's metrics)
    #: that no VIP may forward to at one of the node's addresses (see :data:`PROTECTED_PORTS`).
    protected_ports: frozenset[int] = frozenset()
    #: The node is one of several active directors of its VIPs (it announces them over BGP,
    #: routers spread flows with ECMP): a flow may arrive here mid-stream from another director.
    active_active: bool = False
    #: The node runs the IPVS connection sync daemons (master and backup).
    connection_sync: bool = False


@dataclass(frozen=True)
class Route:
    """How the director reaches one real server, from the kernel's route lookup.

    ``on_link``: the address is on a directly connected segment (no gateway) or local, so a
    DR packet (only the MAC address rewritten) can reach it. ``detail`` says what the lookup
    found, for the condition message ("via 192.0.2.254 dev eth0", "no route: ...").
    """

    on_link: bool
    detail: str = ""


@dataclass(frozen=True)
class RealServerNetns:
    """Where a real server of this node lives: the node's own netns, or the pod with this IP."""

    pod_ip: IPAddress | None = None

    def __str__(self) -> str:
        return "node" if self.pod_ip is None else f"pod {self.pod_ip}"


#: The node's own network namespace (host-network endpoints, static real servers).
NODE_NETNS = RealServerNetns()


def _netns_order(target: RealServerNetns) -> tuple[int, int, int]:
    ip = target.pod_ip
    return (0, 0, 0) if ip is None else (1, ip.version, int(ip))


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one VirtualServer on this node."""

    state: State
    reason: str = ""
    message: str = ""
    roles: frozenset[Role] = frozenset()
    generation: int = 0
    real_servers: int = 0
    draining_real_servers: int = 0
    #: Real servers that health checks or feedback agents took out (weight 0 or removed).
    down_real_servers: int = 0
    #: The real servers that need attention (down, drained, feedback agent silent).
    health: tuple[RealServerHealth, ...] = ()


@dataclass(frozen=True)
class Plan:
    """The node's desired IPVS table and the bookkeeping the reconciler needs around it."""

    table: DesiredTable
    #: VirtualServer key ("namespace/name") that owns each kernel service.
    owners: Mapping[ServiceKey, str]
    #: Seconds a removed real server of each service may drain (0: remove at once).
    drain_seconds: Mapping[ServiceKey, int]
    outcomes: Mapping[str, Outcome]
    #: Virtual addresses that must be local to this node (held on the agent's interface).
    addresses: frozenset[IPAddress]
    #: Services whose traffic to real servers is masqueraded (NAT with traffic policy Cluster).
    masquerade: frozenset[ServiceKey] = frozenset()
    #: This node as a real server of DR and TUN services: the setup of each network namespace
    #: (the node's own, or a pod's) that holds one of their real servers.
    real_servers: Mapping[RealServerNetns, RealServerSpec] = field(default_factory=dict)
    #: The VirtualServers (keys) each of those namespaces serves, to attribute a failure.
    real_server_owners: Mapping[RealServerNetns, frozenset[str]] = field(default_factory=dict)
    #: VirtualServers the planner failed on (a bug, reported as InternalError), or that wait
    #: for the node (``Unprogrammable.keep``): what this node programmed for them stays as it
    #: was (see :func:`ipvs_agent.reconciler.reconcile`).
    broken: frozenset[str] = frozenset()
    #: Each VirtualServer's share of :attr:`real_servers`, for the next pass's ``previous``.
    real_server_parts: Mapping[str, Mapping[RealServerNetns, RealServerSpec]] = field(
        default_factory=dict
    )
    #: False when a broken VirtualServer's real-server part is unknown (no earlier pass): the
    #: real-server side must then change nothing it cannot account for.
    real_servers_complete: bool = True
    #: Real servers a failed health check removes (``onFailure: Remove``): deleted at once,
    #: not drained.
    remove_now: frozenset[tuple[ServiceKey, DestKey]] = frozenset()
    #: The DR real servers of the planned services, whose routes decide what is on-link.
    dr_real_servers: frozenset[IPAddress] = frozenset()

    def real_server_targets(self) -> list[RealServerNetns]:
        """The namespaces of :attr:`real_servers`, the node's own first, then pods by IP."""
        return sorted(self.real_servers, key=_netns_order)


#: Outcome reason of a VirtualServer whose DR real servers (some or all) are off-link.
NOT_ON_LINK = "RealServerNotOnLink"
#: Outcome reason of a DR/TUN VirtualServer whose endpoints listen on another port.
PORT_REMAP = "PortRemapNotPossible"
#: Outcome reason of a VirtualServer with a static real server at a protected port of the node.
PROTECTED = "RealServerRefused"
#: Outcome reason of a VirtualServer the planner failed on (a bug): left as it was.
INTERNAL_ERROR = "InternalError"

#: Default protected ports: sshd, etcd, kube-apiserver, the agent's metrics, kube-proxy's
#: metrics and health, the kubelet (and its read-only port), kube-controller-manager and
#: kube-scheduler. A VIP reachable from outside must not lead to them on a director.
PROTECTED_PORTS = frozenset({22, 2379, 2380, 6443, 9753, 10249, 10250, 10255, 10256, 10257, 10259})


class Unprogrammable(Exception):
    """A VirtualServer this node cannot program; carries the condition reason."""

    def __init__(self, state: State, reason: str, message: str, keep: bool = False) -> None:
        super().__init__(message)
        self.state = state
        self.reason = reason
        self.message = message
        #: Leave what this node programmed for it as it is (as for a planner bug), rather than
        #: take it down: the node will program it once it can (a module to be loaded).
        self.keep = keep


_PROTOCOL = {
    Protocol.TCP: model.Protocol.TCP,
    Protocol.UDP: model.Protocol.UDP,
    Protocol.SCTP: model.Protocol.SCTP,
}
_METHOD = {
    ForwardingMethod.NAT: model.ForwardingMethod.MASQ,
    ForwardingMethod.DR: model.ForwardingMethod.ROUTE,
    ForwardingMethod.TUN: model.ForwardingMethod.TUNNEL,
}
_TUNNEL = {
    TunnelType.IPIP: model.TunnelType.IPIP,
    TunnelType.GUE: model.TunnelType.GUE,
    TunnelType.GRE: model.TunnelType.GRE,
}
_CHECKSUM = {
    TunnelChecksum.NOCSUM: model.TunnelFlags.NOCSUM,
    TunnelChecksum.CSUM: model.TunnelFlags.CSUM,
    TunnelChecksum.REMCSUM: model.TunnelFlags.REMCSUM,
}
_SCHED_FLAG = {
    SchedulerFlag.SH_FALLBACK: ServiceFlag.SCHED1,
    SchedulerFlag.MH_FALLBACK: ServiceFlag.SCHED1,
    SchedulerFlag.SH_PORT: ServiceFlag.SCHED2,
    SchedulerFlag.MH_PORT: ServiceFlag.SCHED2,
}


def ipv4_netmask(prefix: int) -> int:
    """The 32-bit netmask of an IPv4 prefix length (24 → 0xffffff00)."""
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF


def service_template(vs: VirtualServer, key: ServiceKey) -> Service:
    """The kernel service attributes a VirtualServer asks for."""
    spec = vs.spec
    flags = 0
    for f in spec.scheduler_flags:
        flags |= _SCHED_FLAG[f]
    if spec.one_packet_scheduling:
        flags |= ServiceFlag.ONEPACKET
    v4 = key.af is AddressFamily.INET
    timeout, netmask, pe = 0, (0xFFFFFFFF if v4 else 128), ""
    if spec.persistence is not None:
        flags |= ServiceFlag.PERSISTENT
        timeout = spec.persistence.timeout_seconds
        netmask = (
            ipv4_netmask(spec.persistence.ipv4_prefix_length)
            if v4
            else spec.persistence.ipv6_prefix_length
        )
        pe = spec.persistence.engine or ""
    return Service(key, str(spec.scheduler), flags, timeout, netmask, pe)


def _dest_key(address: IPAddress, port: int) -> DestKey:
    """The key of a real server. Its address text is interned: a Service's ports, and the
    VirtualServers that share its endpoints, hold one string per address (the kernel
    layer interns what it reads too)."""
    return DestKey(sys.intern(model.address_text(address)), port)


def _dest(
    vs: VirtualServer,
    key: ServiceKey,
    address: IPAddress,
    dkey: DestKey,
    weight: int,
    upper: int = 0,
    lower: int | None = None,
) -> Dest:
    fwd = vs.spec.forwarding
    af = AddressFamily.of(address)
    tunnel = fwd.method is ForwardingMethod.TUN
    if upper and lower is None:
        lower = upper * 3 // 4
    return Dest(
        key=dkey,
        forwarding=_METHOD[fwd.method],
        weight=weight,
        upper_threshold=upper,
        lower_threshold=lower or 0,
        tunnel_type=_TUNNEL[fwd.tunnel.type] if tunnel else model.TunnelType.IPIP,
        tunnel_port=(fwd.tunnel.port or 0) if tunnel else 0,
        tunnel_flags=_CHECKSUM[fwd.tunnel.checksum] if tunnel else model.TunnelFlags.NOCSUM,
        af=af if af is not key.af else None,
    )


def _family_ok(vs: VirtualServer, key: ServiceKey, address: IPAddress) -> bool:
    return vs.spec.forwarding.method is ForwardingMethod.TUN or AddressFamily.of(address) is key.af


@dataclass
class _Health:
    """Health and feedback adjustments of one VirtualServer, and what they did to its table."""

    mine: Mapping[RealServerKey, Adjustment] = field(default_factory=dict)
    #: Dests held at weight 0 by health (not draining), and dests removed by it.
    held: set[tuple[ServiceKey, DestKey]] = field(default_factory=set)
    removed: set[tuple[ServiceKey, DestKey]] = field(default_factory=set)

    def weigh(
        self, key: ServiceKey, dkey: DestKey, rs: RealServerKey, weight: int
    ) -> tuple[int | None, Adjustment | None]:
        """The weight health and feedback give a real server configured ``weight`` (None:
        removed from the table)."""
        adjust = self.mine.get(rs)
        if adjust is None or weight == 0:
            return weight, None
        if adjust.down and adjust.remove:
            self.removed.add((key, dkey))
            return None, adjust
        if adjust.down:
            self.held.add((key, dkey))
            return 0, adjust
        return (weight if adjust.weight is None else adjust.weight), adjust


def _upper(adjust: Adjustment | None, upper: int, lower: int | None) -> tuple[int, int | None]:
    """The thresholds with a feedback agent's maxconn in force (its own lower: 3/4)."""
    if adjust is None or adjust.upper_threshold is None:
        return upper, lower
    new = adjust.upper_threshold
    return new, (lower if lower is not None and lower <= new else None)


def _static_dests(
    vs: VirtualServer, key: ServiceKey, port: ServicePort | None, health: _Health | None = None
) -> dict[DestKey, Dest]:
    health = health or _Health()
    dests: dict[DestKey, Dest] = {}
    for rs in vs.spec.backends.static:
        if not _family_ok(vs, key, rs.address) or not real_server_address_ok(rs.address):
            continue
        if rs.port is not None:
            rport = rs.port
        elif port is None:
            rport = 0  # firewall-mark service: keep the packet's port
        elif isinstance(port.target_port, int):
            rport = port.target_port
        else:
            rport = port.port
        configured = vs.spec.backends.default_weight if rs.weight is None else rs.weight
        dkey = _dest_key(rs.address, rport)
        weight, adjust = health.weigh(key, dkey, (dkey.address, rs.port or 0), configured)
        if weight is None:
            continue
        upper, lower = _upper(adjust, rs.upper_threshold, rs.lower_threshold)
        d = _dest(vs, key, rs.address, dkey, weight, upper, lower)
        dests[d.key] = d
    return dests


def _endpoint_port(port: ServicePort | None, ep: Endpoint) -> int | None:
    if port is None:
        return 0
    target = port.target_port
    if target is None:
        return port.port
    if isinstance(target, int):
        return target
    return ep.port_named(target, str(port.protocol))


def _service_dests(
    vs: VirtualServer,
    key: ServiceKey,
    port: ServicePort | None,
    endpoints: Sequence[Endpoint],
    node: Node,
    health: _Health | None = None,
) -> dict[DestKey, Dest]:
    health = health or _Health()
    dests: dict[DestKey, Dest] = {}
    local_only = vs.spec.traffic_policy is TrafficPolicy.LOCAL
    for ep in endpoints:
        if not (ep.ready or ep.draining):
            continue
        if local_only and ep.node_name != node.name:
            continue
        if not real_server_address_ok(ep.address):
            continue  # EndpointSlice validation refuses these too; never forward there
        if not _family_ok(vs, key, ep.address):
            continue
        rport = _endpoint_port(port, ep)
        if rport is None:
            continue  # this slice has no port of that name
        weight: int | None = vs.spec.backends.default_weight if ep.ready else 0
        dkey = _dest_key(ep.address, rport)
        weight, adjust = health.weigh(key, dkey, (dkey.address, 0), weight or 0)
        if weight is None:
            continue
        upper, _ = _upper(adjust, 0, None)
        d = _dest(vs, key, ep.address, dkey, weight, upper)
        old = dests.get(d.key)
        if old is None or (old.weight == 0 and weight > 0):
            dests[d.key] = d  # the same address in two slices: the ready one wins
    return dests


def real_server_address_ok(address: IPAddress) -> bool:
    """A real server must be a unicast address: not loopback, link-local (169.254.0.0/16 holds
    cloud metadata services, fe80::/10), multicast or unspecified — what Kubernetes refuses in
    EndpointSlices and the CRD refuses in static real servers (checked again here for objects
    that never met an API server)."""
    return is_global_unicast(address) and not (
        isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
    )


def _check_kernel(vs: VirtualServer, kernel: KernelInfo | None) -> None:
    if kernel is None:
        return
    sched = str(vs.spec.scheduler)
    if kernel.schedulers and sched not in kernel.schedulers:
        raise Unprogrammable(
            State.UNSUPPORTED,
            "Unsupported",
            f"scheduler {sched} is not available in kernel {kernel.release or '?'} "
            f"(it has {', '.join(kernel.schedulers)})",
        )
    if sched in kernel.unloaded:
        raise Unprogrammable(
            State.UNSUPPORTED,
            "SchedulerNotLoaded",
            f"scheduler {sched}: module ip_vs_{sched} is not loaded on this node, and the "
            "kernel's own load of it on first use can hang the node's network namespaces; "
            f"load it at boot (the chart's agent.modules, or /etc/modules-load.d)",
            keep=True,  # a service changed to it keeps its old scheduler meanwhile
        )
    fwd = vs.spec.forwarding
    tun = fwd.method is ForwardingMethod.TUN
    if tun and kernel.tunnel_types and str(fwd.tunnel.type) not in kernel.tunnel_types:
        raise Unprogrammable(
            State.UNSUPPORTED,
            "Unsupported",
            f"tunnel type {fwd.tunnel.type} is not available in kernel {kernel.release or '?'}",
        )


def _off_link(route: Route | None) -> Route | None:
    """What a route means for a DR real server: the route if it leaves it out, else None."""
    return route if route is not None and not route.on_link else None


def _services(
    vs: VirtualServer,
    endpoints: EndpointIndex,
    node: Node,
    routes: Mapping[IPAddress, Route],
    health: _Health | None = None,
    looked: list[tuple[IPAddress, Route | None]] | None = None,
) -> tuple[list[DesiredService], LeftOut]:
    """The kernel services of one VirtualServer, and the real servers left out: DR ones
    off-link, and DR/TUN endpoints that listen on another port than the service's (DR and TUN
    cannot change the port; CEL refuses that in the spec, but a Service's targetPort is only
    seen in its EndpointSlices).

    ``looked`` collects each DR real server with what its route meant (:func:`_off_link`), so
    that a cached result can tell whether new routes would change it."""
    spec = vs.spec
    _check_kernel(vs, node.kernel)
    ports: list[tuple[ServiceKey, ServicePort | None]]
    if spec.fwmark is not None:
        af = AddressFamily.INET6 if spec.family is IPFamily.IPV6 else AddressFamily.INET
        ports = [(ServiceKey.for_fwmark(af, spec.fwmark), None)]
    else:
        address = vs.address
        if address is None:
            raise Unprogrammable(
                State.PENDING, "AddressPending", "waiting for the operator to allocate an address"
            )
        ports = [
            (ServiceKey.for_address(address, _PROTOCOL[p.protocol], p.port), p) for p in spec.ports
        ]
    backends = endpoints.get((vs.namespace, spec.backends.service or ""), ())
    dr = spec.forwarding.method is ForwardingMethod.DR
    same_port = spec.forwarding.method is not ForwardingMethod.NAT
    out: list[DesiredService] = []
    off_link: dict[IPAddress, Route] = {}
    other_port: dict[IPAddress, tuple[str, tuple[int, ...]]] = {}
    protected: dict[IPAddress, int] = {}
    for key, port in ports:
        if spec.backends.service is not None:
            dests = _service_dests(vs, key, port, backends, node, health)
            if same_port and port is not None:
                for ep in backends:
                    proto = str(port.protocol)
                    listening = tuple(sorted({p.port for p in ep.ports if p.protocol == proto}))
                    dkey = DestKey(str(ep.address), port.port)
                    if listening and port.port not in listening and dkey in dests:
                        del dests[dkey]
                        other_port[ep.address] = (f"{port.port}/{proto}", listening)
        else:
            dests = _static_dests(vs, key, port, health)
            for dkey in list(dests):
                if dkey.port not in node.protected_ports:  # before parsing: most are not
                    continue
                address = _ip(dkey.address)
                if address in node.addresses:
                    protected[address] = dkey.port
                    del dests[dkey]
        if dr and (routes or looked is not None):
            for dkey in list(dests):
                address = _ip(dkey.address)
                route = _off_link(routes.get(address))
                if looked is not None:
                    looked.append((address, route))
                if route is not None:
                    off_link[address] = route
                    del dests[dkey]
        out.append(DesiredService(service_template(vs, key), dests))
    return out, LeftOut(off_link, other_port, protected)


def _ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def virtual_services(
    vs: VirtualServer,
    endpoints: EndpointIndex,
    node: Node,
    routes: Mapping[IPAddress, Route] | None = None,
) -> list[DesiredService]:
    """The kernel services (one per port, or one firewall-mark service) of one VirtualServer.

    Raises :class:`Unprogrammable` when this node cannot or need not program it yet.
    """
    return _services(vs, endpoints, node, routes or {})[0]


@dataclass(frozen=True)
class LeftOut:
    """Real servers a director leaves out of a VirtualServer, and why."""

    #: DR real servers not on the director's segment, with the route found.
    off_link: Mapping[IPAddress, Route] = field(default_factory=dict)
    #: DR/TUN endpoints listening elsewhere: (service port/protocol, the endpoint's ports).
    other_port: Mapping[IPAddress, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    #: Static real servers at one of the node's addresses on a protected port.
    protected: Mapping[IPAddress, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.off_link or self.other_port or self.protected)

    @property
    def reason(self) -> str:
        if self.protected:
            return PROTECTED
        return NOT_ON_LINK if self.off_link else PORT_REMAP if self.other_port else ""

    def message(self, remaining: int) -> str:
        parts = []
        if self.protected:
            parts.append(_protected_message(self.protected, remaining))
        if self.off_link:
            parts.append(_off_link_message(self.off_link, remaining))
        if self.other_port:
            parts.append(_other_port_message(self.other_port, remaining))
        return "; ".join(parts)


def _by_address(addresses: Iterable[IPAddress]) -> list[IPAddress]:
    return sorted(addresses, key=lambda a: (a.version, int(a)))


def _other_port_message(
    other_port: Mapping[IPAddress, tuple[str, tuple[int, ...]]], remaining: int
) -> str:
    shown = ", ".join(
        f"{address} listens on {'/'.join(map(str, other_port[address][1]))} "
        f"for {other_port[address][0]}"
        for address in _by_address(other_port)
    )
    left = "left out" if remaining else "no real server remains"
    return (
        f"DR and TUN cannot change the port, and the Service's endpoints listen on another: "
        f"{shown}; {left} (make the Service's targetPort equal the port, or use NAT)"
    )


def _protected_message(protected: Mapping[IPAddress, int], remaining: int) -> str:
    shown = ", ".join(f"{address}:{protected[address]}" for address in _by_address(protected))
    left = "left out" if remaining else "no real server remains"
    return (
        f"a virtual service may not forward to the node's own protected ports (kubelet, API "
        f"server, etcd, sshd, ...): {shown} is this node; {left} (the agent's --protected-ports)"
    )


def _off_link_message(off_link: Mapping[IPAddress, Route], remaining: int) -> str:
    shown = ", ".join(
        f"{address} ({off_link[address].detail or 'behind a gateway'})"
        for address in sorted(off_link, key=lambda a: (a.version, int(a)))
    )
    left = "left out" if remaining else "no real server remains"
    return (
        f"DR reaches only real servers on the director's own L2 segment; not on-link from this "
        f"director: {shown}; {left} (use TUN or NAT for real servers behind a router, such as "
        "pods on other nodes)"
    )


def dr_destinations(p: Plan) -> frozenset[IPAddress]:
    """The real servers the plan sends DR traffic to: the addresses whose route to look up
    (and, once routes are known, also those left out for being off-link)."""
    return p.dr_real_servers


def real_server_part(
    vs: VirtualServer, endpoints: EndpointIndex, node: Node
) -> dict[RealServerNetns, RealServerSpec]:
    """What this node must set up to be a real server of ``vs``, per network namespace.

    DR and TUN real servers here are the static real servers at one of the node's addresses and
    the endpoints on this node (``nodeName``): host network when the endpoint's address is the
    node's, else a pod, found later by its IP. Each gets the VIP, and with TUN a decapsulation
    device bound to the address the director tunnels to. A firewall-mark service has no VIP to
    give: with TUN its real servers still decapsulate. NAT real servers need nothing.
    """
    spec = vs.spec
    method = spec.forwarding.method
    if method is ForwardingMethod.NAT:
        return {}
    vip = vs.address if spec.fwmark is None else None
    if spec.fwmark is None and vip is None:
        return {}  # no address yet: nothing to hold
    vip_family = vip.version if vip is not None else (6 if spec.family is IPFamily.IPV6 else 4)
    mine: set[tuple[RealServerNetns, IPAddress]] = set()
    if spec.backends.service is not None:
        for ep in endpoints.get((vs.namespace, spec.backends.service), ()):
            if ep.node_name != node.name or (ep.terminating and not ep.serving):
                continue  # another node's, or a pod on its way out that serves nothing
            target = NODE_NETNS if ep.address in node.addresses else RealServerNetns(ep.address)
            mine.add((target, ep.address))
    else:
        for rs in spec.backends.static:
            if rs.address in node.addresses:
                mine.add((NODE_NETNS, rs.address))
    tunnel = spec.forwarding.tunnel
    parts: dict[RealServerNetns, RealServerSpec] = {}
    for target, address in mine:
        if method is ForwardingMethod.DR and address.version != vip_family:
            continue  # the director never sends DR across families
        decap: frozenset[Decap] = frozenset()
        if method is ForwardingMethod.TUN:
            port = (tunnel.port or 0) if tunnel.type is TunnelType.GUE else 0
            decap = frozenset({Decap(_TUNNEL[tunnel.type], address, port)})
        vips = frozenset({vip}) if vip is not None else frozenset()
        parts[target] = merge_specs(parts.get(target), RealServerSpec(vips, decap))
    return parts


def merge_specs(a: RealServerSpec | None, b: RealServerSpec) -> RealServerSpec:
    if a is None:
        return b
    return RealServerSpec(a.vips | b.vips, a.decap | b.decap)


def _sort_key(vs: VirtualServer) -> tuple[str, str, str]:
    return (vs.created or "~", vs.namespace, vs.name)


def _internal_error(vs: VirtualServer, error: Exception, roles: frozenset[Role]) -> Outcome:
    return Outcome(
        State.FAILED,
        INTERNAL_ERROR,
        f"the agent failed to plan this VirtualServer ({type(error).__name__}: {error}); what "
        "this node programmed for it stays as it was",
        roles,
        vs.generation,
    )


@dataclass(frozen=True, slots=True)
class _Planned:
    """One VirtualServer's share of a plan, and the inputs it was made from."""

    vs: VirtualServer
    backends: Sequence[Endpoint]
    health: Mapping[RealServerKey, Adjustment]
    part: Mapping[RealServerNetns, RealServerSpec]
    #: As a director: its services (None: not planned as one), or why it cannot be programmed
    #: here (state, reason, message).
    services: tuple[DesiredService, ...] | None = None
    unprogrammable: tuple[State, str, str] | None = None
    left_out: LeftOut | None = None
    held: frozenset[tuple[ServiceKey, DestKey]] = frozenset()
    removed: frozenset[tuple[ServiceKey, DestKey]] = frozenset()
    #: Each DR real server with what its route meant (:func:`_off_link`).
    looked: tuple[tuple[IPAddress, Route | None], ...] = ()

    def made_from(
        self,
        vs: VirtualServer,
        backends: Sequence[Endpoint],
        health: Mapping[RealServerKey, Adjustment],
    ) -> bool:
        return (
            (self.vs is vs or self.vs == vs)
            and (self.backends is backends or self.backends == backends)
            and self.health == health
        )

    def routed_as(self, routes: Mapping[IPAddress, Route]) -> bool:
        """Whether ``routes`` leave out exactly the DR real servers they left out before."""
        return all(_off_link(routes.get(address)) == was for address, was in self.looked)


class _PlanInputs(NamedTuple):
    """What a whole :func:`plan` is a function of (``previous`` aside: see
    :meth:`PlanMemo.last_plan`)."""

    virtual_servers: tuple[VirtualServer, ...]
    endpoints: EndpointIndex
    node: Node
    routes: Mapping[IPAddress, Route]
    adjustments: Adjustments


class PlanMemo:
    """Each VirtualServer's planned share, from one :func:`plan` to the next.

    A resync mostly plans what it planned before, and building every VirtualServer's services
    again (address parsing and formatting per real server) was most of a pass. A VirtualServer
    whose inputs are the same — the same validated object (the mirror's reading,
    :class:`~ipvs_agent.snapshot.ReadVirtualServer`, kept across status writes; or
    :class:`~ipvs_agent.snapshot.ReadCache`'s), endpoints, health verdicts and DR routes — gets
    its last services back. Another node (labels, addresses, kernel) starts afresh, and only
    the last plan's entries are kept, so the memo never outgrows the cluster's objects.
    What :func:`plan` builds around the services (ownership, conflicts, outcomes) is done anew
    on every pass: it depends on the other VirtualServers.
    """

    def __init__(self) -> None:
        self._node: Node | None = None
        self._entries: dict[str, _Planned] = {}
        #: The last whole plan and its inputs (see :meth:`last_plan`).
        self._whole: tuple[_PlanInputs, Plan] | None = None
        #: VirtualServers served from the memo, and planned anew, by the last plan.
        self.hits = 0
        self.misses = 0

    def last_plan(self, inputs: _PlanInputs) -> Plan | None:
        """The last plan itself when it was made from these very inputs: the same validated
        objects in the same order (by identity, as the mirror's readings and
        :class:`~ipvs_agent.snapshot.ReadCache` hand them back), equal endpoints, node, routes
        and health verdicts. Then every VirtualServer would be a hit and :func:`plan`'s
        bookkeeping around them (ownership, conflicts, outcomes) would come out the same, so
        a resync of an unchanged cluster plans nothing at all (and every VirtualServer counts
        as a hit). A plan with a broken VirtualServer is never kept: it also depends on
        ``previous``."""
        if self._whole is None:
            return None
        was, result = self._whole
        same = (
            len(was.virtual_servers) == len(inputs.virtual_servers)
            and all(map(operator.is_, was.virtual_servers, inputs.virtual_servers))
            and (was.node is inputs.node or was.node == inputs.node)
            and was.endpoints == inputs.endpoints
            and was.routes == inputs.routes
            and was.adjustments == inputs.adjustments
        )
        if not same:
            return None
        self.hits, self.misses = len(self._entries), 0
        return result

    def find(
        self,
        node: Node,
        vs: VirtualServer,
        backends: Sequence[Endpoint],
        health: Mapping[RealServerKey, Adjustment],
    ) -> _Planned | None:
        if self._node is not node and self._node != node:
            return None
        found = self._entries.get(vs.key)
        return found if found is not None and found.made_from(vs, backends, health) else None

    def replace(
        self, node: Node, entries: dict[str, _Planned], whole: tuple[_PlanInputs, Plan] | None
    ) -> None:
        self._node, self._entries, self._whole = node, entries, whole

    def merge(self, other: PlanMemo) -> None:
        """Take ``other``'s entries (a plan of a few VirtualServers, for the same node) over
        this memo's: what a change pass planned is what the next full pass finds."""
        if other._node is not None and (self._node is other._node or self._node == other._node):
            self._entries.update(other._entries)
            self._whole = None


def services_used(
    virtual_servers: Iterable[VirtualServer], node: Node
) -> frozenset[tuple[str, str]]:
    """The (namespace, Service) whose endpoints a pass on ``node`` reads: the backends of every
    VirtualServer it directs (``nodeSelector``), and of every DR or TUN one whatever its
    selector, since an endpoint landing on this node makes the node one of its real servers
    (:func:`real_server_part`). A change to any other Service's endpoints cannot change the
    plan, the health targets or the announcements, so it need not wake a pass."""
    return frozenset(
        (vs.namespace, vs.spec.backends.service)
        for vs in virtual_servers
        if vs.spec.backends.service is not None
        and (
            vs.spec.forwarding.method is not ForwardingMethod.NAT
            or vs.spec.node_selector.matches(node.labels)
        )
    )


def _backends(vs: VirtualServer, endpoints: EndpointIndex) -> Sequence[Endpoint]:
    service = vs.spec.backends.service
    return () if service is None else endpoints.get((vs.namespace, service), ())


def plan(
    virtual_servers: Iterable[VirtualServer],
    endpoints: EndpointIndex,
    node: Node,
    routes: Mapping[IPAddress, Route] | None = None,
    previous: Mapping[str, Mapping[RealServerNetns, RealServerSpec]] | None = None,
    adjustments: Adjustments | None = None,
    memo: PlanMemo | None = None,
) -> Plan:
    """The whole desired table of ``node``; the earliest VirtualServer wins a conflict.

    ``routes``: the director's route to DR real servers (see :func:`dr_destinations`); a DR
    real server known not to be on-link is left out with the reason ``RealServerNotOnLink``,
    and a VirtualServer left with none fails. Addresses without an entry are assumed on-link.

    A planner bug (an unexpected exception) costs one object, never the node, and never undoes
    what already works: the VirtualServer is ``broken`` (Failed, InternalError), its real-server
    part is the one of the last pass (``previous``, :attr:`Plan.real_server_parts`), and the
    reconciler leaves its kernel entries as they are.

    ``adjustments``: what health checks and feedback decided per real server (weight 0 for a
    failed one, removal, a feedback weight or upper threshold); real servers without one keep
    their configured weight.

    ``memo``: each VirtualServer's share of the last plan (:class:`PlanMemo`), reused where
    its inputs are unchanged; the result is the same as without it.
    """
    routes = routes or {}
    virtual_servers = tuple(virtual_servers)
    inputs = _PlanInputs(virtual_servers, endpoints, node, routes, adjustments or {})
    if memo is not None:
        same = memo.last_plan(inputs)
        if same is not None:
            return same
    entries: dict[str, _Planned] = {}
    hits = 0
    dr_real_servers: set[IPAddress] = set()
    table: dict[ServiceKey, DesiredService] = {}
    remove_now: set[tuple[ServiceKey, DestKey]] = set()
    owners: dict[ServiceKey, str] = {}
    drain: dict[ServiceKey, int] = {}
    outcomes: dict[str, Outcome] = {}
    addresses: set[IPAddress] = set()
    masquerade: set[ServiceKey] = set()
    real_servers: dict[RealServerNetns, RealServerSpec] = {}
    rs_owners: dict[RealServerNetns, set[str]] = {}
    parts: dict[str, Mapping[RealServerNetns, RealServerSpec]] = {}
    broken: dict[str, Exception] = {}
    complete = True
    for vs in sorted(virtual_servers, key=_sort_key):
        backends = _backends(vs, endpoints)
        mine = (adjustments or {}).get(vs.key, {})
        known = memo.find(node, vs, backends, mine) if memo is not None else None
        part: Mapping[RealServerNetns, RealServerSpec]
        if known is not None:
            part = known.part
        else:
            try:
                part = real_server_part(vs, endpoints, node)
            except Exception as e:  # keep what the last pass set up for it, if it is known
                broken[vs.key] = e
                last = (previous or {}).get(vs.key)
                complete = complete and last is not None
                part = last or {}
        parts[vs.key] = part
        for target, rs_spec in part.items():
            real_servers[target] = merge_specs(real_servers.get(target), rs_spec)
            rs_owners.setdefault(target, set()).add(vs.key)
        rs_role = frozenset({Role.REAL_SERVER}) if part else frozenset()
        if not vs.spec.node_selector.matches(node.labels):
            if vs.key in broken:
                outcomes[vs.key] = _internal_error(vs, broken[vs.key], rs_role)
            elif part:
                outcomes[vs.key] = Outcome(
                    State.PROGRAMMED, roles=rs_role, generation=vs.generation
                )
            if vs.key not in broken:
                hits += known is not None
                entries[vs.key] = known or _Planned(vs, backends, mine, part)
            continue
        roles = frozenset({Role.DIRECTOR}) | rs_role
        if known is not None and known.services is None and known.unprogrammable is None:
            known = None  # planned before as a real server only
        reused = known is not None and known.routed_as(routes)
        if known is None or not reused:
            health = _Health(mine)
            looked: list[tuple[IPAddress, Route | None]] = []
            try:
                services_, left_out_ = _services(vs, endpoints, node, routes, health, looked)
                known = _Planned(
                    vs,
                    backends,
                    mine,
                    part,
                    tuple(services_),
                    None,
                    left_out_,
                    frozenset(health.held),
                    frozenset(health.removed),
                    tuple(looked),
                )
            except Unprogrammable as e:
                known = _Planned(vs, backends, mine, part, None, (e.state, e.reason, e.message))
                if e.keep:
                    broken[vs.key] = e
            except Exception as e:  # a planner bug must cost one object, not the node
                broken[vs.key] = e
                outcomes[vs.key] = _internal_error(vs, e, roles)
                continue
        if known.unprogrammable is not None:
            outcomes[vs.key] = Outcome(*known.unprogrammable, roles, vs.generation)
        if vs.key in broken:  # its real-server part: known.part is not what the memo may keep
            if known.unprogrammable is None:
                outcomes[vs.key] = _internal_error(vs, broken[vs.key], roles)
            continue
        entries[vs.key] = known
        hits += reused
        if known.unprogrammable is not None:
            continue
        services, left_out = known.services or (), known.left_out or LeftOut()
        weights = [d.weight for s in services for d in s.dests.values()]
        if left_out and not weights:
            outcomes[vs.key] = Outcome(
                State.FAILED,
                left_out.reason,
                left_out.message(0),
                roles,
                vs.generation,
            )
            continue
        taken = [s.service.key for s in services if s.service.key in owners]
        if taken:
            other = owners[taken[0]]
            outcomes[vs.key] = Outcome(
                State.FAILED,
                "AddressConflict",
                f"{taken[0]} is already served by VirtualServer {other}",
                roles,
                vs.generation,
            )
            continue
        dr_real_servers.update(address for address, _ in known.looked)
        for s in services:
            key = s.service.key
            table[key] = s
            owners[key] = vs.key
            drain[key] = 0 if key.protocol == model.Protocol.UDP else vs.spec.drain_timeout_seconds
            if (
                vs.spec.forwarding.method is ForwardingMethod.NAT
                and vs.spec.traffic_policy is TrafficPolicy.CLUSTER
            ):
                masquerade.add(key)
        if vs.address is not None and vs.spec.fwmark is None:
            addresses.add(vs.address)
        remove_now |= known.removed
        outcomes[vs.key] = Outcome(
            State.PROGRAMMED,
            left_out.reason,
            left_out.message(len(weights)),
            roles,
            vs.generation,
            real_servers=sum(1 for w in weights if w > 0),
            draining_real_servers=sum(1 for w in weights if w == 0) - len(known.held),
            down_real_servers=sum(1 for a in mine.values() if a.down),
            health=_attention(mine),
        )
    result = Plan(
        table,
        owners,
        drain,
        outcomes,
        frozenset(addresses),
        frozenset(masquerade),
        real_servers,
        {target: frozenset(keys) for target, keys in rs_owners.items()},
        frozenset(broken),
        parts,
        complete,
        frozenset(remove_now),
        frozenset(dr_real_servers),
    )
    if memo is not None:
        memo.replace(node, entries, None if broken else (inputs, result))
        memo.hits, memo.misses = hits, len(entries) - hits
    return result


def _attention(mine: Mapping[RealServerKey, Adjustment]) -> tuple[RealServerHealth, ...]:
    """The real servers to name in the node's report, by address."""
    named = [
        RealServerHealth(address, port, a.attention, a.message)
        for (address, port), a in mine.items()
        if a.attention is not None
    ]
    return tuple(sorted(named, key=lambda h: (_ip(h.address).version, int(_ip(h.address)), h.port)))


def node_needs(p: Plan, node: Node | None = None) -> Needs:
    """What the planned services ask of the node's sysctls (:func:`host.sysctl.needed`)."""
    hashing = any(s.service.scheduler in ("sh", "mh") for s in p.table.values())
    nat = [
        key
        for key, s in p.table.items()
        if any(d.forwarding is model.ForwardingMethod.MASQ for d in s.dests.values())
    ]
    return Needs(
        services=bool(p.table),
        nat4=any(k.af is AddressFamily.INET for k in nat),
        nat6=any(k.af is AddressFamily.INET6 for k in nat),
        masquerade=bool(p.masquerade),
        persistence=any(s.service.flags & ServiceFlag.PERSISTENT for s in p.table.values()),
        consistent_hashing=bool(p.table) and hashing and node is not None and node.active_active,
        connection_sync=node is not None and node.connection_sync,
    )
