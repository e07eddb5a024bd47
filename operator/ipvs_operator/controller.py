"""The controller: a work queue of dirty keys, addresses, and VirtualServer and pool status.

kopf's event handlers only mark keys dirty here (:mod:`ipvs_operator.handlers`); workers take
keys from a de-duplicating queue and reconcile each from the current indexes, so the outcome
depends on state, never on the order events came in. All decisions are made by the pure modules
(:mod:`.services`, :mod:`.allocator`, :mod:`.pools`, :mod:`.backends`, :mod:`.status`); this
module reads, calls them and writes (through :mod:`.writer`; Services are reconciled by
:mod:`.service_reconciler`).

Allocation is synchronous between two ``await``\\ s, so concurrent workers never hand out one
address twice. Before the first reconcile the table is rebuilt from every VirtualServer's
``status.address`` (:meth:`Controller.restore`); kopf calls no event handler before its indexes
hold the initial listings, so nothing is allocated from a partial picture.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from ipvs_api import conditions, constants, load
from ipvs_api.errors import InvalidObject
from ipvs_api.rules import parse_ip
from ipvs_api.types import IPAddress, VirtualServer
from ipvs_operator import backends, bgp, kube, pools, status
from ipvs_operator.agent_leases import AgentLeases
from ipvs_operator.allocator import Allocator, Claim
from ipvs_operator.events import EventPoster
from ipvs_operator.marks import MarkClaim, MarkTable
from ipvs_operator.service_reconciler import ServiceReconciler
from ipvs_operator.status import Address, DirectorReport
from ipvs_operator.tasks import cancelled
from ipvs_operator.views import Views, report_key, virtual_server_of
from ipvs_operator.workqueue import POOL, SESSIONS, SVC, VS, Key, WorkQueue
from ipvs_operator.writer import NotLeading, Writer, always_leading, status_patch
from ipvs_operator.writer import meta as _meta

log = logging.getLogger(__name__)

#: Pool statuses are written at most this often while addresses churn.
POOL_STATUS_DELAY: Final = 0.5


@dataclass(frozen=True)
class Settings:
    default_load_balancer: bool = False
    workers: int = 8
    #: Where the agents keep their Leases ("": do not watch them; reports stand as they are).
    agents_namespace: str = ""


class Controller:
    def __init__(
        self,
        settings: Settings,
        views: Views,
        client: kube.Kube,
        poster: EventPoster,
        time_left: Callable[[], float] = always_leading,
    ) -> None:
        self.settings = settings
        self.views = views
        self.writer = Writer(client, poster, time_left)
        self.allocator = Allocator()
        self.marks = MarkTable()
        self.queue: WorkQueue[Key] = WorkQueue()
        self.services = ServiceReconciler(
            settings.default_load_balancer, views, self.writer, self.queue
        )
        self.restored = False
        self._pool_signature: tuple[tuple[str, str, str, str], ...] | None = None
        self._pool_views: dict[str, pools.PoolView] = {}
        self._waiting: set[Key] = set()
        self._node_labels: dict[str, dict[str, str]] = {}
        #: What each node's report objects (its IPVSNode, and IPVSNodeReports on a big node)
        #: list, by node, then by object name: each entry by ``report_key`` (an interned
        #: string per VirtualServer: a tuple per entry was half of this memory). The entries
        #: are the index's own objects (one :class:`views.ReportReader` reading for both).
        self._node_reports: dict[str, dict[str, dict[str, DirectorReport]]] = {}
        #: Each node's BGP sessions as last reported: nothing the operator writes keeps them.
        self._node_sessions: dict[str, dict[bgp.SessionKey, bgp.Session]] = {}
        #: ... and as its Events last told them: none while its agent is presumed dead.
        self._sessions_told: dict[str, dict[bgp.SessionKey, bgp.Session]] = {}
        #: Nodes whose agent's Lease went stale and has not been fresh since: their sessions
        #: are presumed down (a Lease deleted after going stale brings no word of them).
        self._presumed_dead: set[str] = set()
        self._namespace_labels: dict[str, dict[str, str]] = {}
        self._pool_generations: dict[str, int] = {}
        #: Parsed VirtualServers by (uid, generation): validation is the costliest step, and
        #: most events are the operator's own status writes.
        self._parsed: dict[tuple[str, str], tuple[Any, VirtualServer | None]] = {}
        self._workers: list[asyncio.Task[None]] = []
        #: Nodes whose agent holds a fresh Lease (None: not known yet), and those whose
        #: agent's Lease is stale (a dead agent).
        self._live_agents: frozenset[str] | None = None
        self._stale_agents: frozenset[str] = frozenset()
        self._client = client

    # -- triggers (from kopf event handlers) ---------------------------------------------

    def virtual_server_changed(self, namespace: str, name: str, labels: Mapping[str, str]) -> None:
        self.queue.add((VS, namespace, name))
        service = labels.get(constants.LABEL_SERVICE_NAME)
        if service:
            self.queue.add((SVC, namespace, service))

    def service_changed(self, namespace: str, name: str) -> None:
        svc = self.views.service(namespace, name)
        relevant = svc is not None and (svc.get("spec") or {}).get("type") == "LoadBalancer"
        if relevant or self.views.owned_by_service(namespace, name):
            self.queue.add((SVC, namespace, name))

    def pool_changed(self, name: str, generation: int | None) -> None:
        """A pool's spec change (or arrival, or removal) concerns every pool and object.

        Its status changing (our own writes) concerns nobody: the generation tells them apart.
        """
        if self._pool_generations.get(name) == generation:
            return
        if generation is None:
            self._pool_generations.pop(name, None)
        else:
            self._pool_generations[name] = generation
        for body in self.views.pools():
            self.queue.add((POOL, "", str(_meta(body).get("name"))))
        self._all_virtual_servers()

    def namespace_changed(self, name: str, labels: Mapping[str, str]) -> None:
        if self._namespace_labels.get(name) == dict(labels):
            return
        self._namespace_labels[name] = dict(labels)
        for namespace, vs_name in self.views.virtual_server_keys():
            if namespace == name:
                self.queue.add((VS, namespace, vs_name))

    def slices_changed(self, namespace: str, service: str) -> None:
        for name in self.views.using_service(namespace, service):
            self.queue.add((VS, namespace, name))

    def report_changed(
        self,
        node: str,
        source: str,
        listed: Mapping[tuple[str, str], DirectorReport],
        gone: bool,
        part: bool = False,
    ) -> None:
        """The report object ``source`` of ``node`` now lists ``listed`` (or went).

        An IPVSNode coming or going changes the set of directors of every VirtualServer that
        names none. Otherwise only the VirtualServers whose entry appeared, went or changed
        are reconciled: an agent rewrites a whole object (up to some 1700 entries) for one
        entry's change, and reconciling all it lists, on each of N nodes' writes, made one
        change cost N times 1700 reconciles.
        """
        now = {} if gone else {report_key(*k): r for k, r in listed.items()}
        objects = self._node_reports.setdefault(node, {})
        before = objects.get(source)
        if gone:
            objects.pop(source, None)
            if not part or not objects:
                self._node_reports.pop(node, None)
        else:
            objects[source] = now
        if not part and (before is None or gone):
            self._all_virtual_servers()  # the set of directors changed
            return
        before = before or {}
        for key in now.keys() | before.keys():
            was, report = before.get(key), now.get(key)
            if report is not was and report != was:  # alike entries are one object
                self.queue.add((VS, *virtual_server_of(key)))

    async def sessions_changed(
        self, node: str, report: Mapping[str, Any] | None, *, listing: bool, gone: bool
    ) -> None:
        """Post an Event on each BGPPeer whose session from ``node`` became established or
        stopped being so; ``report`` is the IPVSNode's ``status.bgp``.

        The sessions before are the last told here. A node first seen in a listing (the
        operator's start, a new leader) is only remembered, so a restart repeats no Event; one
        created meanwhile starts from no sessions.
        """
        first = node not in self._node_sessions
        if gone:
            self._node_sessions.pop(node, None)
            self._presumed_dead.discard(node)
        else:
            self._node_sessions[node] = bgp.sessions(report)
        if first and listing:
            self._sessions_told[node] = self._sessions_held(node)
            return
        await self.tell_sessions(node)

    def _sessions_held(self, node: str) -> dict[bgp.SessionKey, bgp.Session]:
        """The sessions of ``node`` as they stand: as reported, none while presumed dead."""
        return {} if node in self._presumed_dead else self._node_sessions.get(node, {})

    async def tell_sessions(self, node: str) -> None:
        """Post the Events that move what was told of ``node``'s sessions to how they stand.

        kopf retries no event handler, and an Event is only a hint: one refused for want of
        Lease time is lost, and the sessions count as told all the same."""
        told = self._sessions_told.pop(node, {})
        held = self._sessions_held(node)
        if node in self._node_sessions:
            self._sessions_told[node] = held
        why = bgp.STALE_LEASE if node in self._presumed_dead else bgp.NOT_REPORTED
        for event in bgp.events(node, told, held, gone=why):
            peer = self.views.peer(event.peer) or _peer_reference(event.peer)
            try:
                await self.writer.post(peer, event.type, event.reason, event.message)
            except NotLeading:
                log.warning("too little of the Lease left: %s not posted", event.reason)
                return

    def node_changed(self, name: str, labels: Mapping[str, str] | None) -> None:
        new = None if labels is None else dict(labels)
        if self._node_labels.get(name) == new:
            return
        if new is None:
            self._node_labels.pop(name, None)
        else:
            self._node_labels[name] = new
        self._all_virtual_servers()

    def agents_changed(self, alive: frozenset[str], stale: frozenset[str]) -> None:
        """The live or the stale agents moved: what their reports count for may have."""
        before, self._live_agents = self._live_agents, alive
        before_stale, self._stale_agents = self._stale_agents, stale
        # A BGP speaker dies with its agent: sessions of a node gone stale are presumed down
        # until its Lease is fresh again. The first word only sets this (a restarted operator
        # repeats no Event); after it, each move is told.
        dead = (self._presumed_dead | stale) - alive
        moved_sessions = dead ^ self._presumed_dead
        self._presumed_dead = dead
        if before is None:
            for node in moved_sessions & self._sessions_told.keys():
                self._sessions_told[node] = self._sessions_held(node)
        else:
            for node in moved_sessions & self._node_sessions.keys():
                self.queue.add((SESSIONS, "", node))
        moved = set(self._node_reports) if before is None else alive ^ before
        for node in moved | (stale ^ before_stale):
            for listed in self._node_reports.get(node, {}).values():
                for key in listed:
                    self.queue.add((VS, *virtual_server_of(key)))

    def _live(self, reports: Mapping[str, DirectorReport]) -> dict[str, DirectorReport]:
        return status.live_reports(reports, self._live_agents, self._stale_agents)

    def _all_virtual_servers(self) -> None:
        for namespace, name in self.views.virtual_server_keys():
            self.queue.add((VS, namespace, name))

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"reconciler-{i}")
            for i in range(self.settings.workers)
        ]
        if self.settings.agents_namespace:
            leases = AgentLeases(self._client, self.settings.agents_namespace, self.agents_changed)
            self._workers.append(asyncio.create_task(leases.run(), name="agent leases"))

    async def stop(self) -> None:
        await cancelled(*self._workers)
        self._workers = []

    async def _work(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                await self.reconcile(key)
                self.queue.forget(key)
            except asyncio.CancelledError:
                raise
            except NotLeading:
                # Too little of the Lease left to write: a renewal may yet come (then the key
                # must not be lost), or the process exits as a standby shortly.
                delay = self.queue.retry(key)
                log.warning("too little of the Lease left: %s again in %.1fs", "/".join(key), delay)
            except Exception as exc:  # one object's failure must not stop the others
                delay = self.queue.retry(key)
                if isinstance(exc, kube.ApiError | OSError | TimeoutError):
                    log.warning("%s: %s; retrying in %.1fs", "/".join(key), exc, delay)
                else:
                    log.exception("%s failed; retrying in %.1fs", "/".join(key), delay)
            finally:
                self.queue.done(key)

    async def reconcile(self, key: Key) -> None:
        if not self.restored:
            self.restore()
        self._refresh_pools()
        kind, namespace, name = key
        if kind == VS:
            await self.reconcile_virtual_server(namespace, name)
        elif kind == SVC:
            await self.services.reconcile(namespace, name)
        elif kind == POOL:
            await self.reconcile_pool(name)
        elif kind == SESSIONS:
            await self.tell_sessions(name)

    # -- allocation table ------------------------------------------------------------------

    def restore(self) -> None:
        """Rebuild the address and mark tables from the objects, before any allocation."""
        self._refresh_pools()
        held: list[tuple[Claim, IPAddress, str]] = []
        marked: list[tuple[MarkClaim, str]] = []
        for body in self.views.virtual_servers():
            st = body.get("status") or {}
            vs = self._load(body)
            if vs is None or not st.get("addressPool"):
                continue
            address = parse_ip(str(st.get("address") or ""))
            mark = st.get("firewallMark")
            if address is not None:
                pool = str(st["addressPool"])
                held.append((self._claim(vs, address, pool), address, pool))
            elif vs.spec.fwmark is not None and mark == vs.spec.fwmark:
                pool = str(st["addressPool"])
                marked.append((self._mark_claim(vs, mark, pool), pool))
        dropped = self.allocator.restore(held) + self.marks.restore(marked)
        for key in dropped:
            namespace, _, name = key.partition("/")
            self.queue.add((VS, namespace, name))
        self.restored = True
        log.info(
            "restored %d address allocation(s) and %d firewall mark(s) from VirtualServer status",
            len(held),
            len(marked),
        )

    def _refresh_pools(self) -> None:
        bodies = self.views.pools()
        # What judging reads (spec, name, age), not resourceVersion: the pools' status, which
        # this operator rewrites as addresses are handed out, changes nothing in a verdict.
        signature = tuple(sorted(pool_signature(b) for b in bodies))
        if signature == self._pool_signature:
            return
        self._pool_signature = signature
        judged = pools.judge(bodies)
        self._pool_views = {v.name: v for v in judged}
        usable = [v.pool for v in judged if v.usable and v.pool is not None]
        unusable = {v.name: v.problem[1] for v in judged if v.problem is not None}
        self.allocator.set_pools(usable, unusable)
        self.marks.set_pools(usable, unusable)

    def _claim(
        self, vs: VirtualServer, current: IPAddress | None, current_pool: str | None = None
    ) -> Claim:
        return Claim(
            key=vs.key,
            namespace=vs.namespace,
            age=(vs.created or "~", vs.namespace, vs.name),
            family=vs.spec.family,
            ports=frozenset((p.protocol.value, p.port) for p in vs.spec.ports),
            sharing_key=vs.spec.sharing_key,
            requested=vs.spec.address,
            pool=vs.spec.address_pool,
            current=current,
            current_pool=current_pool,
            namespace_labels=self.views.namespace_labels(vs.namespace),
        )

    def _mark_claim(
        self, vs: VirtualServer, current: int | None, current_pool: str | None = None
    ) -> MarkClaim:
        assert vs.spec.fwmark is not None
        return MarkClaim(
            key=vs.key,
            namespace=vs.namespace,
            age=(vs.created or "~", vs.namespace, vs.name),
            family=vs.spec.family,
            mark=vs.spec.fwmark,
            current=current,
            current_pool=current_pool,
            namespace_labels=self.views.namespace_labels(vs.namespace),
        )

    def _allocate(self, vs: VirtualServer, old: Mapping[str, Any]) -> Address:
        """An address (or firewall mark) for ``vs``, whose status is ``old``."""
        key: Key = (VS, vs.namespace, vs.name)
        if vs.spec.fwmark is not None:
            self._release_address(vs.key)
            return self._admit_mark(key, vs, old)
        self._release_mark(vs.key)
        before = self.allocator.holding(vs.key)
        current = parse_ip(str(old.get("address") or ""))
        pool = old.get("addressPool")
        claim = self._claim(vs, current, str(pool) if pool else None)
        outcome = self.allocator.ensure(claim)
        after = self.allocator.holding(vs.key)
        self._settled(key, outcome.ok, outcome.evicted)
        if before != after:
            for holding in (before, after):
                if holding is not None:
                    self.queue.add_after((POOL, "", holding.pool), POOL_STATUS_DELAY)
            if before is not None and (after is None or after.address != before.address):
                self._wake_waiters(key)
        return Address(outcome.ok, outcome.reason, outcome.message, outcome.address, outcome.pool)

    def _admit_mark(self, key: Key, vs: VirtualServer, old: Mapping[str, Any]) -> Address:
        before = self.marks.holding(vs.key)
        current = old.get("firewallMark")
        shown = current if isinstance(current, int) else None
        pool = old.get("addressPool")
        outcome = self.marks.ensure(self._mark_claim(vs, shown, str(pool) if pool else None))
        after = self.marks.holding(vs.key)
        self._settled(key, outcome.ok, outcome.evicted)
        if before != after:
            for holding in (before, after):
                if holding is not None:
                    self.queue.add_after((POOL, "", holding.pool), POOL_STATUS_DELAY)
            if before is not None and after is None:
                self._wake_waiters(key)
        return Address(
            outcome.ok, outcome.reason, outcome.message, None, outcome.pool, outcome.mark
        )

    def _settled(self, key: Key, ok: bool, evicted: Iterable[str]) -> None:
        """Keep track of who waits for an address or mark; reconcile those that lost one."""
        for lost in evicted:
            namespace, _, name = lost.partition("/")
            self.queue.add((VS, namespace, name))
        if ok:
            self._waiting.discard(key)
        else:
            self._waiting.add(key)

    def _release(self, vs_key: str) -> None:
        self._release_address(vs_key)
        self._release_mark(vs_key)

    def _release_address(self, vs_key: str) -> None:
        holding = self.allocator.release(vs_key)
        if holding is not None:
            namespace, _, name = vs_key.partition("/")
            self.queue.add_after((POOL, "", holding.pool), POOL_STATUS_DELAY)
            self._wake_waiters((VS, namespace, name))

    def _release_mark(self, vs_key: str) -> None:
        holding = self.marks.release(vs_key)
        if holding is not None:
            namespace, _, name = vs_key.partition("/")
            self.queue.add_after((POOL, "", holding.pool), POOL_STATUS_DELAY)
            self._wake_waiters((VS, namespace, name))

    def _wake_waiters(self, but: Key) -> None:
        for key in list(self._waiting):
            if key != but:
                self.queue.add(key)

    # -- VirtualServers --------------------------------------------------------------------

    def _load(self, body: Mapping[str, Any]) -> VirtualServer | None:
        """The validated VirtualServer (status aside), parsed once per generation."""
        meta = _meta(body)
        key = (str(meta.get("namespace")), str(meta.get("name")))
        stamp = (meta.get("uid"), meta.get("generation"), meta.get("creationTimestamp"))
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            vs: VirtualServer | None = load.virtual_server(
                {k: v for k, v in body.items() if k != "status"}
            )
        except InvalidObject:
            vs = None
        self._parsed[key] = (stamp, vs)
        return vs

    def _directors(self, vs: VirtualServer, reports: Mapping[str, DirectorReport]) -> set[str]:
        """Nodes that should program ``vs``: agents on matching nodes, and self-declared ones."""
        selector = vs.spec.node_selector
        desired = {
            node
            for node in self.views.agents()
            if selector.matches(self.views.node_labels(node) or {})
        }
        return desired | set(reports)

    async def reconcile_virtual_server(self, namespace: str, name: str) -> None:
        key: Key = (VS, namespace, name)
        body = self.views.virtual_server(namespace, name)
        if body is None:
            self._release(f"{namespace}/{name}")
            self._waiting.discard(key)
            self.writer.forget(key)
            self._parsed.pop((namespace, name), None)
            return
        generation = int(_meta(body).get("generation") or 0)
        old = self.writer.current(key, body)
        vs = self._load(body)
        heard = self.views.reports(namespace, name)
        reports = self._live(heard)
        if vs is None:
            self._release(f"{namespace}/{name}")
            message = "the VirtualServer does not validate"
            try:
                load.virtual_server(dict(body))
            except InvalidObject as exc:
                message = str(exc)
            address = Address(False, conditions.INVALID_SPEC, message)
            counts = backends.Counts()
            desired: set[str] = set(reports)
        else:
            address = self._allocate(vs, old)
            served = replace(vs, status_address=address.address)
            counts = backends.count(
                served, self.views.endpoints(namespace, vs.spec.backends.service or "")
            )
            desired = self._directors(vs, reports)
        new = status.compute(
            generation=generation,
            old=old,
            address=address,
            counts=counts,
            desired=desired,
            reports=reports,
        )
        if new != old:
            path = kube.vs_path(namespace, name, status=True)
            await self.writer.patch_status(key, body, path, status_patch(old, new), new)
        if vs is not None and address.address is not None:
            # Shown in its status now: a live address, which no later claim takes away.
            self.allocator.published(vs.key, address.address)
        if vs is not None and address.firewall_mark is not None:
            self.marks.published(vs.key, address.firewall_mark)
        set_aside = status.set_aside_health(heard, self._stale_agents)
        await self._announce(body, status.events(old, new, set_aside))

    async def _announce(self, body: Mapping[str, Any], found: list[status.Event]) -> None:
        """Post Events on the VirtualServer, and allocation news on its Service too."""
        if not found:
            return
        labels = _meta(body).get("labels") or {}
        service_name = labels.get(constants.LABEL_SERVICE_NAME)
        service = (
            self.views.service(str(_meta(body).get("namespace")), service_name)
            if service_name
            else None
        )
        for event in found:
            await self.writer.post(body, event.type, event.reason, event.message)
            if service is not None and event.reason in _SERVICE_EVENTS:
                message = f"VirtualServer {_meta(body).get('name')}: {event.message}"
                await self.writer.post(service, event.type, event.reason, message)

    # -- AddressPools ----------------------------------------------------------------------

    async def reconcile_pool(self, name: str) -> None:
        key: Key = (POOL, "", name)
        body = self.views.pool(name)
        view = self._pool_views.get(name)
        if body is None or view is None:
            self.writer.forget(key)
            return
        old = self.writer.current(key, body)
        new = pools.status(
            view,
            self.allocator.allocated_in(name),
            old.get("conditions") or [],
            marks_in_use=self.marks.in_use(name),
        )
        if new == old:
            return
        path = kube.pool_status_path(name)
        await self.writer.patch_status(key, body, path, status_patch(old, new), new)
        old_ready = status.condition(old, conditions.READY)
        new_ready = status.condition(new, conditions.READY)
        if new_ready.get("status") == "False" and (
            old_ready.get("status") != "False" or old_ready.get("reason") != new_ready.get("reason")
        ):
            await self.writer.post(
                body, "Warning", str(new_ready.get("reason")), str(new_ready.get("message"))
            )
        exhausted = view.pool is not None and view.pool.ranges and new["available"] == 0
        if view.usable and exhausted and old.get("available", 1) != 0:
            await self.writer.post(
                body,
                "Warning",
                conditions.POOL_EXHAUSTED,
                f"all {new['allocated']} addresses of AddressPool {name} are allocated",
            )


def pool_signature(body: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """What :func:`pools.judge` depends on in one pool: which object, and which spec."""
    meta = _meta(body)
    return (
        str(meta.get("name")),
        str(meta.get("uid")),
        str(meta.get("creationTimestamp")),
        str(meta.get("generation")),
    )


def _peer_reference(name: str) -> dict[str, Any]:
    """A BGPPeer the index does not hold (deleted meanwhile): its Event goes by name alone."""
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.BGP_PEER,
        "metadata": {"name": name},
    }


#: VirtualServer Events worth repeating on the Service that made it.
_SERVICE_EVENTS: Final = frozenset(
    {
        "AddressAllocated",
        "AddressChanged",
        conditions.ADDRESS_CONFLICT,
        conditions.ADDRESS_NOT_IN_POOL,
        conditions.POOL_NOT_FOUND,
        conditions.POOL_EXHAUSTED,
        conditions.ADDRESS_RETAINED,
        "Announced",
        "NotAnnounced",
    }
)
