"""LVS dynamic feedback: a feedback agent's answers in, the real server's weight out. Pure.

The design is the LVS one ("Dynamic Feedback Load Balancing Scheduling"): a monitor on the
director learns each real server's load every period and adjusts its IPVS weight by negative
feedback, ``weight += A * cbrt(target - load)``, bounded between a floor and ``SCALE`` times
the configured weight, and writes the kernel only when the change passes a threshold. The
cube root moves a weight fast when the load is far from the target and gently near it, so the
weights settle instead of oscillating.

The load comes from the real server's feedback agent in the HAProxy agent-check protocol (one
line of words): ``N%`` is the share of its capacity that is free, as existing agents report it
(idle CPU), so its load is ``1 - N/100``; the agent aggregates its own inputs (CPU, memory,
queue: LVS's ``sum(R_i * load_i)``), which only it can see. ``drain`` and ``down`` take the
real server out (weight 0) until ``up`` or ``ready``; ``maxconn:N`` becomes the IPVS upper
threshold. Safeguards as in Envoy's client-side weighted round robin: answers are not used for
``blackout`` after an agent starts answering, a weight falls back to the configured one when
the agent has been silent for ``expiry`` (a dead agent must never starve a healthy server),
and a load never gives weight 0 — only health does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

from ipvs_api.types import Feedback

#: Bytes of an agent's answer that are read; HAProxy reads one line too.
MAX_REPLY = 512
#: Loads this close to the target count as on target. Agents report whole percents and the
#: kernel takes whole weights, so one weight step moves a load by a few points: without a
#: tolerance the law's weight would walk back and forth across its resting point, and every
#: few periods a write would follow (seen on the simulated plant in the unit tests).
TOLERANCE = 0.03


class Command(StrEnum):
    UP = "up"
    DRAIN = "drain"
    DOWN = "down"


_COMMANDS = {
    "up": Command.UP,
    "ready": Command.UP,
    "drain": Command.DRAIN,
    "down": Command.DOWN,
    "fail": Command.DOWN,
    "stopped": Command.DOWN,
    "maint": Command.DOWN,
}


@dataclass(frozen=True, slots=True)
class Reply:
    """One answer of a feedback agent; ``None`` fields were not in it."""

    load: float | None = None
    command: Command | None = None
    maxconn: int | None = None


def parse_reply(data: bytes) -> Reply | None:
    """Read the first line of an agent's answer; None when it holds no word we know.

    Words are separated by spaces, tabs or commas, in any order and any case; text after ``#``
    is a description. ``75%`` (also written ``weight:75%``) is capacity left; a percentage
    above 100 is no more than idle.
    """
    line = data[:MAX_REPLY].split(b"\n", 1)[0].decode("ascii", "replace")
    line = line.split("#", 1)[0]
    load: float | None = None
    command: Command | None = None
    maxconn: int | None = None
    for word in line.replace(",", " ").replace("\t", " ").lower().split():
        word = word.removeprefix("weight:")
        if word.endswith("%") and word[:-1].isdigit():
            load = max(0.0, 1.0 - int(word[:-1]) / 100)
        elif word.startswith("maxconn:") and word[8:].isdigit():
            maxconn = int(word[8:])
        elif word in _COMMANDS:
            command = _COMMANDS[word]
    if load is None and command is None and maxconn is None:
        return None
    return Reply(load, command, maxconn)


@dataclass(frozen=True, slots=True)
class Law:
    """The control law's settings (``spec.feedback``), durations in seconds."""

    gain: float = 5.0
    target: float = 0.95
    scale: int = 10
    min_weight: int = 1
    threshold: float = 0.15
    blackout: float = 10.0
    expiry: float = 180.0

    @classmethod
    def of(cls, fb: Feedback) -> Law:
        return cls(
            fb.gain, fb.target, fb.scale, fb.min_weight, fb.threshold, fb.blackout, fb.expiry
        )

    def bounds(self, configured: int) -> tuple[int, int]:
        """The lowest and highest weight feedback gives a real server configured ``configured``."""
        high = self.scale * configured
        return min(self.min_weight, high), high


@dataclass(frozen=True, slots=True)
class Feed:
    """The feedback state of one real server of one VirtualServer on this director."""

    configured: int
    #: The law's weight, a real number; the kernel gets ``applied``.
    weight: float
    applied: int
    #: When the agent was first heard (None: not yet), for the blackout.
    since: float | None = None
    #: When the agent last answered (or, before its first answer, when the feed started).
    last: float = 0.0
    answered: bool = False
    command: Command = Command.UP
    maxconn: int | None = None
    load: float | None = None


def start(configured: int, now: float) -> Feed:
    return Feed(configured, float(configured), configured, last=now)


def cbrt(x: float) -> float:
    return math.copysign(abs(x) ** (1 / 3), x)


def _settle(applied: int, weight: float, law: Law, low: int, high: int) -> int:
    """The weight to give the kernel: the law's, once it moved past the write threshold."""
    wanted = round(weight)
    if wanted == applied:
        return applied
    if wanted in (low, high) or abs(wanted - applied) > law.threshold * applied:
        return wanted
    return applied


def step(feed: Feed, reply: Reply | None, now: float, law: Law) -> Feed:
    """The state after one poll: ``reply`` None when the agent did not answer usably.

    A failed poll changes nothing (not reaching the agent is no news about the server); the
    expiry, judged by :func:`verdict`, undoes what a silent agent said. An agent heard again
    after its answers expired starts afresh, blackout included.
    """
    if reply is None:
        return feed
    if feed.answered and now - feed.last > law.expiry:
        feed = start(feed.configured, now)
    since = now if feed.since is None else feed.since
    command = reply.command or feed.command
    maxconn = reply.maxconn if reply.maxconn is not None else feed.maxconn
    weight, applied = feed.weight, feed.applied
    if reply.load is not None and feed.configured > 0 and now - since >= law.blackout:
        low, high = law.bounds(feed.configured)
        error = law.target - reply.load
        if abs(error) > TOLERANCE:
            weight = min(high, max(low, weight + law.gain * cbrt(error)))
        applied = _settle(applied, weight, law, low, high)
    load = reply.load if reply.load is not None else feed.load
    return Feed(feed.configured, weight, applied, since, now, True, command, maxconn, load)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one real server's feedback asks of the planner now."""

    #: The weight to use; None: the configured one (no fresh answers, or in the blackout).
    weight: int | None = None
    command: Command = Command.UP
    maxconn: int | None = None
    #: The agent has been silent for the expiry: everything it said is void.
    stale: bool = False


def verdict(feed: Feed, now: float, law: Law) -> Verdict:
    """The feed's effect at ``now``: answers count until they are ``expiry`` old."""
    if now - feed.last > law.expiry:
        return Verdict(stale=True)
    if not feed.answered:
        return Verdict()
    in_blackout = feed.since is None or now - feed.since < law.blackout
    weight = None if in_blackout or feed.configured == 0 else feed.applied
    return Verdict(weight, feed.command, feed.maxconn)


def reconfigured(feed: Feed, configured: int, now: float) -> Feed:
    """The feed when the configured weight changed: the law starts again from it."""
    if configured == feed.configured:
        return feed
    return replace(start(configured, now), since=feed.since, last=feed.last, answered=False)
