"""Looking for drift beside the loop, so an endpoint change never waits for a whole-table read.

The periodic resync exists to find drift: someone's ``ipvsadm -C``, a flushed ruleset, a VIP
removed by hand. Done as a full pass it reads the whole kernel table and the host's tables on
the agent's one loop — seconds at 2000 services x 10 — and an endpoint change that arrives
meanwhile waits for all of it (issue 13: p99 of change-to-kernel within 1 s). The auditor
reads on a thread of its own, with its own netlink socket and ``nft`` runs, and compares the
reading with what the last pass left (:class:`Expected`); only drift wakes a full pass, which
repairs it as before.

A reading overlaps passes of the loop. It is judged only where they did not write: the
services a change pass wrote are left out, and a full pass during the reading makes it moot
(that pass read everything itself). The judgement is the planner's own diff, so the auditor
finds exactly what a full pass would change, less the steps of drains already under way.

What the reading does not cover — node sysctls, the real-server side of DR and TUN, routes
to DR real servers, the sync daemons — is left to a full pass every ``full_resync_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ipvs_agent.diff import DrainBook, diff, drain_step
from ipvs_agent.model import DesiredTable, DestKey, IPAddress, ObservedTable, ServiceKey
from ipvs_agent.ops import Op
from ipvs_agent.reconciler import Memory, PassResult, frozen_services

if TYPE_CHECKING:
    from ipvs_agent.host.nftables import LiveTable, Ruleset
    from ipvs_agent.kernel import Kernel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Expected:
    """What the kernel and the host hold after the pass numbered ``generation``."""

    generation: int
    #: The desired table the pass brought the kernel to.
    table: DesiredTable
    #: The kernel services the agent owns after the pass.
    owned: frozenset[ServiceKey]
    drain_seconds: Mapping[ServiceKey, int]
    #: Real servers draining after the pass, and since when (their steps are not drift).
    draining: DrainBook
    remove_now: frozenset[tuple[ServiceKey, DestKey]] = frozenset()
    #: Services left exactly as the kernel has them (their VirtualServer's planner failed).
    frozen: frozenset[ServiceKey] = frozenset()
    #: The nftables ruleset the pass wrote (None: the host keeps no tables, e.g. a test double).
    ruleset: Ruleset | None = None
    #: The virtual addresses the pass left on the agent's interface (None: not the agent's).
    addresses: frozenset[IPAddress] | None = None


def expected_after(generation: int, result: PassResult, memory: Memory) -> Expected:
    """What the pass that returned ``result`` left (``memory`` as that pass left it)."""
    p = result.plan
    frozen = frozen_services(p, memory.owners, set(result.owned)) if p.broken else frozenset()
    return Expected(
        generation,
        p.table,
        result.owned,
        p.drain_seconds,
        dict(memory.draining),
        p.remove_now,
        frozen,
        result.ruleset,
        result.addresses,
    )


@dataclass(frozen=True)
class HostReading:
    """The host's part of a reading: the agent's nftables tables and its interface's VIPs."""

    live: LiveTable | None
    addresses: frozenset[IPAddress]


@dataclass(frozen=True)
class Finding:
    """What an audit found: the kernel operations and host repairs a full pass would make."""

    ops: tuple[Op, ...] = ()
    host: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ops or self.host)

    def summary(self, most: int = 3) -> str:
        lines = [str(op) for op in self.ops[:most]] + list(self.host)
        more = len(self.ops) - most
        return "; ".join(lines) + (f" (and {more} more operations)" if more > 0 else "")


def kernel_drift(
    expected: Expected, observed: ObservedTable, now: float, skip: frozenset[ServiceKey]
) -> tuple[Op, ...]:
    """The operations a full pass would make on ``observed`` (services in ``skip`` and frozen
    ones left out), except the steps of drains that were under way."""
    left_out = skip | expected.frozen
    table = {k: v for k, v in expected.table.items() if k not in left_out}
    seen = {k: v for k, v in observed.items() if k not in left_out}
    owned = expected.owned - left_out
    d = diff(
        table,
        seen,
        owned.__contains__,
        expected.drain_seconds,
        expected.draining,
        now,
        expected.remove_now,
    )
    return tuple(op for op in d.ops if not drain_step(op, expected.draining))


def host_drift(
    expected: Expected,
    reading: HostReading | None,
    matches: Callable[[Ruleset, LiveTable | None], bool],
) -> tuple[str, ...]:
    """What a full pass would repair on the host: the tables, then the virtual addresses."""
    if reading is None:
        return ()
    found: list[str] = []
    if expected.ruleset is not None and not matches(expected.ruleset, reading.live):
        found.append(
            "the nftables tables ipvs-operator are gone"
            if reading.live is None
            else "the nftables tables ipvs-operator differ from what the agent wrote"
        )
    if expected.addresses is not None and reading.addresses != expected.addresses:
        missing = expected.addresses - reading.addresses
        extra = reading.addresses - expected.addresses
        parts = [f"{len(missing)} virtual addresses missing"] if missing else []
        parts += [f"{len(extra)} addresses not the agent's"] if extra else []
        found.append(", ".join(parts) + " on the agent's interface")
    return tuple(found)


class HostReader(Protocol):
    """Reads the host's part with resources of its own (``system.LinuxHost.reader``)."""

    def read(self) -> HostReading: ...

    def matches(self, ruleset: Ruleset, live: LiveTable | None) -> bool: ...

    def close(self) -> None: ...


class Written(Protocol):
    """The loop's record of its passes (``agent.Agent.written_since``)."""

    def __call__(self, generation: int) -> frozenset[ServiceKey] | None:
        """The services passes after ``generation`` wrote (None: a full pass ran)."""


#: How an audit ended: nothing found, drift, overtaken by a full pass, or a failed reading.
ENDINGS = ("clean", "drift", "overtaken", "failed")


class Auditor:
    """The thread that reads and judges when the loop asks (:meth:`request`).

    ``kernel`` and ``host`` must be its own (a second netlink socket, a second ``nft`` reader):
    the loop's may be in use at the same moment.
    """

    def __init__(
        self,
        kernel: Kernel,
        host: HostReader | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kernel = kernel
        self.host = host
        self.clock = clock
        #: Told how each audit ended (one of :data:`ENDINGS`) and how long it took.
        self.ended: Callable[[str, float], None] = lambda how, seconds: None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: Expected | None = None
        #: When the audit under way was asked for (monotonic; None: idle).
        self._busy_since: float | None = None

    def request(self, expected: Expected) -> bool:
        """Audit against ``expected`` soon; False when an audit is still under way."""
        with self._lock:
            if self._busy_since is not None:
                return False
            self._busy_since = time.monotonic()
            self._pending = expected
        self._wake.set()
        return True

    def busy_seconds(self) -> float:
        """How long the audit under way has been going (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def audit(self, expected: Expected, written: Written) -> Finding | None:
        """Read, then judge the reading against ``expected``; None when a full pass ran
        during the reading (its own reading replaces this one)."""
        observed = self.kernel.dump(expected.table)  # its Dests, not a third copy of each
        host = self.host.read() if self.host is not None else None
        skip = written(expected.generation)
        if skip is None:
            return None
        ops = kernel_drift(expected, observed, self.clock(), skip)
        if self.host is None:
            return Finding(ops)
        return Finding(ops, host_drift(expected, host, self.host.matches))

    def run(
        self,
        stop: threading.Event,
        written: Written,
        on_drift: Callable[[Finding | None], None],
    ) -> None:
        """Audit on each request until ``stop``. ``on_drift`` hears of drift, and of a failed
        reading with None (the loop then runs a full pass, which reports the error)."""
        try:
            while not stop.is_set():
                self._wake.wait(1.0)
                self._wake.clear()
                with self._lock:
                    expected, self._pending = self._pending, None
                if expected is None:
                    continue
                started = time.monotonic()
                try:
                    finding = self.audit(expected, written)
                except Exception as error:  # the full pass it asks for will say more
                    log.warning("drift audit could not read the table: %s", error)
                    self._end("failed", started)
                    on_drift(None)
                    continue
                if finding is None:
                    self._end("overtaken", started)
                elif finding:
                    log.info("drift found: %s", finding.summary())
                    self._end("drift", started)
                    on_drift(finding)
                else:
                    log.debug("drift audit: clean in %.2f s", time.monotonic() - started)
                    self._end("clean", started)
        finally:
            self.kernel.close()
            if self.host is not None:
                self.host.close()

    def _end(self, how: str, started: float) -> None:
        with self._lock:
            self._busy_since = None
        self.ended(how, time.monotonic() - started)
