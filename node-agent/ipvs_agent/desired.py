"""Desired kernel state: VirtualServers and endpoints in, one node's IPVS table out.

Pure functions only. A VirtualServer that cannot be programmed on this node becomes an
:class:`Outcome` that says why, and never disturbs the others: each object is translated on
its own, and even an unexpected exception is caught per object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from ipvs_agent import model
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


@dataclass(frozen=True)
class Outcome:
    """What became of one VirtualServer on this node."""

    state: State
    reason: str = ""
    message: str = ""
    roles: frozenset[Role] = frozenset()
    generation: int = 0
    real_servers: int = 0
    draining_real_servers: int = 0


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


class Unprogrammable(Exception):
    """A VirtualServer this node cannot program; carries the condition reason."""

    def __init__(self, state: State, reason: str, message: str) -> None:
        super().__init__(message)
        self.state = state
        self.reason = reason
        self.message = message


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


def _dest(
    vs: VirtualServer,
    key: ServiceKey,
    address: IPAddress,
    port: int,
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
        key=DestKey(str(address), port),
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


def _static_dests(
    vs: VirtualServer, key: ServiceKey, port: ServicePort | None
) -> dict[DestKey, Dest]:
    dests: dict[DestKey, Dest] = {}
    for rs in vs.spec.backends.static:
        if not _family_ok(vs, key, rs.address):
            continue
        if rs.port is not None:
            rport = rs.port
        elif port is None:
            rport = 0  # firewall-mark service: keep the packet's port
        elif isinstance(port.target_port, int):
            rport = port.target_port
        else:
            rport = port.port
        weight = vs.spec.backends.default_weight if rs.weight is None else rs.weight
        d = _dest(vs, key, rs.address, rport, weight, rs.upper_threshold, rs.lower_threshold)
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
) -> dict[DestKey, Dest]:
    dests: dict[DestKey, Dest] = {}
    local_only = vs.spec.traffic_policy is TrafficPolicy.LOCAL
    for ep in endpoints:
        if not (ep.ready or ep.draining):
            continue
        if local_only and ep.node_name != node.name:
            continue
        if not _family_ok(vs, key, ep.address):
            continue
        rport = _endpoint_port(port, ep)
        if rport is None:
            continue  # this slice has no port of that name
        weight = vs.spec.backends.default_weight if ep.ready else 0
        d = _dest(vs, key, ep.address, rport, weight)
        old = dests.get(d.key)
        if old is None or (old.weight == 0 and weight > 0):
            dests[d.key] = d  # the same address in two slices: the ready one wins
    return dests


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
    fwd = vs.spec.forwarding
    tun = fwd.method is ForwardingMethod.TUN
    if tun and kernel.tunnel_types and str(fwd.tunnel.type) not in kernel.tunnel_types:
        raise Unprogrammable(
            State.UNSUPPORTED,
            "Unsupported",
            f"tunnel type {fwd.tunnel.type} is not available in kernel {kernel.release or '?'}",
        )


def virtual_services(
    vs: VirtualServer, endpoints: EndpointIndex, node: Node
) -> list[DesiredService]:
    """The kernel services (one per port, or one firewall-mark service) of one VirtualServer.

    Raises :class:`Unprogrammable` when this node cannot or need not program it yet.
    """
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
    out: list[DesiredService] = []
    for key, port in ports:
        if spec.backends.service is not None:
            dests = _service_dests(vs, key, port, backends, node)
        else:
            dests = _static_dests(vs, key, port)
        out.append(DesiredService(service_template(vs, key), dests))
    return out


def _sort_key(vs: VirtualServer) -> tuple[str, str, str]:
    return (vs.created or "~", vs.namespace, vs.name)


def plan(virtual_servers: Iterable[VirtualServer], endpoints: EndpointIndex, node: Node) -> Plan:
    """The whole desired table of ``node``; the earliest VirtualServer wins a conflict."""
    table: dict[ServiceKey, DesiredService] = {}
    owners: dict[ServiceKey, str] = {}
    drain: dict[ServiceKey, int] = {}
    outcomes: dict[str, Outcome] = {}
    addresses: set[IPAddress] = set()
    masquerade: set[ServiceKey] = set()
    for vs in sorted(virtual_servers, key=_sort_key):
        if not vs.spec.node_selector.matches(node.labels):
            continue
        roles = frozenset({Role.DIRECTOR})
        try:
            services = virtual_services(vs, endpoints, node)
        except Unprogrammable as e:
            outcomes[vs.key] = Outcome(e.state, e.reason, e.message, roles, vs.generation)
            continue
        except Exception as e:  # a planner bug must cost one object, not the node
            outcomes[vs.key] = Outcome(
                State.FAILED, "InternalError", f"{type(e).__name__}: {e}", roles, vs.generation
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
        weights = [d.weight for s in services for d in s.dests.values()]
        outcomes[vs.key] = Outcome(
            State.PROGRAMMED,
            "",
            "",
            roles,
            vs.generation,
            real_servers=sum(1 for w in weights if w > 0),
            draining_real_servers=sum(1 for w in weights if w == 0),
        )
    return Plan(table, owners, drain, outcomes, frozenset(addresses), frozenset(masquerade))
