"""The in-cluster agent: mirrors, a reconcile on each change or resync, reports and probes."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

from ipvs_agent import __version__
from ipvs_agent.announce.speaker import Speaker, layer2_inputs
from ipvs_agent.audit import ENDINGS, Auditor, Expected, Finding, expected_after
from ipvs_agent.desired import Node, services_used
from ipvs_agent.diff import drain_step
from ipvs_agent.health.checker import Checker
from ipvs_agent.health.targets import targets
from ipvs_agent.kernel import Kernel
from ipvs_agent.metrics import AgentMetrics
from ipvs_agent.model import DestKey, KernelInfo, ServiceKey
from ipvs_agent.partial import changed_endpoints, plan_change
from ipvs_agent.reconciler import Host, Memory, PassResult, reconcile, reconcile_change
from ipvs_agent.snapshot import (
    EndpointCache,
    PoolCache,
    ReadCache,
    Snapshot,
    index_endpoints,
    node_from,
    service_of,
    take,
)
from ipvs_agent.status import EntryMemo, node_status
from ipvs_agent.syncd import SyncDaemons
from ipvs_api import conditions
from ipvs_api.types import VirtualServer

if TYPE_CHECKING:  # the BGP modules only when BGP is on: start-up under emulation is slow
    from ipvs_agent.announce.bgp.inputs import BGPAnnouncer

log = logging.getLogger(__name__)

#: How many recent passes the agent remembers for the auditor (an audit overlapping more is
#: judged overtaken).
WRITES_KEPT = 1000

#: Resync periods a drift audit may read before the loop runs a full pass instead.
STUCK_RESYNCS = 3

#: Seconds a metrics/probe client may take to send its request.
HTTP_TIMEOUT = 5.0


class Source(Protocol):
    """A mirror of one resource (``cluster.Mirror``; a stub in tests)."""

    name: str
    synced: threading.Event

    def items(self) -> list[dict[str, Any]]: ...

    def run(self, stop: threading.Event) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Settings:
    node_name: str
    #: How often to look for drift: by the auditor beside the loop when there is one (a full
    #: pass only if it finds some), else by a full pass.
    resync_seconds: float = 30.0
    #: With an auditor, how often a full pass runs anyway, for what the auditor does not read
    #: (node sysctls, the real-server side, DR routes, the sync daemons).
    full_resync_seconds: float = 300.0
    #: Quiet time after a change before reconciling, so a burst of events is one pass.
    settle_seconds: float = 0.1
    #: While real servers drain, how often to look whether their connections ended, so a
    #: drained real server leaves soon after its last connection and not at the next resync.
    drain_check_seconds: float = 2.0
    #: Program a requested address only once the operator confirmed it (snapshot.take).
    admitted_only: bool = True
    #: Ports no VIP may forward to at one of the node's addresses (desired.PROTECTED_PORTS).
    protected_ports: frozenset[int] = frozenset()


class Agent:
    """Owns the loop; every collaborator is injected so tests can run it against fakes."""

    def __init__(
        self,
        settings: Settings,
        kernel: Kernel,
        host: Host,
        mirrors: Sequence[Source],
        changed: threading.Event,
        report: Callable[[dict[str, Any], str], object] | None = None,
        metrics: AgentMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        speaker: Speaker | None = None,
        bgp: BGPAnnouncer | None = None,
        sync: SyncDaemons | None = None,
        checker: Checker | None = None,
        auditor: Auditor | None = None,
    ) -> None:
        self.settings = settings
        self.speaker = speaker
        self.bgp = bgp
        self.sync = sync
        #: Health checks and feedback: configured from each snapshot, its decisions planned.
        self.checker = checker
        #: Looks for drift on a thread of its own, so the loop stays free for changes.
        self.auditor = auditor
        self.kernel = kernel
        self.host = host
        self.mirrors = mirrors
        self.changed = changed
        self.report = report
        self.metrics = metrics or AgentMetrics()
        self.clock = clock
        self.memory = Memory()
        self.read_cache = ReadCache()
        self.endpoint_cache = EndpointCache()
        #: The last report's entries, reused where unchanged (and their sizes, for slicing).
        self.entries = EntryMemo()
        self.kernel_info: KernelInfo | None = None
        self.last: PassResult | None = None
        self.passes = 0
        self.last_pass_at = 0.0
        #: When the loop last finished a turn (a pass, or handing a resync to the auditor).
        self.alive_at = 0.0
        #: The number of the last pass, and the services each recent one wrote (None: all).
        self.generation = 0
        self._writes: list[tuple[int, frozenset[ServiceKey] | None]] = []
        self._writes_floor = 0
        self._writes_lock = threading.Lock()
        #: What the last pass left, for the auditor to compare a reading with.
        self.expected: Expected | None = None
        #: Set (from the auditor's thread) when a full pass must run: drift, or a failed read.
        self._drift = threading.Event()
        self._conditions: list[dict[str, Any]] = []
        self._report_lock = threading.Lock()
        self._node_uid = ""
        self._pools = PoolCache()
        self._virtual_servers: tuple[VirtualServer, ...] = ()
        #: The kind of the last pass: "full" or "change".
        self.last_kind = "full"
        #: When the first change the current pass applies arrived (monotonic; 0: unknown).
        self._changed_since = 0.0
        #: The last pass's snapshot, which a change pass patches (None: the next is full).
        self._snapshot: Snapshot | None = None

    @property
    def synced(self) -> bool:
        return all(m.synced.is_set() for m in self.mirrors)

    def _objects(self, name: str) -> list[dict[str, Any]]:
        found = [m for m in self.mirrors if m.name == name]
        return found[0].items() if found else []

    def _slices_of(self, services: set[tuple[str, str]]) -> list[dict[str, Any]]:
        """The EndpointSlices of these Services (the mirror's own index, where it has one)."""
        for m in self.mirrors:
            if m.name == "endpointslices":
                of = getattr(m, "items_of", None)
                if of is not None:
                    found: list[dict[str, Any]] = of(services)
                    return found
                return [o for o in m.items() if service_of(o) in services]
        return []

    def run_once(self, cause: str, full: bool = False) -> PassResult:
        """One pass from the mirrors' current contents (never before they synced): a change
        pass when only some Services' endpoints changed (``ipvs_agent.partial``), else (or
        with ``full``) a full pass."""
        if self.kernel_info is None:
            self.kernel_info = self.kernel.info()
        elif self._modules_changed():
            full = True  # a new node, so the plan's memo starts anew too
        changes = self._take_changes()
        last = self._snapshot
        self._snapshot = None  # a pass that raises leaves the next one full
        nodes = self._objects("node")
        node_obj = nodes[0] if nodes else None
        node = node_from(
            node_obj,
            self.settings.node_name,
            self.kernel_info,
            protected_ports=self.settings.protected_ports,
        )
        node = replace(
            node,
            active_active=self.bgp is not None and self.bgp.speaker.has_sessions,
            connection_sync=self.sync is not None and self.sync.settings is not None,
        )
        if cause in ("change", "drain") and last is not None and not full:
            done = self._change_pass(last, node, changes)
            if done is not None:
                snap, result, written = done
                draining = set(self.memory.draining)
                self._finish(snap, result, node, cause, draining, "change", written)
                return result
        snap = take(
            self._objects("virtualservers"),
            self._objects("endpointslices"),
            node,
            admitted_only=self.settings.admitted_only,
            cache=self.read_cache,
            endpoint_cache=self.endpoint_cache,
        )
        self._publish_interest(services_used(snap.virtual_servers, node))
        if self.checker is not None:
            self.checker.configure(targets(snap.virtual_servers, snap.endpoints, node))
            snap = replace(snap, adjustments=self.checker.adjustments())
        draining = set(self.memory.draining)
        started = time.perf_counter()
        result = reconcile(snap, self.kernel, self.host, self.memory, self.clock())
        self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        self._node_uid = ((node_obj or {}).get("metadata") or {}).get("uid", "")
        self._finish(snap, result, node, cause, draining, "full")
        return result

    def _take_changes(self) -> dict[str, frozenset[Hashable] | None]:
        """What changed in each mirror since the last pass (None: anything may have); when
        the first of those changes arrived goes to :attr:`_changed_since`."""
        out: dict[str, frozenset[Hashable] | None] = {}
        since = [0.0]
        for m in self.mirrors:
            journal = getattr(m, "changes", None)
            out[m.name] = journal.take() if journal is not None else None
            since.append(getattr(journal, "taken_since", 0.0) or 0.0)
        self._changed_since = min((t for t in since if t), default=0.0)
        return out

    def _change_pass(
        self, last: Snapshot, node: Node, changes: Mapping[str, frozenset[Hashable] | None]
    ) -> tuple[Snapshot, PassResult, frozenset[ServiceKey]] | None:
        """Apply a change confined to some Services' endpoints (or none: a drain check)
        without a full pass; None when it is not so confined (or cannot be applied alone),
        and a full pass must run."""
        quiet = frozenset[Hashable]()
        if self.last is None or node != last.node:
            return None
        if changes.get("virtualservers") != quiet or changes.get("node") != quiet:
            return None
        services = changes.get("endpointslices")
        if services is None:
            return None
        adjustments = self.checker.adjustments() if self.checker is not None else {}
        if adjustments != last.adjustments:
            return None
        wanted: set[tuple[str, str]] = {s for s in services if isinstance(s, tuple)}
        slices = self._slices_of(wanted)
        started = time.perf_counter()
        change = plan_change(
            last,
            self.last.plan,
            self.last.outcomes,
            changed_endpoints(wanted, index_endpoints(slices)),
        )
        if isinstance(change, str):
            log.debug("full pass: %s", change)
            return None
        # Services with real servers draining are read too: their drain steps are due now
        # (a drain check is such a pass with no changed endpoints).
        draining = frozenset(key for key, _ in self.memory.draining)
        if not draining <= change.plan.table.keys():
            return None
        change = replace(change, services=change.services | draining)
        result = reconcile_change(change, self.last, self.kernel, self.memory, self.clock())
        if result is None:
            return None
        self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        return change.snapshot, result, change.services

    def _finish(
        self,
        snap: Snapshot,
        result: PassResult,
        node: Node,
        cause: str,
        draining: set[tuple[ServiceKey, DestKey]],
        kind: str,
        written: frozenset[ServiceKey] | None = None,
    ) -> None:
        """What follows either kind of pass: accounting, announcements, the report.
        ``written``: the services a change pass read and wrote (None: a full pass)."""
        self._wrote(written, result)
        self.metrics.passes.labels(kind=kind).inc()
        self.last_kind = kind
        if cause == "change" and self._changed_since:
            elapsed = time.monotonic() - self._changed_since
            self.metrics.change_seconds.labels(kind=kind).observe(elapsed)
        if self.sync is not None and kind == "full":
            # Not after a change pass: endpoints never change the daemons, and looking reads
            # the state file (its record of every owned service).
            self.sync.ensure(self.kernel)
        self._account(result, cause, draining)
        self.last, self.passes, self.last_pass_at = result, self.passes + 1, self.clock()
        self._snapshot = snap
        self._virtual_servers = snap.virtual_servers
        pools = (
            self._pools.read(self._objects("addresspools"))
            if self.speaker is not None or self.bgp is not None
            else {}
        )
        if self.speaker is not None:
            nics: Mapping[str, Any] = getattr(self.host, "interfaces", dict)()
            self.speaker.update(
                layer2_inputs(
                    snap.virtual_servers,
                    snap.endpoints,
                    pools,
                    result.outcomes,
                    node.labels,
                    nics,
                    ready=self.synced,
                )
            )
        if self.bgp is not None and self.synced:
            from ipvs_agent.announce.bgp.inputs import plan_from_pass

            peers = self.bgp.peers.read(self._objects("bgppeers"))
            self.bgp.speaker.update(
                plan_from_pass(
                    snap.virtual_servers,
                    snap.endpoints,
                    pools,
                    result.outcomes,
                    result.plan,
                    node,
                    peers,
                    self.bgp.secrets.passwords(peers),
                )
            )
        self.send_report()

    def _wrote(self, written: frozenset[ServiceKey] | None, result: PassResult) -> None:
        """Number this pass, note what it wrote, and what it left for the auditor."""
        with self._writes_lock:
            self.generation += 1
            self._writes.append((self.generation, written))
            if len(self._writes) > WRITES_KEPT:
                self._writes_floor = self._writes[-WRITES_KEPT - 1][0]
                del self._writes[:-WRITES_KEPT]
            self.expected = expected_after(self.generation, result, self.memory)

    def written_since(self, generation: int) -> frozenset[ServiceKey] | None:
        """The services the passes after ``generation`` wrote; None if one of them was a
        full pass (or they are too many to remember)."""
        with self._writes_lock:
            if generation < self._writes_floor:
                return None
            keys: set[ServiceKey] = set()
            for number, written in reversed(self._writes):
                if number <= generation:
                    break
                if written is None:
                    return None
                keys |= written
            return frozenset(keys)

    def _modules_changed(self) -> bool:
        """Whether a scheduler the planner holds back (:attr:`KernelInfo.unloaded`) was
        loaded since (or unloaded), noting it in :attr:`kernel_info`: then a full pass
        programs what waited for it."""
        info = self.kernel_info
        if info is None:
            return False
        unloaded = self.kernel.unloaded()
        if unloaded == info.unloaded:
            return False
        self.kernel_info = replace(info, unloaded=unloaded)
        return True

    def _audit(self) -> bool:
        """Hand the due resync to the auditor; False when there is none, no pass to compare
        with yet, or its reading has taken :data:`STUCK_RESYNCS` periods (then the loop runs
        the full pass itself: a stuck auditor never hides drift). A reading still under way
        for less takes this resync too."""
        expected = self.expected
        if self.auditor is None or expected is None:
            return False
        if self.auditor.request(expected):
            return True
        busy = self.auditor.busy_seconds()
        if busy < STUCK_RESYNCS * self.settings.resync_seconds:
            return True
        log.warning("the drift audit has been reading for %.0f s: a full pass runs", busy)
        return False

    def _drift_found(self, finding: Finding | None) -> None:
        """From the auditor's thread: a full pass must run (drift, or a failed reading)."""
        self._drift.set()
        self.changed.set()

    def _audit_ended(self, how: str, seconds: float) -> None:
        self.metrics.audits.labels(result=how).inc()
        self.metrics.audit_seconds.set(seconds)

    def _publish_interest(self, used: frozenset[tuple[str, str]]) -> None:
        """Tell the EndpointSlice mirror which Services this pass used, so a change to any
        other's slices wakes no pass; wake one more if a newly used Service changed while this
        pass was reading (``cluster.Interest``)."""
        for m in self.mirrors:
            interest = getattr(m, "interest", None)
            if m.name == "endpointslices" and interest is not None and interest.publish(used):
                journal = getattr(m, "changes", None)
                if journal is not None:  # the missed events are in no journal: look at all
                    journal.note_all()
                self.changed.set()

    def send_report(self) -> None:
        """Report the last pass's outcomes (and what this node announces now) in IPVSNode."""
        if self.report is None or self.last is None:
            return
        with self._report_lock:
            changes: Mapping[str, tuple[str, str]] = getattr(self.host, "node_changes", dict)()
            status = node_status(
                self.last.outcomes,
                self.kernel_info,
                __version__,
                conditions.now(),
                self._conditions,
                node_settings=changes,
                announcements=self._announcements(),
                bgp=self.bgp.speaker.status() if self.bgp is not None else None,
                connection_sync=self.sync.status() if self.sync is not None else None,
                memo=self.entries,
            )
            self._conditions = status["conditions"]
            try:
                self.report(status, self._node_uid)
            except Exception as e:  # reporting must never stop programming
                log.warning("could not report IPVSNode status: %s", e)

    def _announcements(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        """VirtualServer key -> (mode, interfaces) for the addresses this node announces."""
        if self.last is None:
            return {}
        out: dict[str, tuple[str, tuple[str, ...]]] = {}
        if self.speaker is not None:
            announced = self.speaker.responder.announced()
            self.metrics.l2_announced.set(len(announced))
            for vs in self._virtual_servers:
                if vs.address in announced:
                    out[vs.key] = ("Layer2", announced[vs.address])
        if self.bgp is not None:
            routed = self.bgp.speaker.announced()
            for vs in self._virtual_servers:
                if vs.address in routed and vs.key not in out:
                    out[vs.key] = ("BGP", routed[vs.address])
        return out

    def _account(
        self, result: PassResult, cause: str, draining: set[tuple[ServiceKey, DestKey]]
    ) -> None:
        m = self.metrics
        for r in result.results:
            m.operations.labels(kind=str(r.op.kind)).inc()
        m.netlink_errors.inc(len(result.failures))
        for repair in result.repairs:
            m.host_repairs.labels(what=repair.what).inc()
        # A resync that finds work repaired drift, except for the steps of drains in progress.
        drift = [op for op in result.ops if not drain_step(op, draining)]
        if cause == "resync" and drift:
            m.drift_repairs.inc(len(drift))
            log.info("resync repaired %d drifted entries", len(drift))
        tally = Tally(str(o.state) for o in result.outcomes.values())
        for state in ("Programmed", "Pending", "Failed", "Unsupported"):
            m.programmed.labels(state=state).set(tally.get(state, 0))
        m.table.update(result.observed, result.plan.owners)
        for r in result.failures:
            log.warning("kernel refused %s: %s", r.op, r.message or r.error)

    def run(self, stop: threading.Event) -> None:
        """Start the mirrors and reconcile on every change and every resync period."""
        threads = [
            threading.Thread(target=m.run, args=(stop,), name=f"mirror-{m.name}", daemon=True)
            for m in self.mirrors
        ]
        if self.auditor is not None:
            self.auditor.ended = self._audit_ended
            for how in ENDINGS:  # every series from the start, so rate() sees the first one
                self.metrics.audits.labels(result=how)
            threads.append(
                threading.Thread(
                    target=self.auditor.run,
                    args=(stop, self.written_since, self._drift_found),
                    name="auditor",
                    daemon=True,
                )
            )
        for t in threads:
            t.start()
        while not stop.is_set() and not self.synced:
            self.changed.wait(1.0)
        next_resync = self.clock() + self.settings.resync_seconds
        next_full = self.clock() + self.settings.full_resync_seconds
        while not stop.is_set():
            wake = next_resync
            if self.memory.draining:
                wake = min(wake, self.clock() + self.settings.drain_check_seconds)
            woke = self.changed.wait(max(0.0, wake - self.clock()))
            if stop.is_set():
                break
            now = self.clock()
            cause = "change" if woke else "resync" if now >= next_resync else "drain"
            # A due resync is a full pass even when changes keep coming (it applies them too),
            # unless the auditor takes it: then the loop goes on with changes meanwhile. A
            # scheduler module loaded since the last pass needs the full pass.
            due = now >= next_resync
            if due and now < next_full and not self._modules_changed() and self._audit():
                next_resync, due = now + self.settings.resync_seconds, False
                if cause == "resync":
                    self.alive_at = now
                    continue
            if cause == "change":
                stop.wait(self.settings.settle_seconds)
            self.changed.clear()
            if self._drift.is_set():  # after the clear: a later finding wakes the next turn
                self._drift.clear()
                cause, due = "resync", True
            kind = "full"
            try:
                self.run_once(cause, full=due)
                kind = self.last_kind
                self.alive_at = self.clock()
            except Exception:
                log.exception("reconcile pass failed; retrying at the next change or resync")
                self.expected = None  # the table is unknown now: the next resync is a full pass
            # A full pass read the whole table: the resync period starts again. A change pass
            # read a few services, so a stream of them never holds back the search for drift.
            if cause != "drain" and kind == "full":
                next_resync = self.clock() + self.settings.resync_seconds
            if kind == "full":
                next_full = self.clock() + self.settings.full_resync_seconds
        for m in self.mirrors:
            m.stop()


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with at most ``limit`` requests at once and a per-connection
    timeout: a flood of slow or idle clients costs a bounded number of threads, and clients
    beyond the limit are closed at once instead of queueing."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, limit: int = 8) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(limit)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_http(agent: Agent, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """/metrics, /healthz (the loop is alive) and /readyz (synced and one pass done).

    ``host`` is one address (the chart gives the node's own, ``status.hostIP``): the endpoint
    is for the kubelet's probes and Prometheus, not for whoever reaches the node.
    """

    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_TIMEOUT

        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype, code = agent.metrics.exposition(), CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                alive = max(agent.last_pass_at, agent.alive_at)
                stale = agent.passes and agent.clock() - alive > 3 * max(
                    agent.settings.resync_seconds, 10
                )
                body, ctype, code = (
                    (b"stale\n" if stale else b"ok\n"),
                    "text/plain",
                    500 if stale else 200,
                )
            elif self.path == "/readyz":
                ready = agent.synced and agent.passes > 0
                body, ctype, code = (
                    (b"ok\n" if ready else b"not ready\n"),
                    "text/plain",
                    200 if ready else 503,
                )
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = BoundedHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
