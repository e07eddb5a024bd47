"""The agent's kernel layer: IPVS as a table of values, read with dump() and changed with apply().

``Kernel`` is the interface the planner is written against. ``IPVSKernel`` (kernel.ipvs) talks
generic netlink to the real thing; ``FakeKernel`` (kernel.fake) is an in-memory stand-in with the
kernel's semantics for unit tests. Neither is imported here, so importing the interface does not
pull in pyroute2.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Protocol, Self

from ipvs_agent.model import (
    DesiredTable,
    KernelInfo,
    ObservedTable,
    ServiceKey,
    SyncDaemon,
    SyncState,
    Timeouts,
)
from ipvs_agent.ops import Op, OpKind

__all__ = ["NOT_SENT", "Kernel", "KernelError", "OpResult", "apply_in_rounds", "describe_error"]

_SERVICE_OPS = frozenset({OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE, OpKind.DEL_SERVICE})

#: What an errno means for an IPVS op, in LVS words (ipvsadm's own wording where it has one):
#: the kernel rarely attaches a message, and "No such process" for a missing service helps no one.
_MEANINGS: dict[tuple[int, bool | None], str] = {
    (errno.ESRCH, None): "virtual service not found",
    (errno.EEXIST, True): "virtual service already exists",
    (errno.EEXIST, False): "real server already exists",
    (errno.ENOENT, True): "scheduler or persistence engine not found",
    (errno.ENOENT, False): "real server not found",
    (errno.ERANGE, False): "weight below zero or lower threshold above upper threshold",
    (errno.EAFNOSUPPORT, None): "address family not supported",
}


@dataclass(frozen=True)
class OpResult:
    """Outcome of one op: ``error`` is the kernel's errno (0 = done), ``message`` says why."""

    op: Op
    error: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error == 0


def describe_error(op: Op, code: int, detail: str = "") -> str:
    """The message reported with a failed op: meaning, kernel detail, strerror."""
    if code == 0:
        return ""
    is_service = op.kind in _SERVICE_OPS
    meaning = _MEANINGS.get((code, is_service)) or _MEANINGS.get((code, None), "")
    parts = [p for p in (meaning, detail) if p]
    parts.append(f"{errno.errorcode.get(code, code)}: {os.strerror(code)}")
    return "; ".join(parts)


#: The error of an op that was never sent because the ADD_SERVICE it depends on failed.
NOT_SENT = errno.ECANCELED


def apply_in_rounds(
    ops: Sequence[Op], send: Callable[[Sequence[int]], list[OpResult]]
) -> list[OpResult]:
    """Run ``ops`` through ``send`` (which runs the ops at the given indices, in order) so that
    no op of a service this call creates goes out before the kernel has confirmed it.

    Between the agent's dump and its apply another program may create the same service: the
    ADD_SERVICE then fails with EEXIST, and real servers sent in the same batch would land in
    the foreign service. So every other op goes in a first round, with the ADD_SERVICEs; the
    ops of each new service follow in a second round only if its ADD_SERVICE succeeded, and
    fail with :data:`NOT_SENT` otherwise. One extra round trip, only when services are created.
    """
    added: set[ServiceKey] = set()
    first: list[int] = []
    for index, op in enumerate(ops):  # an op depends on an ADD_SERVICE before it in the list
        if op.kind is OpKind.ADD_SERVICE or op.service.key not in added:
            first.append(index)
        if op.kind is OpKind.ADD_SERVICE:
            added.add(op.service.key)
    results: list[OpResult | None] = [None] * len(ops)
    for index, result in zip(first, send(first), strict=True):
        results[index] = result
    adds = [r for r in results if r is not None and r.op.kind is OpKind.ADD_SERVICE]
    failed = {r.op.service.key for r in adds} - {r.op.service.key for r in adds if r.ok}
    later: list[int] = []
    for index, op in enumerate(ops):
        if results[index] is not None:
            continue
        if op.service.key in failed:
            message = "not sent: adding its virtual service failed"
            results[index] = OpResult(op, NOT_SENT, message)
        else:
            later.append(index)
    if later:
        for index, result in zip(later, send(later), strict=True):
            results[index] = result
    return [r for r in results if r is not None]


#: Schedulers whose modules keep state in every network namespace (a sysctl each): loading one
#: takes the lock that network-namespace teardown holds. The kernel loads a scheduler's module
#: on first use from inside the IPVS command, holding the IPVS lock that teardown then waits
#: for, so that first use deadlocks when a namespace is being removed at the time (pods
#: stopping on the node): the command and the namespace cleanup hang for good, and with them
#: (by the locks) the node's later namespace changes. Reproduced in the test VM with 40
#: namespaces removed just before (docs/agent.md); the other schedulers load safely on first
#: use. These must be loaded beforehand, at boot or by the chart's init container.
PRELOAD_SCHEDULERS: Final = frozenset({"lblc", "lblcr"})


class KernelError(OSError):
    """A whole kernel call failed (socket, dump, config), as opposed to one op of a batch."""


class Kernel(Protocol):
    """What the planner needs from the kernel's IPVS table."""

    def dump(self, expected: DesiredTable | None = None) -> ObservedTable:
        """Every service with its dests, settings and counters.

        Active/inactive/persistent connection counts are live; the traffic counters
        (connections, packets, bytes) are as of the kernel's last 2-second estimator tick.
        ``expected`` (the table the caller wants) may lend its equal Dest objects to the
        answer, so the two tables share them; it never changes what is read.
        """
        ...

    def read(
        self, keys: Collection[ServiceKey], expected: DesiredTable | None = None
    ) -> ObservedTable:
        """Only these services, as :meth:`dump` has them (``expected`` too); one the kernel
        lacks is left out. What a change pass needs instead of the whole table."""
        ...

    def apply(self, ops: Sequence[Op]) -> list[OpResult]:
        """Run ``ops`` in order; one result per op, a failed op never stops the others."""
        ...

    def info(self) -> KernelInfo:
        """IPVS version, connection table size, release, schedulers and tunnel types."""
        ...

    def unloaded(self) -> tuple[str, ...]:
        """The :data:`PRELOAD_SCHEDULERS` this kernel has but has not loaded now: what
        :attr:`KernelInfo.unloaded` would say if asked again (an admin may load them)."""
        ...

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Set the TCP / TCP FIN / UDP connection timeouts (0 leaves one unchanged)."""
        ...

    def get_timeouts(self) -> Timeouts: ...

    def daemons(self) -> tuple[SyncDaemon, ...]:
        """The connection sync daemons running in this network namespace (GET_DAEMON)."""
        ...

    def start_daemon(self, daemon: SyncDaemon) -> None:
        """Start one sync daemon (NEW_DAEMON); KernelError EEXIST if one of its state runs."""
        ...

    def stop_daemon(self, state: SyncState) -> None:
        """Stop the master or the backup daemon (DEL_DAEMON); ESRCH if none runs."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
