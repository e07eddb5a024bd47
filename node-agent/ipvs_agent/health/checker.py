"""The shell around the decisions: one timer heap, an injected clock, probes on a few threads.

The agent loop calls :meth:`Checker.configure` with the targets of its snapshot and takes
:meth:`Checker.adjustments` as an input of the planner; the checker never touches IPVS. When a
result changes what the planner would be given — a real server goes down or comes back, a
feedback weight passes its write threshold, an agent's answers expire — it calls ``wake``
(the agent's ``changed`` event), so the kernel follows within one reconcile pass rather than
at the next resync.

Each probe and poll has a due time in one heap. The first comes at a random point of its
first interval (keepalived's warm-up), so N directors and M real servers do not probe in step;
the next comes one interval after the last started. Probes run on a bounded pool of threads,
each bounded by its timeout, which the API keeps below the interval: one probe per target at
a time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from ipvs_agent.health import feedback, machine, probes
from ipvs_agent.health.feedback import Command, Feed, Reply
from ipvs_agent.health.targets import FeedTarget, Poll, Probe, Ref, Targets
from ipvs_agent.health.verdict import Adjustment, Adjustments, Attention, RealServerKey
from ipvs_api.types import OnFailure

log = logging.getLogger(__name__)

ProbeFn = Callable[[Probe], probes.Result]
AskFn = Callable[[Poll], tuple[bytes, str]]
Submit = Callable[[Callable[[], None]], object]


class Observer(Protocol):
    """What the checker tells metrics (``health.metrics``)."""

    def probed(self, kind: str, seconds: float, ok: bool) -> None: ...

    def transition(self, up: bool) -> None: ...

    def polled(self, ok: bool) -> None: ...


def run_probe(p: Probe) -> probes.Result:
    return probes.probe(p.check, p.address, p.port)


def run_poll(p: Poll) -> tuple[bytes, str]:
    return probes.ask_agent(p.address, p.port, p.send, p.timeout)


@dataclass
class _ProbeState:
    health: machine.Health
    due: float
    started: float = 0.0
    running: bool = False
    seconds: float | None = None


@dataclass
class _PollState:
    due: float
    started: float = 0.0
    running: bool = False
    #: Why the last poll failed ("" when it was answered).
    error: str = ""


@dataclass(frozen=True)
class RealServerState:
    """One real server of one VirtualServer, for metrics."""

    virtual_server: str
    real_server: RealServerKey
    up: bool | None = None
    probe_seconds: float | None = None
    weight: int | None = None
    load: float | None = None
    stale: bool = False


@dataclass
class _Entries:
    probes: dict[Probe, _ProbeState] = field(default_factory=dict)
    polls: dict[Poll, _PollState] = field(default_factory=dict)
    feeds: dict[Ref, Feed] = field(default_factory=dict)


def enter_netns(netns: str | None) -> None:
    """Move the calling (pool) thread into ``netns`` for good: its probes start there."""
    if netns is None:
        return
    from ipvs_agent.host._netns import _setns, netns_path

    fd = os.open(netns_path(netns), os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


class Checker:
    """Runs the probes and polls of the current targets and keeps their decisions.

    ``submit`` runs a job (default: a pool of ``workers`` threads, in ``netns`` when given);
    tests pass one that runs it at once, and a ``clock`` they move by hand.
    """

    def __init__(
        self,
        wake: Callable[[], None] = lambda: None,
        *,
        clock: Callable[[], float] = time.monotonic,
        probe: ProbeFn = run_probe,
        ask: AskFn = run_poll,
        rng: random.Random | None = None,
        submit: Submit | None = None,
        workers: int = 16,
        netns: str | None = None,
        observer: Observer | None = None,
    ) -> None:
        self._wake = wake
        self._clock = clock
        self._probe = probe
        self._ask = ask
        self._rng = rng or random.Random()
        #: Told of every probe, transition and poll (metrics); may be set after construction.
        self.observer = observer
        self._pool: ThreadPoolExecutor | None = None
        if submit is None:
            self._pool = ThreadPoolExecutor(
                workers, "probe", initializer=enter_netns, initargs=(netns,)
            )
            submit = self._pool.submit
        self._submit = submit
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._targets = Targets()
        self._entries = _Entries()
        self._heap: list[tuple[float, int, Probe | Poll]] = []
        self._seq = itertools.count()
        #: The decisions as last computed: a result that changes them wakes the agent loop.
        self._published: Adjustments = {}

    # ------------------------------------------------------------ the agent loop's side

    def configure(self, targets: Targets) -> None:
        """Check exactly these targets from now on; state of unchanged ones is kept."""
        with self._lock:
            now = self._clock()
            e = self._entries
            for p in list(e.probes):
                if p not in targets.probes:
                    del e.probes[p]
            for p in targets.probes:
                if p not in e.probes:
                    due = now + self._rng.uniform(0, p.check.interval)
                    e.probes[p] = _ProbeState(machine.start(p.thresholds), due)
                    self._push(due, p)
            polls = {ft.poll for ft in targets.feeds.values()}
            for q in list(e.polls):
                if q not in polls:
                    del e.polls[q]
            for q in polls:
                if q not in e.polls:
                    due = now + self._rng.uniform(0, q.period)
                    e.polls[q] = _PollState(due)
                    self._push(due, q)
            old = self._targets.feeds
            for ref in list(e.feeds):
                ft = targets.feeds.get(ref)
                was = old.get(ref)
                if ft is None or was is None or (ft.poll, ft.law) != (was.poll, was.law):
                    del e.feeds[ref]
                else:
                    e.feeds[ref] = feedback.reconfigured(e.feeds[ref], ft.configured, now)
            for ref, ft in targets.feeds.items():
                if ref not in e.feeds:
                    e.feeds[ref] = feedback.start(ft.configured, now)
            self._targets = targets
            self._published = self._compute(now)
            self._cond.notify_all()

    def adjustments(self) -> Adjustments:
        """What the planner should apply now (also remembered, to know when to wake)."""
        with self._lock:
            self._published = self._compute(self._clock())
            return self._published

    # ------------------------------------------------------------ the timer heap

    def _push(self, due: float, item: Probe | Poll) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), item))

    def next_due(self) -> float | None:
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def run_due(self) -> int:
        """Start every probe and poll whose time has come; returns how many."""
        jobs: list[Callable[[], None]] = []
        with self._lock:
            now = self._clock()
            e = self._entries
            while self._heap and self._heap[0][0] <= now:
                due, _, item = heapq.heappop(self._heap)
                state = e.probes.get(item) if isinstance(item, Probe) else e.polls.get(item)
                if state is None or state.running or state.due != due:
                    continue  # gone, or rescheduled since
                state.running, state.started = True, now
                jobs.append(self._job(item))
        for job in jobs:
            self._submit(job)
        return len(jobs)

    def _job(self, item: Probe | Poll) -> Callable[[], None]:
        if isinstance(item, Probe):
            return lambda: self._finish_probe(item, self._safely(self._probe, item))
        return lambda: self._finish_poll(item, self._ask_safely(item))

    @staticmethod
    def _safely(fn: ProbeFn, item: Probe) -> probes.Result:
        if item.refused:
            return probes.Result(False, item.refused)
        try:
            return fn(item)
        except Exception as error:  # a probe bug is a failed probe, never a dead checker
            log.exception("probe of %s:%s failed unexpectedly", item.address, item.port)
            return probes.Result(False, f"internal error: {type(error).__name__}")

    def _ask_safely(self, item: Poll) -> tuple[bytes, str]:
        if item.refused:
            return b"", item.refused
        try:
            return self._ask(item)
        except Exception as error:
            log.exception("feedback poll of %s:%s failed unexpectedly", item.address, item.port)
            return b"", f"internal error: {type(error).__name__}"

    def _finish_probe(self, p: Probe, result: probes.Result) -> None:
        with self._lock:
            now = self._clock()
            state = self._entries.probes.get(p)
            if state is None:
                return
            was = state.health.up
            state.health = machine.observe(state.health, result.ok, p.thresholds, result.detail)
            state.running, state.seconds = False, result.seconds
            state.due = max(state.started + p.check.interval, now)
            self._push(state.due, p)
            changed = self._changed(now)
            self._cond.notify_all()
        if self.observer is not None:
            self.observer.probed(str(p.check.type), result.seconds, result.ok)
            if state.health.up != was:
                self.observer.transition(state.health.up)
        if state.health.up != was:
            log.info(
                "real server %s:%s is %s (%s check)%s",
                p.address,
                p.port,
                "up" if state.health.up else "down",
                p.check.type,
                f": {state.health.detail}" if state.health.detail else "",
            )
        if changed:
            self._wake()

    def _finish_poll(self, q: Poll, answer: tuple[bytes, str]) -> None:
        data, error = answer
        reply = feedback.parse_reply(data) if data else None
        if data and reply is None:
            error = f"no known word in {data[:64]!r}"
        with self._lock:
            now = self._clock()
            e = self._entries
            state = e.polls.get(q)
            if state is None:
                return
            state.running = False
            state.error = error
            state.due = max(state.started + q.period, now)
            self._push(state.due, q)
            for ref, ft in self._targets.feeds.items():
                if ft.poll == q and ref in e.feeds:
                    mean = self._mean(ref, ft, reply, now) if ft.law.balance else None
                    e.feeds[ref] = feedback.step(e.feeds[ref], reply, now, ft.law, mean)
            changed = self._changed(now)
            self._cond.notify_all()
        if self.observer is not None:
            self.observer.polled(reply is not None)
        if changed:
            self._wake()

    def _mean(self, ref: Ref, ft: FeedTarget, reply: Reply | None, now: float) -> float | None:
        """The Balance law's reference for one real server: with the loads of the other real
        servers of its VirtualServer (polled by their own schedules, so up to a period old)."""
        others = (f for r, f in self._entries.feeds.items() if r[0] == ref[0] and r != ref)
        return feedback.mean_load(reply.load if reply else None, others, now, ft.law)

    def _changed(self, now: float) -> bool:
        """Whether the decisions moved since they were last computed (then remembered)."""
        new = self._compute(now)
        if new == self._published:
            return False
        self._published = new
        return True

    # ------------------------------------------------------------ decisions → adjustments

    def _compute(self, now: float) -> Adjustments:
        out: dict[str, dict[RealServerKey, Adjustment]] = {}
        e, t = self._entries, self._targets
        for p, state in e.probes.items():
            if state.health.up:
                continue
            for vs, key in t.probes.get(p, ()):
                remove = t.on_failure.get(vs) is OnFailure.REMOVE
                message = state.health.detail or "not yet checked (initialState Down)"
                out.setdefault(vs, {})[key] = Adjustment(
                    down=True, remove=remove, attention=Attention.DOWN, message=message
                )
        for ref, feed in e.feeds.items():
            vs, key = ref
            ft = t.feeds.get(ref)
            if ft is None or key in out.get(vs, {}):
                continue  # its health decides
            adjustment = self._feed_adjustment(ft, feed, now)
            if adjustment is not None:
                out.setdefault(vs, {})[key] = adjustment
        return out

    def _feed_adjustment(self, ft: FeedTarget, feed: Feed, now: float) -> Adjustment | None:
        v = feedback.verdict(feed, now, ft.law)
        # Only the command: the rest of an answer (its percentage) changes every poll, and a
        # changed message would mean a reconcile pass and a status write each time.
        said = f"feedback agent said {v.command}"
        if v.stale:
            poll = self._entries.polls.get(ft.poll)
            why = poll.error if poll and poll.error else "no answer"
            silent = f"feedback agent silent for {ft.law.expiry:g}s ({why})"
            return Adjustment(attention=Attention.STALE, message=silent)
        if v.command is Command.DRAIN:
            return Adjustment(down=True, attention=Attention.DRAIN, message=said)
        if v.command is Command.DOWN:
            return Adjustment(down=True, attention=Attention.DOWN, message=said)
        if v.weight is None and v.maxconn is None:
            return None
        return Adjustment(weight=v.weight, upper_threshold=v.maxconn)

    # ------------------------------------------------------------ the thread

    def run(self, stop: threading.Event) -> None:
        """Thread body: start due probes and polls until ``stop``."""
        try:
            while not stop.is_set():
                self.run_due()
                with self._lock:
                    wait = (self._heap[0][0] - self._clock()) if self._heap else 1.0
                    self._cond.wait(min(max(wait, 0.0), 1.0))
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="health", daemon=True)
        thread.start()
        return thread

    def states(self) -> list[RealServerState]:
        """Every checked or polled real server, for metrics."""
        with self._lock:
            now = self._clock()
            rows: dict[Ref, RealServerState] = {}
            for p, state in self._entries.probes.items():
                for ref in self._targets.probes.get(p, ()):
                    rows[ref] = RealServerState(ref[0], ref[1], state.health.up, state.seconds)
            for ref, feed in self._entries.feeds.items():
                ft = self._targets.feeds.get(ref)
                if ft is None:
                    continue
                v = feedback.verdict(feed, now, ft.law)
                was = rows.get(ref, RealServerState(ref[0], ref[1]))
                weight = v.weight if v.weight is not None else ft.configured
                rows[ref] = RealServerState(
                    was.virtual_server,
                    was.real_server,
                    was.up,
                    was.probe_seconds,
                    weight,
                    None if v.stale else feed.load,
                    v.stale,
                )
            return [rows[ref] for ref in sorted(rows)]


__all__ = ["Checker", "Observer", "RealServerState", "enter_netns"]
