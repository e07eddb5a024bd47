"""FakeKernel: an in-memory IPVS table with the kernel's semantics, for the planner's tests.

Each op goes through the same encoder as IPVSKernel and is decoded back, so the fake sees
exactly the values the kernel would (flags limited to MANAGED_FLAGS, ops that cannot be
encoded fail the same way), then applies the rules of ``ip_vs_ctl.c`` as observed on
Debian's 6.1 kernel:

* a missing *service* is ESRCH for every op but ADD_SERVICE (the kernel's check comes first);
* ADD_SERVICE of an existing one, ADD_DEST of an existing one: EEXIST;
* EDIT/DEL_DEST of a missing dest: ENOENT; unknown scheduler or persistence engine: ENOENT;
* lower threshold above upper threshold (even when the upper one is 0): ERANGE;
* tunnel type GUE with tunnel port 0: EINVAL, whatever the forwarding method;
* a dest of another address family than its service unless forwarding is TUNNEL: EINVAL;
* DEL_SERVICE takes the service's dests with it; EDIT keeps counters (not delete + add);
* new dests go to the head of the list, so dumps list them newest first.

Counters never move by themselves: tests set them with ``set_stats`` / ``set_dest_stats``.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Self

from ipvs_agent.kernel import KernelError, OpResult, apply_in_rounds, describe_error
from ipvs_agent.kernel import netlink as nl
from ipvs_agent.model import (
    SYNC_DEFAULT_GROUP,
    SYNC_DEFAULT_PORT,
    SYNC_DEFAULT_TTL,
    DesiredTable,
    Dest,
    DestKey,
    DestStats,
    ForwardingMethod,
    KernelInfo,
    ObservedDest,
    ObservedService,
    ObservedTable,
    Service,
    ServiceKey,
    ServiceStats,
    SyncDaemon,
    SyncState,
    Timeouts,
    TunnelType,
)
from ipvs_agent.ops import Op, OpKind

#: What Debian's 6.1 kernel offers (it predates twos).
DEFAULT_SCHEDULERS = (
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh",
)  # fmt: skip
DEFAULT_TUNNEL_TYPES = ("ipip", "gue", "gre")
PERSISTENCE_ENGINES = ("sip",)
DEFAULT_TIMEOUTS = Timeouts(tcp=900, tcp_fin=120, udp=300)
#: ip_vs_set_timeout takes ints: anything above INT_MAX comes out negative and is refused.
_INT_MAX = 2**31 - 1


@dataclass
class _Entry:
    service: Service
    stats: ServiceStats = field(default_factory=ServiceStats)
    #: insertion order; dumps list them reversed, like the kernel's list_add at the head
    dests: dict[DestKey, Dest] = field(default_factory=dict)
    dest_stats: dict[DestKey, DestStats] = field(default_factory=dict)


class FakeKernel:
    """In-memory ``kernel.Kernel``; see the module docstring for the semantics it copies."""

    def __init__(
        self,
        schedulers: Sequence[str] = DEFAULT_SCHEDULERS,
        tunnel_types: Sequence[str] = DEFAULT_TUNNEL_TYPES,
        release: str = "6.1.0-fake",
    ) -> None:
        self.schedulers = tuple(schedulers)
        self.tunnel_types = tuple(tunnel_types)
        self.release = release
        #: Schedulers a test marks as not loaded (of PRELOAD_SCHEDULERS: the real kernel can
        #: deadlock loading one on first use, so a service using one fails the test).
        self.unloaded_schedulers: set[str] = set()
        self.timeouts = DEFAULT_TIMEOUTS
        #: Every op that succeeded, in order, for tests that check what was done.
        self.applied: list[Op] = []
        self.dumps = 0
        #: Calls of read() (a change pass reads a few services instead of dumping).
        self.reads = 0
        self.closed = False
        self._table: dict[ServiceKey, _Entry] = {}
        self._failures: list[tuple[Callable[[Op], bool], int, str]] = []
        self._family = 0x20  # any id: the messages never leave the process
        #: Running sync daemons by state, as GET_DAEMON reports them (defaults filled in).
        self.sync_daemons: dict[SyncState, SyncDaemon] = {}
        #: Interfaces a sync daemon may bind to (None: any name).
        self.interfaces: set[str] | None = None

    # --- test controls -------------------------------------------------------------------

    def set_stats(self, key: ServiceKey, stats: ServiceStats) -> None:
        self._table[key].stats = stats

    def set_dest_stats(self, key: ServiceKey, dest: DestKey, stats: DestStats) -> None:
        entry = self._table[key]
        if dest not in entry.dests:
            raise KeyError(dest)
        entry.dest_stats[dest] = stats

    def fail(self, match: Callable[[Op], bool], code: int, message: str = "") -> None:
        """Make every op for which ``match`` is true fail with ``code`` (until cleared)."""
        self._failures.append((match, code, message))

    def clear_failures(self) -> None:
        self._failures.clear()

    # --- Kernel protocol -----------------------------------------------------------------

    def dump(self, expected: DesiredTable | None = None) -> ObservedTable:
        """``expected`` is not needed: the table already holds the written ops' Dests."""
        self._check_open()
        self.dumps += 1
        return {key: self._observed(entry) for key, entry in self._table.items()}

    def read(
        self, keys: Collection[ServiceKey], expected: DesiredTable | None = None
    ) -> ObservedTable:
        self._check_open()
        self.reads += 1
        return {key: self._observed(self._table[key]) for key in keys if key in self._table}

    @staticmethod
    def _observed(entry: _Entry) -> ObservedService:
        dests = {
            dest_key: ObservedDest(dest, entry.dest_stats.get(dest_key, nl.ZERO_DEST_STATS))
            for dest_key, dest in reversed(entry.dests.items())
        }
        return ObservedService(entry.service, dests, entry.stats)

    def apply(self, ops: Sequence[Op]) -> list[OpResult]:
        self._check_open()
        return apply_in_rounds(ops, lambda indices: [self._apply_one(ops[i]) for i in indices])

    def _apply_one(self, op: Op) -> OpResult:
        code, detail = self._apply(op)
        if code == 0:
            self.applied.append(op)
        return OpResult(op, code, describe_error(op, code, detail))

    def info(self) -> KernelInfo:
        self._check_open()
        return KernelInfo(
            "1.2.1", 4096, self.release, self.schedulers, self.tunnel_types, self.unloaded()
        )

    def unloaded(self) -> tuple[str, ...]:
        return tuple(s for s in self.schedulers if s in self.unloaded_schedulers)

    def set_timeouts(self, timeouts: Timeouts) -> None:
        self._check_open()
        values = (timeouts.tcp, timeouts.tcp_fin, timeouts.udp)
        if any(not 0 <= value <= _INT_MAX for value in values):
            raise KernelError(errno.EINVAL, "SET_CONFIG: Invalid argument")
        current = self.timeouts
        self.timeouts = Timeouts(
            tcp=timeouts.tcp or current.tcp,
            tcp_fin=timeouts.tcp_fin or current.tcp_fin,
            udp=timeouts.udp or current.udp,
        )

    def get_timeouts(self) -> Timeouts:
        self._check_open()
        return self.timeouts

    def daemons(self) -> tuple[SyncDaemon, ...]:
        self._check_open()
        return tuple(self.sync_daemons[s] for s in sorted(self.sync_daemons))

    def start_daemon(self, daemon: SyncDaemon) -> None:
        """As start_sync_thread: one daemon per state, an existing interface, no cross-family
        TUN dest anywhere in the table (the sync protocol cannot carry one)."""
        self._check_open()
        try:
            nl.encode_daemon(daemon)
        except nl.CodecError as error:
            raise KernelError(error.errno, str(error)) from None
        if daemon.state in self.sync_daemons:
            raise KernelError(errno.EEXIST, "NEW_DAEMON: File exists")
        if self.interfaces is not None and daemon.interface not in self.interfaces:
            raise KernelError(errno.ENODEV, "NEW_DAEMON: No such device")
        if any(d.af is not None for e in self._table.values() for d in e.dests.values()):
            raise KernelError(errno.EINVAL, "NEW_DAEMON: Invalid argument")
        self.sync_daemons[daemon.state] = replace(
            daemon,
            max_len=daemon.max_len or 1472,
            group=daemon.group or SYNC_DEFAULT_GROUP,
            port=daemon.port or SYNC_DEFAULT_PORT,
            ttl=daemon.ttl or SYNC_DEFAULT_TTL,
        )

    def stop_daemon(self, state: SyncState) -> None:
        self._check_open()
        if self.sync_daemons.pop(state, None) is None:
            raise KernelError(errno.ESRCH, "DEL_DAEMON: No such process")

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the kernel's rules --------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise KernelError(errno.EBADF, "kernel connection closed")

    def _apply(self, op: Op) -> tuple[int, str]:
        for match, code, message in self._failures:
            if match(op):
                return code, message
        try:
            seen = nl.decode_op(nl.encode_op(op, self._family, seq=1))
        except nl.CodecError as error:
            return error.errno, str(error)
        entry = self._table.get(seen.service.key)
        if seen.kind is OpKind.ADD_SERVICE:
            if entry is not None:
                return errno.EEXIST, ""
            return self._set_service(seen.service, _Entry(seen.service))
        if entry is None:
            return errno.ESRCH, ""
        if seen.kind is OpKind.EDIT_SERVICE:
            return self._set_service(seen.service, entry)
        if seen.kind is OpKind.DEL_SERVICE:
            del self._table[seen.service.key]
            return 0, ""
        assert seen.dest is not None  # decode_op gives dest ops a dest
        return self._dest_op(seen.kind, entry, seen.dest)

    def _set_service(self, service: Service, entry: _Entry) -> tuple[int, str]:
        if service.scheduler not in self.schedulers:
            return errno.ENOENT, f"scheduler {service.scheduler} not available"
        if service.scheduler in self.unloaded_schedulers:
            raise AssertionError(f"scheduler {service.scheduler} used before its module was loaded")
        if service.pe_name and service.pe_name not in PERSISTENCE_ENGINES:
            return errno.ENOENT, f"persistence engine {service.pe_name} not available"
        entry.service = service
        self._table[service.key] = entry
        return 0, ""

    def _dest_op(self, kind: OpKind, entry: _Entry, dest: Dest) -> tuple[int, str]:
        # decode_op leaves dest.af set only when it differs from the service's
        cross_family = dest.af is not None and kind is not OpKind.DEL_DEST
        if cross_family and dest.forwarding is not ForwardingMethod.TUNNEL:
            return errno.EINVAL, "only TUN can reach a real server of another family"
        exists = dest.key in entry.dests
        if kind is OpKind.DEL_DEST:
            if not exists:
                return errno.ENOENT, ""
            del entry.dests[dest.key]
            entry.dest_stats.pop(dest.key, None)
            return 0, ""
        if dest.lower_threshold > dest.upper_threshold:
            return errno.ERANGE, ""
        if dest.tunnel_type is TunnelType.GUE and dest.tunnel_port == 0:
            return errno.EINVAL, "GUE needs a tunnel port"
        if kind is OpKind.ADD_DEST and exists:
            return errno.EEXIST, ""
        if kind is OpKind.EDIT_DEST and not exists:
            return errno.ENOENT, ""
        entry.dests[dest.key] = dest
        return 0, ""
