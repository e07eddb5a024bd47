"""What health checks and feedback decided, in the form the planner takes it. Pure values.

The planner (``desired.plan``) reads an :class:`Adjustment` per real server of a VirtualServer
and nothing else from this package, so the kernel changes only through plan → diff → apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Attention(StrEnum):
    """Why a director reports a real server (in its IPVSNode; the others are only counted)."""

    #: Out of service: its health check failed, or its feedback agent said down.
    DOWN = "Down"
    #: Weight 0 because its feedback agent said drain.
    DRAIN = "Drain"
    #: Its feedback agent has not answered for the expiry: back at the configured weight.
    STALE = "FeedbackStale"


@dataclass(frozen=True, slots=True)
class Adjustment:
    """One real server of one VirtualServer, as health and feedback want it on this node."""

    #: Out of service: weight 0 (quiesced), or with ``remove`` not in the table at all.
    down: bool = False
    remove: bool = False
    #: The feedback weight in force; None: the configured weight.
    weight: int | None = None
    #: The feedback agent's ``maxconn``: the IPVS upper threshold on this director.
    upper_threshold: int | None = None
    #: Reported per real server in the IPVSNode; None: nothing needs attention.
    attention: Attention | None = None
    message: str = ""


#: (address, port) of a real server within its VirtualServer; port 0 when the VirtualServer
#: names none for it (a static real server without ``port``, every Service endpoint).
RealServerKey = tuple[str, int]
#: VirtualServer key ("namespace/name") → real server → adjustment. Real servers without an
#: entry keep the configured weight.
Adjustments = Mapping[str, Mapping[RealServerKey, Adjustment]]


@dataclass(frozen=True, slots=True)
class RealServerHealth:
    """A real server that needs attention, as the IPVSNode reports it."""

    address: str
    port: int
    attention: Attention
    message: str = ""
