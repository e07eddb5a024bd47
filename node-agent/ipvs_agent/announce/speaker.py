"""Layer-2 announcement for one node: the pass says what exists, the Leases say who is alive,
the election says what this node answers for.

:func:`layer2_inputs` (pure) turns one reconcile pass — VirtualServers, endpoints, pools, this
node's outcomes — into what the election needs: every VIP to announce with its node selectors
(the same list on every node), and the VIPs this node cannot serve. :class:`Speaker` (the
shell) re-elects whenever a Lease changes or goes stale and whenever a pass brings new inputs,
without waiting for the next reconcile pass: a takeover costs one watch event (planned) or one
Lease duration (crash), then the responder's gratuitous ARP.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ipvs_agent.announce.election import Member, Wanted, mine
from ipvs_agent.announce.members import LeaseKeeper
from ipvs_agent.announce.serving import vips
from ipvs_agent.desired import EndpointIndex, Outcome
from ipvs_agent.model import IPAddress
from ipvs_api.leases import LeaseRecord, Liveness, lease_name, read_lease
from ipvs_api.types import AddressPool, LabelSelector, VirtualServer

log = logging.getLogger(__name__)

#: Devices never answered on: loopback and the agent's own dummies.
NOT_INTERFACES = frozenset({"lo", "ipvs0", "ipvs-rs0"})
Nics = Mapping[str, Sequence[ipaddress.IPv4Interface | ipaddress.IPv6Interface]]


@dataclass(frozen=True)
class Inputs:
    """What one pass tells the speaker."""

    #: The agent has synced and reconciled: it may hold a Lease.
    ready: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    #: Every VIP announced on layer 2, the same list on every node.
    wanted: tuple[Wanted, ...] = ()
    #: VIPs this node would be eligible for but cannot serve (not programmed here).
    unready: frozenset[IPAddress] = frozenset()
    #: This node's interfaces and their addresses.
    nics: Nics = field(default_factory=dict)


def interfaces_for(vip: IPAddress, patterns: Sequence[str], nics: Nics) -> tuple[str, ...]:
    """Where to answer for ``vip``: the named (or matching) interfaces, else every interface
    holding an address in a subnet that contains the VIP (the LAN it belongs to)."""
    names = [n for n in sorted(nics) if n not in NOT_INTERFACES]
    if patterns:
        return tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    return tuple(
        n
        for n in names
        if any(
            a.version == vip.version and vip in a.network and a.network.prefixlen < a.max_prefixlen
            for a in nics[n]
        )
    )


def _members(records: Iterable[LeaseRecord]) -> list[Member]:
    return [Member(r.node, r.labels, r.unready) for r in records]


def _selected(selectors: Iterable[LabelSelector], labels: Mapping[str, str]) -> bool:
    return all(s.matches(labels) for s in selectors)


def layer2_inputs(
    virtual_servers: Iterable[VirtualServer],
    endpoints: EndpointIndex,
    pools: Mapping[str, AddressPool],
    outcomes: Mapping[str, Outcome],
    labels: Mapping[str, str],
    nics: Nics,
    ready: bool,
) -> Inputs:
    """The election's inputs from one pass: each VirtualServer's address is announced as its
    pool says (``status.addressPool``, written by the operator)."""
    wanted: list[Wanted] = []
    unready: set[IPAddress] = set()
    for item in vips(virtual_servers, pools, lambda pool: pool.layer2 is not None):
        selectors: list[LabelSelector] = []
        patterns: list[str] = []
        for vs, pool in item.users:
            assert pool.layer2 is not None
            selectors += [vs.spec.node_selector, pool.layer2.node_selector]
            patterns += pool.layer2.interfaces
        local = item.local_endpoints(endpoints)
        chosen = Wanted(item.vip, tuple(selectors), local, tuple(dict.fromkeys(patterns)))
        wanted.append(chosen)
        if _selected(chosen.selectors, labels) and (
            not item.programmed(outcomes) or not interfaces_for(item.vip, chosen.interfaces, nics)
        ):
            unready.add(item.vip)
    return Inputs(ready, dict(labels), tuple(wanted), frozenset(unready), nics)


class Answering(Protocol):
    def set(self, wanted: Mapping[IPAddress, tuple[str, ...]]) -> None: ...

    def announced(self) -> dict[IPAddress, tuple[str, ...]]: ...

    def claims(self) -> dict[IPAddress, int]: ...


class LeaseSource(Protocol):
    synced: threading.Event

    def items(self) -> list[dict[str, Any]]: ...


class Speaker:
    """Keeps the responder answering for this node's share of the VIPs.

    ``leases``: a mirror of the agents' Leases whose changes set ``wake``; ``keeper`` keeps this
    node's own Lease; ``on_change`` is called when the announced set changes (to report it);
    ``nics`` reads the interfaces that are up, polled every second so a link going down hands
    its VIPs over without waiting for a pass.
    """

    def __init__(
        self,
        node: str,
        keeper: LeaseKeeper | None,
        leases: LeaseSource,
        responder: Answering,
        wake: threading.Event,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        nics: Callable[[], Nics] | None = None,
    ) -> None:
        self.node = node
        self.keeper = keeper
        self.leases = leases
        self.responder = responder
        self.wake = wake
        self.on_change = on_change
        self.clock = clock
        self.liveness = Liveness(node)
        self._given = Inputs()
        self._inputs = Inputs()
        self.nics = nics
        self._lock = threading.Lock()
        self.elections = 0
        self.members: list[Member] = []
        self._left = False
        #: Claims seen when this node lost sight of its own Lease (None: it sees it).
        self._blind: dict[IPAddress, int] | None = None

    def update(self, inputs: Inputs) -> None:
        """New facts from a pass; the Lease carries them from its next renewal on."""
        with self._lock:
            self._given = inputs
        self._settle(inputs.nics)
        self.wake.set()

    def _settle(self, nics: Nics) -> None:
        """The inputs with the interfaces as they are now: one that is down, or that the
        responder cannot answer on (no ``CAP_NET_RAW``, gone), does not count, and a VIP left
        without an interface is reported unready, so another node is elected for it."""
        broken = set(getattr(self.responder, "errors", {}))
        with self._lock:
            given = self._given
            usable = {n: a for n, a in nics.items() if n not in broken}
            lost = {
                w.vip
                for w in given.wanted
                if _selected(w.selectors, given.labels)
                and not interfaces_for(w.vip, w.interfaces, usable)
            }
            inputs = replace(given, nics=usable, unready=given.unready | lost)
            changed = inputs != self._inputs
            self._inputs = inputs
        if changed and self.keeper is not None:
            self.keeper.want(inputs.ready and bool(inputs.wanted), inputs.labels, inputs.unready)
            self.keeper.renew_now()  # the others re-elect on the news, not a period later

    def elect(self) -> dict[IPAddress, tuple[str, ...]]:
        """This node's VIPs now, each with the interfaces to answer on."""
        with self._lock:
            inputs = self._inputs
        records = [r for r in map(read_lease, self.leases.items()) if r is not None]
        now = self.clock()
        if self.keeper is not None:
            self.liveness.observe(records, now, self.keeper.written)
            if self.liveness.awaiting_proof(now):
                self.keeper.renew_now()
        else:
            self.liveness.observe(records, now)
        self.members = _members(self.liveness.alive(now))
        if self._left or not inputs.ready or not self.leases.synced.is_set():
            self._blind = None
            return {}
        sighted = any(m.node == self.node for m in self.members)
        if not sighted and any(r.node == self.node for r in records):
            return self._blindly(inputs)
        if self._blind is not None:
            # Sight is back: every Lease gets one duration from now to show a renewal (the
            # others could not renew either), so nobody is declared gone by the outage itself.
            log.info("Lease %s is current again: electing", lease_name(self.node))
            self._blind = None
            self.liveness.refresh(now)
            self.members = _members(self.liveness.alive(now))
        chosen = mine(self.node, inputs.wanted, self.members)
        out: dict[IPAddress, tuple[str, ...]] = {}
        for vip, wanted in chosen.items():
            names = interfaces_for(vip, wanted.interfaces, inputs.nics)
            if names:
                out[vip] = names
        return out

    @property
    def blind(self) -> bool:
        """This node cannot see its own Lease renewed: it keeps the VIPs it answers for."""
        return self._blind is not None

    def _blindly(self, inputs: Inputs) -> dict[IPAddress, tuple[str, ...]]:
        """This node's own Lease is stale in its own view: its renewals fail, or its watch
        brings nothing. It cannot tell an API outage (where every node is in the same state)
        from its own isolation, so it keeps answering what it answers — an API outage never
        takes the VIPs off the LAN — and yields each VIP another host claims meanwhile (the
        takeover of a node that still sees the Leases shows as its gratuitous ARP or
        unsolicited advertisement)."""
        current = self.responder.announced()
        claims = self.responder.claims()
        if self._blind is None:
            log.warning(
                "Lease %s is stale in this node's view (API server unreachable?): keeping %d "
                "VIPs until another node claims them",
                lease_name(self.node),
                len(current),
            )
            self._blind = claims
        wanted = {w.vip for w in inputs.wanted}
        kept = {}
        for vip, names in current.items():
            if claims.get(vip, 0) > self._blind.get(vip, 0):
                log.warning("%s is claimed by another node: no longer answering for it", vip)
            elif vip in wanted:
                kept[vip] = names
        return kept

    def step(self) -> None:
        before = self.responder.announced()
        wanted = self.elect()
        if wanted != before:
            self.elections += 1
            self.responder.set(wanted)
            self.on_change()

    def run(self, stop: threading.Event) -> None:
        """Thread body: re-elect on every Lease change, stale Lease and new input."""
        while not stop.is_set():
            if self.nics is not None:  # a link that went down moves its VIPs within a second
                try:
                    self._settle(self.nics())
                except (OSError, RuntimeError) as error:  # RuntimeError: a host.HostError
                    log.warning("cannot read the interfaces: %s", error)
            self.step()
            expiry = self.liveness.next_expiry(self.clock())
            timeout = 1.0 if expiry is None else max(0.01, min(1.0, expiry - self.clock()))
            self.wake.wait(timeout)
            self.wake.clear()

    def leave(self, timeout: float = 5.0) -> None:
        """Stop answering first, then give the Lease up: never two nodes answering. The
        report that this node no longer announces is queued once the Lease is gone (or after
        ``timeout``): building and sending it would slow the delete the others wait for."""
        self._left = True
        self.responder.set({})
        if self.keeper is not None:
            self.keeper.leave(timeout)  # the others take over once the Lease is gone
        self.on_change()
