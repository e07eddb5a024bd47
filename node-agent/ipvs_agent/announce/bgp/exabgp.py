"""ExaBGP's configuration and API lines, as text: pure, pinned by golden files.

The agent drives ExaBGP 5 (a BGP speaker in Python, on PyPI) through its process API: ExaBGP
runs one helper process (``process ipvs-agent { run …; encoder json; }``) whose standard output
it reads as commands — ``neighbor <peer> announce route <prefix> next-hop self …`` and
``… withdraw route …`` — and whose standard input receives an acknowledgement per command
(``done`` / ``error``) and, with ``neighbor-changes``, a JSON message on every session change.
ExaBGP never touches the kernel's routing table (a director does not need routes), and it
listens on no port: it opens the sessions itself.

Passwords go out base64-encoded (``md5-base64``), so no character of a Secret can break the
configuration's syntax.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ipvs_agent.announce.bgp.policy import Route, Session

#: The name of the helper process in ExaBGP's configuration.
PROCESS = "ipvs-agent"


def _family(session: Session) -> str:
    return "ipv4 unicast" if session.address.version == 4 else "ipv6 unicast"


def render_config(sessions: Sequence[Session], helper: Sequence[str]) -> str:
    """The whole ExaBGP configuration: the helper process and one ``neighbor`` per session.

    ``helper`` is the helper's command line (no word may hold whitespace or ``;``: ExaBGP
    splits ``run`` on spaces).
    """
    for word in helper:
        if not word or any(c.isspace() or c in ';"{}' for c in word):
            raise ValueError(f"helper argument {word!r} cannot go into ExaBGP's run line")
    lines = [
        "# Written by ipvs-agent; every change restarts ExaBGP with the new file.",
        f"process {PROCESS} {{",
        f"    run {' '.join(helper)};",
        "    encoder json;",
        "}",
    ]
    for s in sorted(sessions):
        lines += [
            "",
            f"neighbor {s.address} {{",
            f'    description "{s.peer}";',
            f"    router-id {s.router_id};",
            f"    local-as {s.local_asn};",
            f"    peer-as {s.asn};",
            f"    hold-time {s.hold_time};",
        ]
        if s.port != 179:
            lines.append(f"    connect {s.port};")
        if s.local_address is not None:
            lines.append(f"    local-address {s.local_address};")
        if s.password:
            encoded = base64.b64encode(s.password.encode()).decode()
            lines += [f'    md5-password "{encoded}";', "    md5-base64 true;"]
        lines += [
            f"    family {{ {_family(s)}; }}",
            f"    api {{ processes [ {PROCESS} ]; neighbor-changes; }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def announce(session: Session, route: Route) -> str:
    """The API line announcing ``route`` to ``session``'s router, this node as next hop."""
    words = [f"neighbor {session.address} announce route {route.prefix} next-hop self"]
    if route.communities:
        words.append(f"community [ {' '.join(route.communities)} ]")
    if route.local_preference is not None:
        words.append(f"local-preference {route.local_preference}")
    return " ".join(words)


def withdraw(session: Session, route: Route) -> str:
    return f"neighbor {session.address} withdraw route {route.prefix}"


class SessionState(StrEnum):
    """A session as the agent reports it (IPVSNode ``status.bgp.sessions[].state``)."""

    #: ExaBGP is starting or trying to connect; no event yet.
    CONNECTING = "Connecting"
    #: TCP is up, OPEN not yet agreed.
    CONNECTED = "Connected"
    #: OPEN agreed: routes flow.
    ESTABLISHED = "Established"
    #: The session went down (ExaBGP retries).
    DOWN = "Down"
    #: The agent cannot open it (a missing password Secret).
    CONFIG_ERROR = "ConfigError"


_STATES = {
    "connected": SessionState.CONNECTED,
    "up": SessionState.ESTABLISHED,
    "down": SessionState.DOWN,
}


@dataclass(frozen=True)
class Ack:
    """ExaBGP's answer to one command: ``done`` (True) or ``error`` (False)."""

    ok: bool


@dataclass(frozen=True)
class StateChange:
    """A ``neighbor-changes`` message: the session with ``peer`` (its address) changed."""

    peer: str
    state: SessionState
    reason: str = ""


Event = Ack | StateChange | None


def parse(line: str) -> Event:
    """One line ExaBGP wrote to the helper (None: nothing the agent follows)."""
    text = line.strip()
    if text in ("done", "error"):
        return Ack(text == "done")
    if not text.startswith("{"):
        return None
    try:
        message: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("type") != "state":
        return None
    neighbor = message.get("neighbor") or {}
    state = _STATES.get(str(neighbor.get("state", "")))
    peer = str((neighbor.get("address") or {}).get("peer", ""))
    if state is None or not peer:
        return None
    return StateChange(peer, state, str(neighbor.get("reason", "")))
