"""Which virtual addresses a node may announce, from one reconcile pass: pure, shared by the
layer-2 election and BGP.

Both announcers ask the same questions of a pass — which VirtualServers use each VIP and under
which pool, whether this node programmed all of them, and with ``trafficPolicy: Local`` which
nodes hold a ready endpoint — and differ only in what they do with the answer: layer 2 elects
one node per VIP from every node's answer, BGP lets every node that can serve a VIP announce
it. An address is announced for what its pool says (``status.addressPool``, written by the
operator); firewall-mark services have no address to announce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ipvs_agent.desired import EndpointIndex, Outcome, State
from ipvs_agent.model import IPAddress
from ipvs_api.types import AddressPool, TrafficPolicy, VirtualServer

#: A well-known node label (also honoured by cloud providers' service controllers): a node that
#: carries it announces no VIP over BGP — the way to take a node out of rotation (drain).
EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"


@dataclass(frozen=True)
class VipUsers:
    """One announced VIP and the VirtualServers (with their pool) that use it."""

    vip: IPAddress
    users: tuple[tuple[VirtualServer, AddressPool], ...]

    def local_endpoints(self, endpoints: EndpointIndex) -> frozenset[str] | None:
        """With trafficPolicy Local, the nodes holding a ready endpoint of every such user
        (None: no user has policy Local, any node may serve)."""
        local: frozenset[str] | None = None
        for vs, _ in self.users:
            if vs.spec.traffic_policy is not TrafficPolicy.LOCAL:
                continue
            nodes = frozenset(
                ep.node_name or ""
                for ep in endpoints.get((vs.namespace, vs.spec.backends.service or ""), ())
                if ep.ready
            )
            local = nodes if local is None else local & nodes
        return local

    def programmed(self, outcomes: Mapping[str, Outcome]) -> bool:
        """Whether this node programmed every user (a refused one would fail its clients)."""
        return all(
            (o := outcomes.get(vs.key)) is not None and o.state is State.PROGRAMMED
            for vs, _ in self.users
        )


def vips(
    virtual_servers: Iterable[VirtualServer],
    pools: Mapping[str, AddressPool],
    announced: Callable[[AddressPool], bool],
) -> list[VipUsers]:
    """Every VIP whose pool ``announced`` accepts, with its users, in address order (the same
    list on every node)."""
    by_vip: dict[IPAddress, list[tuple[VirtualServer, AddressPool]]] = {}
    for vs in virtual_servers:
        pool = pools.get(vs.status_pool or "")
        if vs.address is None or vs.spec.fwmark is not None or pool is None:
            continue
        if announced(pool):
            by_vip.setdefault(vs.address, []).append((vs, pool))
    return [
        VipUsers(vip, tuple(by_vip[vip]))
        for vip in sorted(by_vip, key=lambda a: (a.version, int(a)))
    ]


def can_serve(
    item: VipUsers,
    node: str,
    outcomes: Mapping[str, Outcome],
    endpoints: EndpointIndex,
    live: Sequence[str] | frozenset[str],
) -> str:
    """Why this node cannot serve ``item`` now ("" when it can): every user programmed here;
    with trafficPolicy Local, a ready endpoint on this node; and at least one user with a
    real server that takes new connections (``live``: VirtualServer keys with a weighted real
    server in this node's plan) — a VIP that lost every real server draws no traffic."""
    if not item.programmed(outcomes):
        return "NotProgrammed"
    local = item.local_endpoints(endpoints)
    if local is not None and node not in local:
        return "NoLocalEndpoint"
    if not any(vs.key in live for vs, _ in item.users):
        return "NoRealServers"
    return ""
