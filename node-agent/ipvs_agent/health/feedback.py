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

Two modes (``spec.feedback.mode``). ``Target`` is the LVS law above: each real server on its
own, toward the target load. It keeps an overloaded server at the target, but where every
server is below it, every weight rises to its cap and the weights end up equal whatever the
capacities. ``Balance`` steers each server toward the mean load of its VirtualServer's real
servers instead (the others' last answers with its own new one): a server busier than the
mean loses weight, a quieter one gains, so utilisation evens out and the weights settle in
proportion to capacity, as Envoy's weight = qps / utilisation (gRFC A58). Its step is
multiplicative (:func:`_balanced`), with the same bounds, tolerance, write threshold and
safeguards; ``gain`` and ``target`` are Target's alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from ipvs_api.types import Feedback, FeedbackMode

#: Bytes of an agent's answer that are read; HAProxy reads one line too.
MAX_REPLY = 512
#: Loads this close to the target count as on target. Agents report whole percents and the
#: kernel takes whole weights, so one weight step moves a load by a few points: without a
#: tolerance the law's weight would walk back and forth across its resting point, and every
#: few periods a write would follow (seen on the simulated plant in the unit tests).
TOLERANCE = 0.03


#: The Balance law's tolerance, a share of the mean: evenness is relative (at 20 % load, 3
#: points apart is 15 % apart), and an agent's load is noisy (measured over a window of a
#: few requests); a smaller one had the weights of a wlc service, which evens out short
#: queues by itself, wander and be written every other period in the VM.
BALANCE_TOLERANCE = 0.1
#: A load at or above this is saturated: the server may be far more loaded than it can say.
SATURATED = 0.99
#: The Balance law moves a weight by at most this factor per period, and counts a load as
#: at least MIN_LOAD (an idle server's answer says little about its capacity).
MAX_FACTOR = 2.0
MIN_LOAD = 0.01


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
    #: Steer toward the mean load of the VirtualServer's real servers, not ``target``.
    balance: bool = False

    @classmethod
    def of(cls, fb: Feedback) -> Law:
        balance = fb.mode is FeedbackMode.BALANCE
        return cls(
            fb.gain,
            fb.target,
            fb.scale,
            fb.min_weight,
            fb.threshold,
            fb.blackout,
            fb.expiry,
            balance,
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


def in_use(feed: Feed, now: float, law: Law) -> bool:
    """Whether a real server's load counts toward the mean a Balance law steers to: its
    answers are in force (:func:`verdict` gives them a weight: answered, past the blackout,
    not expired, configured weight > 0) and it takes traffic (up)."""
    v = verdict(feed, now, law)
    return feed.load is not None and v.weight is not None and v.command is Command.UP


def mean_load(load: float | None, others: Iterable[Feed], now: float, law: Law) -> float | None:
    """What a Balance law steers one real server to: the mean of its new ``load`` and the last
    loads of its VirtualServer's other real servers in use. None when it has none to compare
    with (alone, or the others silent): a server cannot be balanced against nobody."""
    loads = [f.load for f in others if in_use(f, now, law) and f.load is not None]
    if load is None or not loads:
        return None
    return (load + sum(loads)) / (len(loads) + 1)


def _uneven(load: float, mean: float) -> bool:
    """Whether a load is far enough from the mean to move its weight. A saturated server
    always is, unless all are: its true load is censored at 100 % (a 1.1 against 0.83 reads
    1.0 against a mean of 0.915, inside the tolerance)."""
    if load >= SATURATED:
        return mean < SATURATED
    return abs(load - mean) > BALANCE_TOLERANCE * mean


def _balanced(weight: float, load: float, mean: float) -> float:
    """The Balance step: half the way, in ratio, to the weight at which this server's load
    would be the mean (its share of traffic over its load is its capacity: gRFC A58's qps /
    utilisation). A step proportional to the weight settles at any weight level, where a
    fixed gain overshoots small weights; at most x2 or /2 a period, as near-idle loads are
    mostly noise."""
    return weight * min(MAX_FACTOR, max(1 / MAX_FACTOR, math.sqrt(mean / max(load, MIN_LOAD))))


def step(feed: Feed, reply: Reply | None, now: float, law: Law, mean: float | None = None) -> Feed:
    """The state after one poll: ``reply`` None when the agent did not answer usably; ``mean``
    the Balance law's reference (:func:`mean_load`), without which it holds the weight.

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
    aim = mean if law.balance else law.target
    ready = feed.configured > 0 and now - since >= law.blackout
    if reply.load is not None and aim is not None and ready:
        low, high = law.bounds(feed.configured)
        if law.balance:
            if _uneven(reply.load, aim):
                weight = min(high, max(low, _balanced(weight, reply.load, aim)))
        elif abs(aim - reply.load) > TOLERANCE:
            weight = min(high, max(low, weight + law.gain * cbrt(aim - reply.load)))
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
