"""What this director checks and polls, for which VirtualServers. Pure.

From the same snapshot the planner gets: every static real server of a VirtualServer with a
health check, and every real server (static or a ready endpoint) of one with feedback — only
for VirtualServers this node directs, since each director checks from its own node and its
view is what its kernel uses. Identical probes of several VirtualServers (same check, address
and port) are one probe; so are polls of one feedback agent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ipvs_agent.desired import EndpointIndex, Node, real_server_address_ok
from ipvs_agent.health.feedback import Law
from ipvs_agent.health.machine import Thresholds
from ipvs_agent.health.verdict import RealServerKey
from ipvs_api.types import (
    HealthCheck,
    IPAddress,
    OnFailure,
    StaticRealServer,
    TrafficPolicy,
    VirtualServer,
)

#: A real server of a VirtualServer: (VirtualServer key, (address, port or 0)).
Ref = tuple[str, RealServerKey]


@dataclass(frozen=True, slots=True)
class Probe:
    """One probe target: a check of one address and port."""

    check: HealthCheck
    address: IPAddress
    port: int
    #: Why it is never sent (a protected port of this node); "" when it is.
    refused: str = ""

    @property
    def thresholds(self) -> Thresholds:
        c = self.check
        return Thresholds(c.failure_threshold, c.success_threshold, c.initially_up)


@dataclass(frozen=True, slots=True)
class Poll:
    """One feedback agent to ask every ``period``."""

    address: IPAddress
    port: int
    send: str
    period: float
    timeout: float
    #: Why it is never sent (a protected port of this node); "" when it is.
    refused: str = ""


@dataclass(frozen=True, slots=True)
class FeedTarget:
    """The feedback of one real server of one VirtualServer."""

    poll: Poll
    law: Law
    #: The weight the spec gives it: where the law starts and what an expiry returns to.
    configured: int


@dataclass(frozen=True)
class Targets:
    #: Each probe and the real servers its result decides.
    probes: dict[Probe, frozenset[Ref]] = field(default_factory=dict)
    feeds: dict[Ref, FeedTarget] = field(default_factory=dict)
    #: What a failed real server of each VirtualServer becomes.
    on_failure: dict[str, OnFailure] = field(default_factory=dict)


def _check_port(vs: VirtualServer, rs: StaticRealServer, check: HealthCheck) -> int | None:
    if check.port is not None:
        return check.port
    if rs.port is not None:
        return rs.port
    if not vs.spec.ports:
        return None  # a firewall-mark service: validated to name healthCheck.port
    first = vs.spec.ports[0]
    return first.target_port if isinstance(first.target_port, int) else first.port


def _refused(node: Node, address: IPAddress, port: int) -> str:
    """Why this node never probes ``address:port``: the node's own protected services
    (kubelet, API server, etcd, sshd, the agent's metrics) are no more a health check's or a
    feedback poll's target than a VIP's real server; a check there fails instead."""
    if address in node.addresses and port in node.protected_ports:
        return f"not probed: {port} is a protected port of this node"
    return ""


def _weight(vs: VirtualServer, rs: StaticRealServer) -> int:
    return vs.spec.backends.default_weight if rs.weight is None else rs.weight


def targets(
    virtual_servers: Iterable[VirtualServer], endpoints: EndpointIndex, node: Node
) -> Targets:
    """The probes and feeds of every VirtualServer this node directs."""
    probes: dict[Probe, set[Ref]] = {}
    feeds: dict[Ref, FeedTarget] = {}
    on_failure: dict[str, OnFailure] = {}
    for vs in virtual_servers:
        spec = vs.spec
        if (spec.health_check is None and spec.feedback is None) or not (
            spec.node_selector.matches(node.labels)
        ):
            continue
        if spec.fwmark is None and vs.address is None:
            continue  # no address yet: nothing is programmed, nothing to check
        check = spec.health_check
        if check is not None:
            on_failure[vs.key] = check.on_failure
            for rs in spec.backends.static:
                port = _check_port(vs, rs, check)
                if _weight(vs, rs) == 0 or port is None:
                    continue  # quiesced by its spec: nothing to decide
                address = rs.check_address or rs.address
                probe = Probe(check, address, port, _refused(node, address, port))
                probes.setdefault(probe, set()).add((vs.key, (str(rs.address), rs.port or 0)))
        fb = spec.feedback
        if fb is None:
            continue
        law = Law.of(fb)
        servers: list[tuple[IPAddress, int, int]] = [
            (rs.address, rs.port or 0, _weight(vs, rs)) for rs in spec.backends.static
        ]
        if spec.backends.service is not None:
            local = spec.traffic_policy is TrafficPolicy.LOCAL
            for ep in endpoints.get((vs.namespace, spec.backends.service), ()):
                if ep.ready and (not local or ep.node_name == node.name):
                    servers.append((ep.address, 0, spec.backends.default_weight))
        for address, port, weight in servers:
            if not real_server_address_ok(address):
                continue
            poll = Poll(
                address,
                fb.agent_port,
                fb.agent_send,
                fb.period,
                fb.timeout,
                _refused(node, address, fb.agent_port),
            )
            feeds[(vs.key, (str(address), port))] = FeedTarget(poll, law, weight)
    return Targets({p: frozenset(r) for p, r in probes.items()}, feeds, on_failure)
