"""Events for BGP sessions, from the agents' IPVSNode reports (``status.bgp``). Pure.

Each node's agent lists its sessions, one per BGPPeer that selects the node. A session counts
only as established or not — its routes reach the router or they do not — because the steps of
one coming up or retrying (``Connecting``, ``Connected``, ``Down``) would be an Event storm
while a router is unreachable. So a session entering or leaving ``Established`` (also by
leaving the report, or its IPVSNode going) is one Event on its BGPPeer, where
``kubectl describe bgppeer`` shows it. Agents have no right to post Events; the operator has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

ESTABLISHED: Final = "Established"
SESSION_ESTABLISHED: Final = "SessionEstablished"
SESSION_DOWN: Final = "SessionDown"

#: (BGPPeer name, router address)
SessionKey = tuple[str, str]


@dataclass(frozen=True)
class Session:
    """One session a node reports: to the router at ``address``, for BGPPeer ``peer``."""

    peer: str
    address: str
    state: str
    message: str = ""

    @property
    def established(self) -> bool:
        return self.state == ESTABLISHED


@dataclass(frozen=True)
class SessionEvent:
    """An Event about BGPPeer ``peer``."""

    peer: str
    type: str  # Normal or Warning
    reason: str
    message: str


def sessions(bgp: Mapping[str, Any] | None) -> dict[SessionKey, Session]:
    """The sessions in an IPVSNode's ``status.bgp``, by (peer, router address): a BGPPeer whose
    address changed has a new session, and the old one's end must not go unnoticed."""
    found: dict[SessionKey, Session] = {}
    for item in (bgp or {}).get("sessions") or ():
        if not isinstance(item, Mapping) or not item.get("peer"):
            continue
        s = Session(
            str(item["peer"]),
            str(item.get("address") or ""),
            str(item.get("state") or ""),
            str(item.get("message") or ""),
        )
        key = (s.peer, s.address)
        if key not in found or s.established:
            found[key] = s
    return found


#: Why an established session that is no longer in ``after`` is down, by default.
NOT_REPORTED: Final = "is no longer reported"
#: ... and when its agent's Lease went stale: the agent died or its node is cut off, and its
#: BGP speaker with it (a dead node's session ends at the router's hold time).
STALE_LEASE: Final = "is presumed down: the agent's Lease is stale"


def events(
    node: str,
    before: Mapping[SessionKey, Session],
    after: Mapping[SessionKey, Session],
    gone: str = NOT_REPORTED,
) -> list[SessionEvent]:
    """The Events for IPVSNode ``node`` moving from sessions ``before`` to ``after``
    (:func:`sessions`): one per session that became established or stopped being so;
    ``gone`` says why one that is not in ``after`` any more is down."""
    found: list[SessionEvent] = []
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        up_before = was is not None and was.established
        if now is not None and now.established and not up_before:
            found.append(
                SessionEvent(
                    now.peer,
                    "Normal",
                    SESSION_ESTABLISHED,
                    f"node {node}: session with {_router(now)} is {ESTABLISHED}",
                )
            )
        elif was is not None and up_before and (now is None or not now.established):
            state = f"is {now.state}" if now is not None else gone
            why = f": {now.message}" if now is not None and now.message else ""
            found.append(
                SessionEvent(
                    was.peer,
                    "Warning",
                    SESSION_DOWN,
                    f"node {node}: session with {_router(was)} {state}{why}",
                )
            )
    return found


def _router(session: Session) -> str:
    return session.address or f"BGPPeer {session.peer}"
