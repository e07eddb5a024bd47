"""What this node announces over BGP, to whom, from one reconcile pass: pure.

Every node that can serve a VIP announces it (active-active: the routers spread flows over the
nodes with ECMP), so unlike layer 2 there is no election — only each node's own answer to "can
I serve it" (:func:`ipvs_agent.announce.serving.can_serve`). Sessions come from the BGPPeers
whose node selector matches this node; a route goes to the sessions of its family (an IPv4 VIP
to IPv4 peers), narrowed by the pool's ``bgp.peers``. LOCAL_PREF is sent to iBGP peers only
(RFC 4271 forbids it towards external peers).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ipvs_agent.announce.serving import EXCLUDE_LABEL, VipUsers, can_serve
from ipvs_agent.desired import EndpointIndex, Outcome
from ipvs_agent.model import IPAddress
from ipvs_api.types import BGPPeer

#: ExaBGP's limit for TCP MD5 keys (RFC 2385 leaves it to the implementation; Linux takes 80).
MAX_PASSWORD = 80


@dataclass(frozen=True, order=True)
class Session:
    """One BGP session this node keeps, to the router of one BGPPeer."""

    peer: str
    address: IPAddress
    asn: int
    local_asn: int
    port: int = 179
    hold_time: int = 90
    local_address: IPAddress | None = None
    password: str = field(default="", repr=False)
    router_id: str = ""

    @property
    def internal(self) -> bool:
        """iBGP: both ends in one AS."""
        return self.asn == self.local_asn


@dataclass(frozen=True, order=True)
class Route:
    """A host route for one VIP with its attributes, as sent to one session."""

    prefix: str
    communities: tuple[str, ...] = ()
    local_preference: int | None = None

    @property
    def vip(self) -> IPAddress:
        return ipaddress.ip_address(self.prefix.partition("/")[0])


@dataclass(frozen=True)
class Plan:
    """This node's BGP speaker configuration and routes."""

    sessions: tuple[Session, ...] = ()
    #: Routes by session (BGPPeer name).
    routes: Mapping[str, frozenset[Route]] = field(default_factory=dict)
    #: Peers this node should peer with but cannot (a missing Secret), with the reason.
    problems: Mapping[str, str] = field(default_factory=dict)
    #: VIPs of BGP pools this node directs but does not announce, with the reason.
    withheld: Mapping[IPAddress, str] = field(default_factory=dict)

    def announced_to(self, vip: IPAddress) -> tuple[str, ...]:
        """The peers (BGPPeer names) ``vip`` is meant to reach."""
        return tuple(sorted(p for p, rs in self.routes.items() if any(r.vip == vip for r in rs)))


def router_id(node: str, addresses: Iterable[IPAddress]) -> str:
    """The BGP identifier: the node's first IPv4 address, else a stable 32-bit value derived
    from its name (IPv6-only nodes have none; it only has to differ between speakers)."""
    for addr in sorted(addresses, key=lambda a: (a.version, int(a))):
        if addr.version == 4:
            return str(addr)
    value = int.from_bytes(hashlib.sha256(node.encode()).digest()[:4], "big") or 1
    return str(ipaddress.IPv4Address(value))


def sessions(
    peers: Iterable[BGPPeer],
    labels: Mapping[str, str],
    passwords: Mapping[tuple[str, str], str],
    identifier: str,
) -> tuple[tuple[Session, ...], dict[str, str]]:
    """The sessions of this node (peers whose node selector matches it) and the peers it
    cannot open (its password Secret or key is missing or unusable)."""
    out: list[Session] = []
    problems: dict[str, str] = {}
    for peer in sorted(peers, key=lambda p: p.name):
        if not peer.node_selector.matches(labels):
            continue
        password = ""
        if peer.password_secret is not None:
            ref = (peer.password_secret.name, peer.password_secret.key)
            found = passwords.get(ref)
            if found is None:
                problems[peer.name] = f"password Secret {ref[0]} (key {ref[1]}) not found"
                continue
            if not found or len(found.encode()) > MAX_PASSWORD:
                problems[peer.name] = f"password in Secret {ref[0]} must be 1-{MAX_PASSWORD} bytes"
                continue
            password = found
        out.append(
            Session(
                peer=peer.name,
                address=peer.address,
                asn=peer.asn,
                local_asn=peer.local_asn,
                port=peer.port,
                hold_time=peer.hold_time,
                local_address=peer.source_address,
                password=password,
                router_id=identifier,
            )
        )
    return tuple(out), problems


def bgp_plan(
    vips: Sequence[VipUsers],
    peers: Iterable[BGPPeer],
    node: str,
    labels: Mapping[str, str],
    outcomes: Mapping[str, Outcome],
    endpoints: EndpointIndex,
    live: frozenset[str],
    passwords: Mapping[tuple[str, str], str],
    identifier: str,
) -> Plan:
    """Sessions and routes for this node. ``vips``: the VIPs of pools with ``bgp`` and their
    users; ``live``: VirtualServer keys with a weighted real server in this node's plan."""
    found, problems = sessions(peers, labels, passwords, identifier)
    routes: dict[str, set[Route]] = {s.peer: set() for s in found}
    withheld: dict[IPAddress, str] = {}
    excluded = EXCLUDE_LABEL in labels
    for item in vips:
        selected = all(
            vs.spec.node_selector.matches(labels)
            and pool.bgp is not None
            and pool.bgp.node_selector.matches(labels)
            for vs, pool in item.users
        )
        if not selected:
            continue  # not a director of it: nothing to say
        reason = "NodeExcluded" if excluded else can_serve(item, node, outcomes, endpoints, live)
        if reason:
            withheld[item.vip] = reason
            continue
        wanted_peers: set[str] = set()
        communities: set[str] = set()
        preference: int | None = None
        for _, pool in item.users:
            assert pool.bgp is not None
            wanted_peers.update(pool.bgp.peers)
            communities.update(pool.bgp.communities)
            if pool.bgp.local_preference is not None:
                preference = max(preference or 0, pool.bgp.local_preference)
        length = 32 if item.vip.version == 4 else 128
        reached = False
        for session in found:
            if session.address.version != item.vip.version:
                continue
            if wanted_peers and session.peer not in wanted_peers:
                continue
            routes[session.peer].add(
                Route(
                    f"{item.vip}/{length}",
                    tuple(sorted(communities)),
                    preference if session.internal else None,
                )
            )
            reached = True
        if not reached:
            withheld[item.vip] = "NoPeer"
    return Plan(
        sessions=found,
        routes={peer: frozenset(rs) for peer, rs in routes.items()},
        problems=problems,
        withheld=withheld,
    )
