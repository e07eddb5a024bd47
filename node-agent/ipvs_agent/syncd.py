"""Director connection sync: the kernel's IPVS sync daemons, a master and a backup on every
director, so a flow that moves to another director keeps its real server.

The master multicasts the connections its director creates (and refreshes them as they go on);
the backup enters the other directors' connections into its own table, so when the routers
move a flow here (a director was lost, ECMP rehashed) the packet finds its connection and goes
to the same real server — any scheduler, any forwarding method. The kernel runs both at once
(``ip_vs_sync.c``); the master turns multicast loopback off, so a director never learns its own.

:func:`plan_daemons` is pure. The agent touches only daemons it started: it records each in its
state file *before* starting it, and a daemon it did not record (keepalived's ``lvs_sync_daemon``,
``ipvsadm --start-daemon`` by hand) is left as it is and reported.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ipvs_agent.host.state import State
from ipvs_agent.kernel import Kernel, KernelError
from ipvs_agent.model import SyncDaemon, SyncState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncSettings:
    """``ipvs-agent run --sync-*``: where and how the directors exchange connections."""

    interface: str
    sync_id: int = 0
    max_len: int = 0
    group: str = ""
    port: int = 0
    ttl: int = 0

    def daemons(self) -> tuple[SyncDaemon, SyncDaemon]:
        """The master and the backup: same interface, sync id, group and port, so every
        director's backup hears every other director's master."""
        base = SyncDaemon(
            SyncState.MASTER,
            self.interface,
            self.sync_id,
            self.max_len,
            self.group,
            self.port,
            self.ttl,
        )
        return base, replace(base, state=SyncState.BACKUP)


@dataclass(frozen=True)
class DaemonPlan:
    #: States whose daemon the agent stops (its own, with other settings or not wanted).
    stop: tuple[SyncState, ...] = ()
    #: Daemons the agent starts (recorded first).
    start: tuple[SyncDaemon, ...] = ()
    #: Running daemons the agent did not start: left alone.
    foreign: tuple[SyncDaemon, ...] = ()


def plan_daemons(
    wanted: Iterable[SyncDaemon],
    running: Iterable[SyncDaemon],
    recorded: Iterable[SyncDaemon],
) -> DaemonPlan:
    """What to stop and start so the agent's daemons are ``wanted`` (empty: none)."""
    want = {d.state: d for d in wanted}
    have = {d.state: d for d in running}
    mine = {d.state: d for d in recorded}
    stop: list[SyncState] = []
    start: list[SyncDaemon] = []
    foreign: list[SyncDaemon] = []
    for state in (SyncState.MASTER, SyncState.BACKUP):
        w, r, m = want.get(state), have.get(state), mine.get(state)
        if r is not None and (m is None or not m.matches(r)):
            foreign.append(r)  # not ours (or replaced by someone since): hands off
            continue
        if r is not None and w is not None and w.matches(r):
            continue
        if r is not None:
            stop.append(state)
        if w is not None:
            start.append(w)
    return DaemonPlan(tuple(stop), tuple(start), tuple(foreign))


class StateStore(Protocol):
    def load(self) -> State: ...

    def save(self, state: State) -> None: ...


class SyncDaemons:
    """Keeps the agent's sync daemons as ``settings`` say (None: none of the agent's)."""

    def __init__(self, settings: SyncSettings | None, store: StateStore) -> None:
        self.settings = settings
        self.store = store
        self.running: tuple[SyncDaemon, ...] = ()
        self.foreign: tuple[SyncDaemon, ...] = ()
        self.error = ""

    def ensure(self, kernel: Kernel) -> None:
        wanted = self.settings.daemons() if self.settings is not None else ()
        state = self.store.load()
        try:
            running = kernel.daemons()
        except KernelError as error:
            self.error = f"cannot list the sync daemons: {error}"
            log.warning("%s", self.error)
            return
        plan = plan_daemons(wanted, running, state.sync_daemons)
        errors: list[str] = []
        kept = {d.state: d for d in state.sync_daemons}
        for daemon in plan.foreign:
            if daemon.state in {d.state for d in wanted}:
                errors.append(f"a {daemon.state.name.lower()} sync daemon of another program runs")
        for which in plan.stop:
            try:
                kernel.stop_daemon(which)
                log.info("stopped the %s sync daemon", which.name.lower())
            except KernelError as error:
                errors.append(f"stopping the {which.name.lower()} sync daemon: {error}")
                continue
            kept.pop(which, None)
            self.store.save(replace(self.store.load(), sync_daemons=tuple(kept.values())))
        for daemon in plan.start:
            kept[daemon.state] = daemon  # recorded before it exists: never a stray daemon
            self.store.save(replace(self.store.load(), sync_daemons=tuple(kept.values())))
            try:
                kernel.start_daemon(daemon)
                log.info(
                    "started the %s sync daemon on %s (sync id %d)",
                    daemon.state.name.lower(),
                    daemon.interface,
                    daemon.sync_id,
                )
            except KernelError as error:
                errors.append(f"starting the {daemon.state.name.lower()} sync daemon: {error}")
                kept.pop(daemon.state, None)
                self.store.save(replace(self.store.load(), sync_daemons=tuple(kept.values())))
        try:
            self.running = kernel.daemons()
        except KernelError:
            self.running = ()
        self.foreign = plan.foreign
        self.error = "; ".join(errors)
        if self.error:
            log.warning("connection sync: %s", self.error)

    def stop_all(self, kernel: Kernel) -> list[str]:
        """Stop the daemons the agent started (``ipvs-agent cleanup``); one line per stop."""
        saved = SyncDaemons(None, self.store)
        before = {d.state for d in self.store.load().sync_daemons}
        saved.ensure(kernel)
        after = {d.state for d in self.store.load().sync_daemons}
        if saved.error:
            raise KernelError(0, saved.error)
        return [f"stopped the {s.name.lower()} sync daemon" for s in sorted(before - after)]

    def status(self) -> dict[str, Any]:
        """IPVSNode ``status.connectionSync``."""
        mine = {d.state for d in self.store.load().sync_daemons}
        daemons = [
            {
                "state": d.state.name.capitalize(),
                "interface": d.interface,
                "syncID": d.sync_id,
                "group": d.group,
                "port": d.port,
                "owner": "Agent" if d.state in mine and d not in self.foreign else "Other",
            }
            for d in self.running
        ]
        out: dict[str, Any] = {"daemons": daemons}
        if self.error:
            out["message"] = self.error[:1024]
        return out
