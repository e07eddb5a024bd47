"""One rise/fall state machine for every kind of probe: results in, up or down out. Pure.

keepalived gives each checker its own retry logic and no rise counter; here a TCP connect, an
HTTP answer, a UDP reply or a DNS answer is only a success or a failure, and this machine alone
decides when a real server goes down (``fall`` failures in a row) and comes back (``rise``
successes in a row). So a flapping real server changes state at most once per ``min(rise,
fall)`` probes, whatever the probe kind.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Thresholds:
    fall: int
    rise: int
    #: False (``initialState: Down``): down until the first success, then the thresholds.
    initially_up: bool = True


@dataclass(frozen=True, slots=True)
class Health:
    up: bool
    #: Results in a row that disagree with ``up`` (failures while up, successes while down).
    streak: int = 0
    #: Whether it was ever up; a real server that starts down comes up at its first success.
    seen_up: bool = True
    #: The last failure while it is failing or down ("" once it is up and passing).
    detail: str = ""


def start(thresholds: Thresholds) -> Health:
    """The state before the first probe."""
    up = thresholds.initially_up
    return Health(up, 0, up)


def observe(health: Health, ok: bool, thresholds: Thresholds, detail: str = "") -> Health:
    """The state after one probe result (``detail`` says why a failed probe failed)."""
    failure = health.detail if ok else detail
    if ok and not health.seen_up:
        return Health(True, 0, True)
    if ok == health.up:
        return Health(health.up, 0, health.seen_up, "" if ok else failure)
    streak = health.streak + 1
    if streak >= (thresholds.rise if ok else thresholds.fall):
        return Health(ok, 0, health.seen_up, "" if ok else failure)
    return Health(health.up, streak, health.seen_up, failure)
