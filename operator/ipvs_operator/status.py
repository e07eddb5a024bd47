"""A VirtualServer's ``status`` and the Events its changes deserve. Pure.

Inputs are what the operator knows — the allocation, the real-server counts and the agents'
IPVSNode reports — and the output is the whole status, so the status written is exactly what
the unit tests see. Conditions go through :func:`ipvs_api.conditions.set_condition`, so
``lastTransitionTime`` moves only when a condition's status does.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from ipvs_api import conditions
from ipvs_api.types import IPAddress
from ipvs_operator import health
from ipvs_operator.backends import Counts

NO_DIRECTORS: Final = "NoDirectors"
PROGRAMMING_FAILED: Final = "ProgrammingFailed"
SERVING: Final = "Serving"
#: Nodes named in a condition message; the rest are counted.
_NAMED_NODES: Final = 5


@dataclass(frozen=True, slots=True)
class DirectorReport:
    """One node's IPVSNode entry for a VirtualServer it directs."""

    node: str
    state: str
    generation: int | None = None
    reason: str = ""
    message: str = ""
    #: Real servers it names for their health (taken out, drained, or a silent agent).
    health: tuple[health.RealServerReport, ...] = ()
    #: How the node announces the address to the network (``Layer2``, ``BGP``), if it does.
    announcement: str | None = None


def live_reports(
    reports: Mapping[str, DirectorReport],
    alive: Collection[str] | None,
    stale: Collection[str] = frozenset(),
) -> dict[str, DirectorReport]:
    """The reports as far as their agents still stand by them (``alive``: nodes whose agent
    holds a fresh Lease, None while unknown; ``stale``: nodes whose agent's Lease is there but
    was not renewed in time).

    An agent that dies cannot take its report back. A stale Lease says it died (one that
    stops deletes its Lease after its last report), so nothing it announced (a BGP session
    dies with it) and none of its health verdicts stand. Without a Lease nothing is known (an
    agent with layer 2 off keeps none): the report stands, but a layer-2 announcement, which
    the agents elect through their Leases, needs a fresh one. The programming state stays:
    the node's kernel keeps the table when its agent dies.
    """
    out: dict[str, DirectorReport] = {}
    for node, report in reports.items():
        if node in stale:
            report = replace(report, announcement=None, health=())
        elif alive is not None and report.announcement == "Layer2" and node not in alive:
            report = replace(report, announcement=None)
        out[node] = report
    return out


@dataclass(frozen=True)
class Address:
    """The allocation as status sees it: an address (or firewall mark), or why there is none."""

    ok: bool
    reason: str
    message: str
    address: IPAddress | None = None
    pool: str | None = None
    firewall_mark: int | None = None


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


def _nodes(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMED_NODES])
    more = len(names) - _NAMED_NODES
    return f"{shown} and {more} more" if more > 0 else shown


def programmed(
    generation: int, desired: Collection[str], reports: Mapping[str, DirectorReport]
) -> tuple[bool, str, str, int]:
    """(status, reason, message, programmed count) over the directors that should program it.

    Programmed means every desired director reports *this* generation Programmed; a report for
    an older generation is still pending, whatever its state.
    """
    if not desired:
        return False, NO_DIRECTORS, "no node with an agent matches nodeSelector", 0
    done: list[str] = []
    failed: list[DirectorReport] = []
    unsupported: list[DirectorReport] = []
    pending: list[str] = []
    for node in sorted(desired):
        report = reports.get(node)
        if report is None or report.generation != generation:
            pending.append(node)
        elif report.state == "Programmed":
            done.append(node)
        elif report.state == "Failed":
            failed.append(report)
        elif report.state == "Unsupported":
            unsupported.append(report)
        else:
            pending.append(node)
    count = len(done)
    if failed:
        first = failed[0]
        message = f"failed on {_nodes([r.node for r in failed])}: {first.message or first.reason}"
        return False, first.reason or PROGRAMMING_FAILED, message, count
    if unsupported:
        first = unsupported[0]
        message = (
            f"unsupported on {_nodes([r.node for r in unsupported])}: "
            f"{first.message or first.reason}"
        )
        return False, conditions.UNSUPPORTED, message, count
    if pending:
        message = f"{count}/{len(desired)} directors programmed; waiting for {_nodes(pending)}"
        return False, conditions.PENDING, message, count
    message = f"programmed on {count} director(s)"
    # Programmed with a reason: a director left something out (DR real servers off its segment).
    notes = [r for r in (reports[n] for n in done) if r.reason]
    if notes:
        first = notes[0]
        message += f"; on {_nodes([r.node for r in notes])}: {first.reason}: {first.message}"
    return True, conditions.ALL_PROGRAMMED, message, count


def compute(
    *,
    generation: int,
    old: Mapping[str, Any],
    address: Address,
    counts: Counts,
    desired: Collection[str],
    reports: Mapping[str, DirectorReport],
    now: str | None = None,
) -> dict[str, Any]:
    """The whole VirtualServer ``status``."""
    conds: list[dict[str, Any]] = list(old.get("conditions") or [])
    conds = conditions.set_condition(
        conds,
        conditions.ADDRESS_ALLOCATED,
        address.ok,
        address.reason,
        address.message,
        generation,
        at=now,
    )
    unhealthy = health.summarize({n: r.health for n, r in reports.items()})
    if unhealthy:  # taken out by at least one director: not counted ready
        counts = Counts(max(0, counts.ready - len(unhealthy)), counts.total)
    prog, prog_reason, prog_message, done = programmed(generation, desired, reports)
    conds = conditions.set_condition(
        conds, conditions.PROGRAMMED, prog, prog_reason, prog_message, generation, at=now
    )
    if not address.ok:
        ready = (False, address.reason, address.message)
    elif not prog:
        ready = (False, prog_reason, prog_message)
    elif counts.ready == 0:
        ready = (False, conditions.NO_BACKENDS, f"no ready real server ({counts.summary})")
    else:
        where = (
            f"on {address.address}"
            if address.address is not None
            else f"firewall mark {address.firewall_mark}"
        )
        ready = (True, SERVING, f"serving {where} to {counts.ready} real server(s)")
    conds = conditions.set_condition(conds, conditions.READY, *ready, generation, at=now)
    order = {conditions.ADDRESS_ALLOCATED: 0, conditions.PROGRAMMED: 1, conditions.READY: 2}
    conds.sort(key=lambda c: order.get(str(c.get("type")), 3))
    status: dict[str, Any] = {"observedGeneration": generation}
    if address.address is not None:
        status["address"] = str(address.address)
    if address.pool is not None:
        status["addressPool"] = address.pool
    if address.firewall_mark is not None:
        status["firewallMark"] = address.firewall_mark
    status["conditions"] = conds
    wanted = len(desired)
    status["nodes"] = {"desired": wanted, "programmed": done, "summary": f"{done}/{wanted}"}
    status["realServers"] = {
        "ready": counts.ready,
        "total": counts.total,
        "summary": counts.summary,
    }
    if unhealthy:
        status["realServers"]["down"] = len(unhealthy)
        status["realServers"]["unhealthy"] = unhealthy
    announcement = announced(reports)
    if announcement is not None:
        status["announcement"] = announcement
    return status


def announced(reports: Mapping[str, DirectorReport]) -> dict[str, Any] | None:
    """Which nodes announce the address, and how, from the agents' reports (None: none do)."""
    by_mode: dict[str, list[str]] = {}
    for node in sorted(reports):
        mode = reports[node].announcement
        if mode:
            by_mode.setdefault(mode, []).append(node)
    if not by_mode:
        return None
    mode = sorted(by_mode)[0]  # one mode per address: its pool's
    return {"mode": mode, "nodes": by_mode[mode]}


#: AddressAllocated reasons that deserve a Normal Event, and the Event's reason.
_GRANTED: Final = {
    conditions.ALLOCATED: "AddressAllocated",
    conditions.FIREWALL_MARK_ADMITTED: conditions.FIREWALL_MARK_ADMITTED,
}


#: AddressAllocated reasons of a holder kept while its pool is missing or not ready.
_RETAINED: Final = frozenset({conditions.ADDRESS_RETAINED, conditions.FIREWALL_MARK_RETAINED})


def condition(status: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    return next((c for c in status.get("conditions") or () if c.get("type") == type_), {})


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return old.get("status") != new.get("status") or old.get("reason") != new.get("reason")


def set_aside_health(
    reports: Mapping[str, DirectorReport], stale: Collection[str]
) -> frozenset[tuple[Any, Any]]:
    """The real servers that directors whose agent died (``stale``) still report out: what
    :func:`live_reports` sets aside, for the Event that says why they count again."""
    dead = {n: r.health for n, r in reports.items() if n in stale}
    return frozenset(health.entry_key(e) for e in health.summarize(dead)) if dead else frozenset()


def events(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    set_aside: Collection[tuple[Any, Any]] = frozenset(),
) -> list[Event]:
    """Events for the transitions a user cares about between two statuses."""
    out: list[Event] = []
    old_addr = condition(old, conditions.ADDRESS_ALLOCATED)
    new_addr = condition(new, conditions.ADDRESS_ALLOCATED)
    if new_addr.get("status") == "True":
        if old.get("address") and new.get("address") and old["address"] != new["address"]:
            out.append(
                Event(
                    "Warning",
                    "AddressChanged",
                    f"address changed from {old['address']} to {new_addr.get('message')}",
                )
            )
        elif new_addr.get("reason") in _RETAINED and _changed(old_addr, new_addr):
            out.append(Event("Warning", str(new_addr.get("reason")), str(new_addr.get("message"))))
        elif new_addr.get("reason") in _GRANTED and (
            old_addr.get("status") != "True" or old_addr.get("reason") in _RETAINED
        ):
            reason = _GRANTED[str(new_addr.get("reason"))]
            out.append(Event("Normal", reason, str(new_addr.get("message"))))
    elif new_addr and _changed(old_addr, new_addr):
        out.append(Event("Warning", str(new_addr.get("reason")), str(new_addr.get("message"))))
    old_prog = condition(old, conditions.PROGRAMMED)
    new_prog = condition(new, conditions.PROGRAMMED)
    quiet = (conditions.PENDING, NO_DIRECTORS)  # normal while agents catch up
    if (
        new_prog.get("status") == "False"
        and new_prog.get("reason") not in quiet
        and _changed(old_prog, new_prog)
    ):
        out.append(Event("Warning", str(new_prog.get("reason")), str(new_prog.get("message"))))
    out += _announcement_events(old, new)
    old_ready, new_ready = condition(old, conditions.READY), condition(new, conditions.READY)
    if new_ready.get("status") == "True" and old_ready.get("status") != "True":
        out.append(Event("Normal", "Ready", str(new_ready.get("message"))))
    elif new_ready.get("status") == "False" and old_ready.get("status") == "True":
        out.append(
            Event("Warning", "NotReady", f"{new_ready.get('reason')}: {new_ready.get('message')}")
        )
    was, now = ((s.get("realServers") or {}).get("unhealthy") or () for s in (old, new))
    out.extend(Event(*e) for e in health.events(was, now, set_aside))
    return out


def describe_announcement(announcement: Mapping[str, Any]) -> str:
    mode = {"Layer2": "on layer 2", "BGP": "over BGP"}.get(str(announcement.get("mode")), "")
    return f"{mode} by {', '.join(announcement.get('nodes') or ())}"


def _announcement_events(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """An Event on every move of the announcement, and when nobody announces any more."""
    before, after = old.get("announcement"), new.get("announcement")
    if before == after:
        return []
    address = new.get("address") or old.get("address") or "the address"
    if after is None:
        assert before is not None
        return [
            Event(
                "Warning",
                "NotAnnounced",
                f"no node announces {address} any more (was {describe_announcement(before)})",
            )
        ]
    message = f"{address} announced {describe_announcement(after)}"
    if before is not None:
        message += f" (was {describe_announcement(before)})"
    return [Event("Normal", "Announced", message)]
