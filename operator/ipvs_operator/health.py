"""Real-server health in VirtualServer status, from the directors' IPVSNode reports. Pure.

Each director checks the real servers from its own node and names in its IPVSNode only those
that need attention (taken out by a failed check, or drained or downed by their feedback
agent). Here they become ``status.realServers.down`` and ``.unhealthy`` — one entry per real
server, with how many directors took it out — and an Event when a real server goes out or
comes back: agents have no right to post Events (least privilege), the operator already has.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

#: What a director reports that takes a real server out; FeedbackStale is only informative.
OUT_STATES: Final = frozenset({"Down", "Drain"})
#: Real servers listed in status (the CRD's bound), and Events posted per status change.
MAX_LISTED: Final = 64
MAX_EVENTS: Final = 10
_NAMED_NODES: Final = 3


@dataclass(frozen=True)
class RealServerReport:
    """One real server a director names in its IPVSNode entry."""

    address: str
    port: int
    state: str
    message: str = ""


def parse(entry: Mapping[str, Any]) -> tuple[RealServerReport, ...]:
    """The real servers a director's IPVSNode entry names (``realServerHealth``)."""
    found = []
    for item in entry.get("realServerHealth") or ():
        if isinstance(item, Mapping) and item.get("address") and item.get("state"):
            found.append(
                RealServerReport(
                    str(item["address"]),
                    int(item.get("port") or 0),
                    str(item["state"]),
                    str(item.get("message") or ""),
                )
            )
    return tuple(found)


def summarize(reports: Mapping[str, Iterable[RealServerReport]]) -> list[dict[str, Any]]:
    """``status.realServers.unhealthy``: each real server out on at least one director
    (node → its reports), Down before Drain when directors disagree, sorted by address."""
    out: dict[tuple[str, int], tuple[str, list[str], str]] = {}
    for node in sorted(reports):
        for r in reports[node]:
            if r.state not in OUT_STATES:
                continue
            state, nodes, message = out.get((r.address, r.port), (r.state, [], r.message))
            if r.state == "Down":
                state = "Down"
            out[(r.address, r.port)] = (state, [*nodes, node], message or r.message)
    listed = []
    for (address, port), (state, nodes, message) in sorted(out.items()):
        shown = ", ".join(nodes[:_NAMED_NODES]) + (
            f" and {len(nodes) - _NAMED_NODES} more" if len(nodes) > _NAMED_NODES else ""
        )
        entry: dict[str, Any] = {"address": address, "state": state, "directors": len(nodes)}
        if port:
            entry["port"] = port
        entry["message"] = (f"{state.lower()} on {shown}" + (f": {message}" if message else ""))[
            :1024
        ]
        listed.append(entry)
    return listed[:MAX_LISTED]


def entry_key(entry: Mapping[str, Any]) -> tuple[Any, Any]:
    """How :func:`events` tells one real server's entry from another's."""
    return entry.get("address"), entry.get("port")


def _name(entry: Mapping[str, Any]) -> str:
    address = str(entry.get("address"))
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{entry['port']}" if entry.get("port") else host


def events(
    old: Iterable[Mapping[str, Any]],
    new: Iterable[Mapping[str, Any]],
    set_aside: Collection[tuple[Any, Any]] = frozenset(),
) -> list[tuple[str, str, str]]:
    """(type, reason, message) for each real server that went out, changed how, or came back.

    ``set_aside``: (address, port) of real servers still out on directors whose agent died;
    one that comes back only because of that is said so — no live director found it back.
    """
    before = {entry_key(e): e for e in old}
    after = {entry_key(e): e for e in new}
    found: list[tuple[str, str, str]] = []
    for key, entry in after.items():
        was = before.get(key)
        if was is None or was.get("state") != entry.get("state"):
            reason = "RealServerDown" if entry.get("state") == "Down" else "RealServerDrained"
            kind = "Warning" if reason == "RealServerDown" else "Normal"
            found.append((kind, reason, f"real server {_name(entry)} {entry.get('message')}"))
    for key, entry in before.items():
        if key in after:
            continue
        message = f"real server {_name(entry)} is back in"
        if key in set_aside:
            message += (
                ": only directors whose agent stopped (a stale Lease) had taken it out, and no"
                " live director has"
            )
        found.append(("Normal", "RealServerUp", message))
    if len(found) > MAX_EVENTS:
        rest = len(found) - MAX_EVENTS + 1
        found = [*found[: MAX_EVENTS - 1], ("Warning", "RealServersChanged", f"{rest} more")]
    return found
