"""The BGP policy's inputs from one reconcile pass, and the cluster objects behind them.

:func:`plan_from_pass` (pure) is what the agent calls after each pass. The shells here read what
the pass does not carry: BGPPeers (validated once per resourceVersion, like AddressPools) and
the sessions' passwords (Secrets in the agent's namespace, read by name when a BGPPeer needs
one and again every ``ttl`` seconds, so a rotated password reaches ExaBGP).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipvs_agent.announce.bgp.policy import Plan, bgp_plan, router_id
from ipvs_agent.announce.bgp.speaker import BGPSpeaker
from ipvs_agent.announce.serving import vips
from ipvs_agent.desired import EndpointIndex, Node, Outcome
from ipvs_agent.desired import Plan as TablePlan
from ipvs_api import InvalidObject, load
from ipvs_api.types import AddressPool, BGPPeer, VirtualServer

log = logging.getLogger(__name__)


def live(table: TablePlan) -> frozenset[str]:
    """VirtualServers with at least one real server taking new connections in this plan."""
    return frozenset(
        table.owners[key]
        for key, service in table.table.items()
        if key in table.owners and any(d.weight > 0 for d in service.dests.values())
    )


def plan_from_pass(
    virtual_servers: Iterable[VirtualServer],
    endpoints: EndpointIndex,
    pools: Mapping[str, AddressPool],
    outcomes: Mapping[str, Outcome],
    table: TablePlan,
    node: Node,
    peers: Iterable[BGPPeer],
    passwords: Mapping[tuple[str, str], str],
) -> Plan:
    return bgp_plan(
        vips(virtual_servers, pools, lambda pool: pool.bgp is not None),
        peers,
        node.name,
        node.labels,
        outcomes,
        endpoints,
        live(table),
        passwords,
        router_id(node.name, node.addresses),
    )


class PeerCache:
    """BGPPeers by name, validated once per resourceVersion (invalid ones left out and logged:
    the API server refuses them anyway)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], BGPPeer | None] = {}

    def read(self, objects: Iterable[Mapping[str, Any]]) -> list[BGPPeer]:
        kept: dict[tuple[str, str], BGPPeer | None] = {}
        for obj in objects:
            meta = obj.get("metadata") or {}
            key = (str(meta.get("name", "")), str(meta.get("resourceVersion", "")))
            if key in self._entries:
                peer = self._entries[key]
            else:
                try:
                    peer = load.bgp_peer(dict(obj))
                except (InvalidObject, ValueError, TypeError, KeyError) as error:
                    log.warning("BGPPeer %s left out: %s", key[0], error)
                    peer = None
            kept[key] = peer
        self._entries = kept
        return [p for p in kept.values() if p is not None]


class Secrets:
    """Passwords from Secrets in one namespace, by (name, key); ``get`` reads one Secret's
    data (a dict of base64 values; None when it does not exist)."""

    def __init__(
        self,
        get: Callable[[str], Mapping[str, str] | None],
        ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.get = get
        self.ttl = ttl
        self.clock = clock
        self._cache: dict[str, tuple[float, Mapping[str, str] | None]] = {}

    def passwords(self, peers: Iterable[BGPPeer]) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        now = self.clock()
        for peer in peers:
            ref = peer.password_secret
            if ref is None:
                continue
            cached = self._cache.get(ref.name)
            if cached is None or now - cached[0] >= self.ttl:
                try:
                    data = self.get(ref.name)
                except Exception as error:  # API away: keep what was read before
                    log.warning("cannot read Secret %s: %s", ref.name, error)
                    data = cached[1] if cached else None
                cached = (now, data)
                self._cache[ref.name] = cached
            data = cached[1]
            if data is not None and ref.key in data:
                try:
                    out[(ref.name, ref.key)] = base64.b64decode(data[ref.key]).decode()
                except (ValueError, UnicodeDecodeError):
                    log.warning("Secret %s key %s is not a text password", ref.name, ref.key)
        return out


@dataclass
class BGPAnnouncer:
    """What the agent holds for BGP: the speaker and the readers of its other inputs."""

    speaker: BGPSpeaker
    secrets: Secrets
    peers: PeerCache = field(default_factory=PeerCache)
