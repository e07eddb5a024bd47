"""Who answers for each virtual address on layer 2: pure, the same answer on every node.

Every agent computes, from the same inputs, the one node that answers ARP and neighbour
solicitations for a VIP: among the nodes eligible for it, the one with the highest rendezvous
score ``sha256(node "#" vip)``. Rendezvous (highest-random-weight) hashing needs no coordination
beyond knowing who is eligible, spreads the VIPs evenly over the nodes, and when a node leaves
moves only that node's VIPs (each to its own next-ranked node), never the others'.

A node is eligible for a VIP when its agent is alive (holds a fresh Lease: synced, reconciling),
the VIP's pool lets it announce (the pool's layer-2 node selector), it has not reported the
VIP as one it cannot serve (not programmed: a kernel error, a conflict), and — with traffic
policy Local — it has a ready endpoint of the service.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ipvs_agent.model import IPAddress
from ipvs_api.types import LabelSelector


def score(node: str, vip: IPAddress) -> int:
    """The node's rendezvous score for ``vip`` (MetalLB ranks by the same digest)."""
    return int.from_bytes(hashlib.sha256(f"{node}#{vip}".encode()).digest()[:16], "big")


def elect(vip: IPAddress, eligible: Iterable[str]) -> str | None:
    """The node that announces ``vip`` (None when no node is eligible)."""
    best: tuple[int, str] | None = None
    for node in eligible:
        ranked = (score(node, vip), node)
        if best is None or ranked > best:
            best = ranked
    return None if best is None else best[1]


@dataclass(frozen=True)
class Member:
    """What the other agents know of one node's agent (from its Lease and its Node)."""

    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    #: VIPs the node reported it cannot serve (not programmed there).
    unready: frozenset[IPAddress] = frozenset()


@dataclass(frozen=True)
class Wanted:
    """One VIP to announce: the node selectors a node must match (the VirtualServer's and the
    pool's layer-2 one), with traffic policy Local the nodes holding a ready endpoint (None:
    any), and the interface patterns of its pool."""

    vip: IPAddress
    selectors: tuple[LabelSelector, ...] = ()
    local_endpoints: frozenset[str] | None = None
    interfaces: tuple[str, ...] = ()


def eligible(wanted: Wanted, members: Iterable[Member]) -> list[str]:
    return [
        m.node
        for m in members
        if wanted.vip not in m.unready
        and all(s.matches(m.labels) for s in wanted.selectors)
        and (wanted.local_endpoints is None or m.node in wanted.local_endpoints)
    ]


def assign(wanted: Iterable[Wanted], members: Iterable[Member]) -> dict[IPAddress, str | None]:
    """The announcing node of every VIP (None: no node may announce it now)."""
    alive = list(members)
    return {w.vip: elect(w.vip, eligible(w, alive)) for w in wanted}


def mine(node: str, wanted: Iterable[Wanted], members: Iterable[Member]) -> dict[IPAddress, Wanted]:
    """The VIPs ``node`` must announce, with their settings."""
    chosen = list(wanted)
    owners = assign(chosen, members)
    return {w.vip: w for w in chosen if owners[w.vip] == node}
