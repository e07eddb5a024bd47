"""The BGP speaker of one node: keeps ExaBGP's announcements equal to the policy's plan.

Each reconcile pass hands over a :class:`~ipvs_agent.announce.bgp.policy.Plan`
(:meth:`BGPSpeaker.update`); the speaker's thread then brings ExaBGP there without waiting for
the next pass: new sessions (a BGPPeer added, changed or removed) restart ExaBGP with a new
configuration, and route changes go out as API lines, each acknowledged. Session changes come
back as events, for the node's status and metrics. ExaBGP keeps what it was told across session
flaps and re-sends it when a session comes back, so the speaker only sends differences.

Stopping (:meth:`leave`, on SIGTERM: a rollout or a drained node) withdraws every route first,
then stops ExaBGP, which closes the sessions: routers move the flows to the other directors
before this one stops forwarding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ipvs_agent.announce.bgp import exabgp
from ipvs_agent.announce.bgp.driver import DriverError, ExaBGP
from ipvs_agent.announce.bgp.exabgp import SessionState
from ipvs_agent.announce.bgp.policy import Plan, Route, Session
from ipvs_agent.model import IPAddress

log = logging.getLogger(__name__)

#: Seconds between attempts to start ExaBGP after it failed or died.
RETRY = 5.0


class Process(Protocol):
    """What the speaker needs of a running ExaBGP (``driver.ExaBGP``; a fake in unit tests)."""

    sessions: tuple[Session, ...]

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def send(self, lines: list[str], timeout: float = 30.0) -> list[bool]: ...

    @property
    def alive(self) -> bool: ...


Factory = Callable[[tuple[Session, ...], Callable[[exabgp.Event], None]], Process]


@dataclass
class SessionStatus:
    state: SessionState = SessionState.CONNECTING
    since: float = 0.0
    reason: str = ""


@dataclass
class Counters:
    announcements: int = 0
    withdrawals: int = 0
    errors: int = 0
    restarts: int = 0
    session_changes: int = 0
    #: Established transitions per peer name.
    established: dict[str, int] = field(default_factory=dict)


def exabgp_factory(workdir: Path) -> Factory:
    def make(sessions: tuple[Session, ...], on_event: Callable[[exabgp.Event], None]) -> Process:
        return ExaBGP(workdir, sessions, on_event)

    return make


class BGPSpeaker:
    """Thread body :meth:`run`; :meth:`update` from the agent's passes, :meth:`leave` on stop."""

    def __init__(
        self,
        factory: Factory,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.factory = factory
        self.on_change = on_change
        self.clock = clock
        self.counters = Counters()
        self._plan = Plan()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._process: Process | None = None
        self._announced: dict[str, set[Route]] = {}
        self._states: dict[str, SessionStatus] = {}
        self._left = False
        self._given = False
        self._next_start = 0.0

    # --- inputs ---------------------------------------------------------------------------

    def update(self, plan: Plan) -> None:
        with self._lock:
            changed = plan != self._plan or not self._given
            self._plan, self._given = plan, True
        if changed:
            self._wake.set()

    def _on_event(self, event: exabgp.Event) -> None:
        """From the driver's reader thread."""
        if event is None:  # the helper's connection closed: ExaBGP is gone or going
            self._wake.set()
            return
        if not isinstance(event, exabgp.StateChange):
            return
        with self._lock:
            process = self._process
            names = [s.peer for s in process.sessions] if process else []
            peers = {str(s.address): s.peer for s in process.sessions} if process else {}
            peer = peers.get(event.peer)
            if peer is None or peer not in names:
                return
            before = self._states.get(peer)
            if before is not None and before.state == event.state:
                return
            self._states[peer] = SessionStatus(event.state, self.clock(), event.reason)
            self.counters.session_changes += 1
            if event.state is SessionState.ESTABLISHED:
                self.counters.established[peer] = self.counters.established.get(peer, 0) + 1
        log.info(
            "BGP session with %s (%s): %s%s",
            peer,
            event.peer,
            event.state,
            f" ({event.reason})" if event.reason else "",
        )
        self.on_change()

    # --- the loop -------------------------------------------------------------------------

    def step(self) -> None:
        """Bring ExaBGP to the current plan: sessions first, then routes."""
        with self._lock:
            plan, left = self._plan, self._left
        if left or not self._given:
            return
        process = self._process
        if process is not None and (process.sessions != plan.sessions or not process.alive):
            reason = "the sessions changed" if process.alive else "ExaBGP stopped"
            log.info("restarting ExaBGP: %s", reason)
            self._stop_process()
            process = None
        if process is None:
            if not plan.sessions or self.clock() < self._next_start:
                return
            process = self.factory(plan.sessions, self._on_event)
            with self._lock:  # events may come before start() returns
                self._process = process
                self._announced = {s.peer: set() for s in plan.sessions}
                self._states = {s.peer: SessionStatus(since=self.clock()) for s in plan.sessions}
            try:
                process.start()
            except (DriverError, OSError) as error:
                log.warning("cannot start ExaBGP: %s (retrying in %.0f s)", error, RETRY)
                self._next_start = self.clock() + RETRY
                with self._lock:
                    self._process, self._announced, self._states = None, {}, {}
                return
            self.counters.restarts += 1
            self.on_change()
        self._send_routes(process, plan.routes)

    def _send_routes(self, process: Process, wanted: Mapping[str, frozenset[Route]]) -> None:
        by_peer = {s.peer: s for s in process.sessions}
        lines: list[str] = []
        changes: list[tuple[str, Route, bool]] = []
        for peer, session in by_peer.items():
            have = self._announced.get(peer, set())
            want = wanted.get(peer, frozenset())
            for route in sorted(have - want):
                lines.append(exabgp.withdraw(session, route))
                changes.append((peer, route, False))
            for route in sorted(want - have):
                lines.append(exabgp.announce(session, route))
                changes.append((peer, route, True))
        if not lines:
            return
        acks = process.send(lines)
        with self._lock:
            for (peer, route, added), ok in zip(changes, acks, strict=True):
                if not ok:
                    self.counters.errors += 1
                    log.warning("ExaBGP refused: %s", exabgp.announce(by_peer[peer], route))
                    continue
                if added:
                    self._announced.setdefault(peer, set()).add(route)
                    self.counters.announcements += 1
                else:
                    self._announced.get(peer, set()).discard(route)
                    self.counters.withdrawals += 1
        self.on_change()

    def run(self, stop: threading.Event) -> None:
        """Thread body. It starts ExaBGP and so must outlive it: ExaBGP's parent-death signal
        fires when the thread that started it ends."""
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # the speaker must never take the agent down
                log.exception("BGP speaker step failed")
            self._wake.wait(1.0)
            self._wake.clear()

    def leave(self, settle: float = 0.5) -> None:
        """Withdraw every route, give the UPDATEs ``settle`` seconds to leave, stop ExaBGP."""
        with self._lock:
            self._left = True
            process = self._process
        self._wake.set()
        if process is None:
            return
        if process.alive and any(self._announced.values()):
            self._send_routes(process, {})
            log.info("withdrew every BGP route before stopping")
            time.sleep(settle)  # ExaBGP sends UPDATEs on its next loop after the ack
        self._stop_process()
        self.on_change()

    def abandon(self) -> None:
        """Stop at once without withdrawing anything (tests: a node that dies)."""
        with self._lock:
            self._left = True
            process, self._process = self._process, None
        if process is not None:
            process.stop(timeout=0.1)

    def _stop_process(self) -> None:
        with self._lock:
            process, self._process = self._process, None
            self._announced = {}
            self._states = {}
        if process is not None:
            process.stop()

    # --- what is reported -----------------------------------------------------------------

    @property
    def has_sessions(self) -> bool:
        """Whether this node peers with a router: it is then one of several active directors."""
        with self._lock:
            return bool(self._plan.sessions)

    def announced(self) -> dict[IPAddress, tuple[str, ...]]:
        """Each VIP this node announces now, with the peers whose session is established."""
        out: dict[IPAddress, list[str]] = {}
        with self._lock:
            for peer, routes in self._announced.items():
                status = self._states.get(peer)
                if status is None or status.state is not SessionState.ESTABLISHED:
                    continue
                for route in routes:
                    out.setdefault(route.vip, []).append(peer)
        return {vip: tuple(sorted(peers)) for vip, peers in out.items()}

    def status(self) -> dict[str, Any]:
        """IPVSNode ``status.bgp``: every session with its state, and the announced prefixes."""
        with self._lock:
            plan, states, announced = self._plan, dict(self._states), self._announced
            sessions = []
            for session in plan.sessions:
                current = states.get(session.peer, SessionStatus())
                entry: dict[str, Any] = {
                    "peer": session.peer,
                    "address": str(session.address),
                    "state": str(current.state),
                    "prefixes": len(announced.get(session.peer, ())),
                }
                if current.reason:
                    entry["message"] = current.reason[:1024]
                sessions.append(entry)
            for peer, problem in sorted(plan.problems.items()):
                sessions.append(
                    {
                        "peer": peer,
                        "state": str(SessionState.CONFIG_ERROR),
                        "message": problem,
                        "prefixes": 0,
                    }
                )
            prefixes = sorted({r.prefix for routes in announced.values() for r in routes})
        return {"sessions": sessions, "announced": prefixes}

    def session_states(self) -> dict[str, SessionState]:
        with self._lock:
            return {peer: s.state for peer, s in self._states.items()}
