"""The pure decisions of health checks and feedback: the rise/fall machine and the LVS law.

The control law is run against a deterministic simulated plant — real servers of different
capacity behind weighted round robin, each reporting its load as a feedback agent would — so
convergence, the absence of oscillation and every safeguard are shown without a clock.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipvs_agent.health import feedback, machine
from ipvs_agent.health.feedback import Command, Feed, Law, Reply, parse_reply

# ---------------------------------------------------------------- the rise/fall machine

UP3_DOWN2 = machine.Thresholds(fall=3, rise=2)


def run(results: list[bool], t: machine.Thresholds) -> list[bool]:
    state = machine.start(t)
    seen = []
    for ok in results:
        state = machine.observe(state, ok, t, "" if ok else "refused")
        seen.append(state.up)
    return seen


def test_down_after_fall_failures_in_a_row_and_back_after_rise_successes() -> None:
    results = [True, False, False, True, False, False, False, True, False, True, True, False]
    assert run(results, UP3_DOWN2) == [
        *[True] * 6,  # two failures, a success: the count starts again
        False,  # the third failure in a row
        False,
        False,  # a success, then a failure: the count starts again
        False,
        True,  # the second success in a row
        True,
    ]


def test_a_real_server_that_starts_down_comes_up_at_its_first_success() -> None:
    alpha = machine.Thresholds(fall=3, rise=2, initially_up=False)
    assert machine.start(alpha).up is False
    assert run([False, False, True, False, False, False], alpha) == [
        False,
        False,
        True,  # the first success ever: no rise wait
        True,
        True,
        False,  # then the thresholds apply
    ]


def test_the_last_failure_is_kept_while_down_and_cleared_once_up() -> None:
    t = machine.Thresholds(fall=1, rise=2)
    state = machine.observe(machine.start(t), False, t, "connection refused")
    assert (state.up, state.detail) == (False, "connection refused")
    state = machine.observe(state, True, t)
    assert (state.up, state.detail) == (False, "connection refused")
    state = machine.observe(state, True, t)
    assert (state.up, state.detail) == (True, "")


@given(
    st.lists(st.booleans(), max_size=200),
    st.integers(1, 5),
    st.integers(1, 5),
    st.booleans(),
)
def test_a_flapping_server_changes_state_no_faster_than_the_thresholds_allow(
    results: list[bool], fall: int, rise: int, initially_up: bool
) -> None:
    t = machine.Thresholds(fall, rise, initially_up)
    states = [machine.start(t).up, *run(results, t)]
    changes = [i for i in range(1, len(states)) if states[i] != states[i - 1]]
    # After the first success of a server that started down, two changes are at least
    # min(rise, fall) probes apart, and every change is backed by that many results in a row.
    regular = changes if initially_up else changes[1:]
    for a, b in itertools.pairwise(regular):
        assert b - a >= min(rise, fall)
    for i in regular:
        need = fall if not states[i] else rise
        assert results[i - need : i] == [states[i]] * need


# ---------------------------------------------------------------- agent-check answers


@pytest.mark.parametrize(
    ("answer", "reply"),
    [
        (b"75%\n", Reply(load=0.25)),
        (b"up 100%\r\n", Reply(load=0.0, command=Command.UP)),
        (b"READY,weight:40%", Reply(load=0.6, command=Command.UP)),
        (b"drain", Reply(command=Command.DRAIN)),
        (b"maint # upgrading", Reply(command=Command.DOWN)),
        (b"down\tmaxconn:30", Reply(command=Command.DOWN, maxconn=30)),
        (b"150%", Reply(load=0.0)),  # above idle is idle
        (b"0%\nsecond line ignored 50%", Reply(load=1.0)),
        (b"stopped", Reply(command=Command.DOWN)),
    ],
)
def test_agent_answers_in_the_haproxy_words(answer: bytes, reply: Reply) -> None:
    assert parse_reply(answer) == reply


@pytest.mark.parametrize("answer", [b"", b"\n", b"hello", b"75", b"-5%", b"# 75%", b"\xff\xfe"])
def test_an_answer_without_a_known_word_is_no_answer(answer: bytes) -> None:
    assert parse_reply(answer) is None


# ---------------------------------------------------------------- the law on a simulated plant

FAST = Law(gain=5, target=0.95, scale=10, min_weight=1, threshold=0.05, blackout=0, expiry=30)


def agent_answer(load: float) -> Reply:
    """What a feedback agent reports for a utilisation: whole percent of capacity left."""
    parsed = parse_reply(f"{round(100 * max(0.0, 1.0 - load))}%".encode())
    assert parsed is not None
    return parsed


def simulate(
    capacities: list[float], offered: float, law: Law, periods: int, configured: int = 10
) -> tuple[list[list[int]], list[list[float]]]:
    """wrr over the applied weights; each server's load is what it is sent over its capacity.
    Returns the applied weights and the loads of every period."""
    feeds = [feedback.start(configured, 0.0) for _ in capacities]
    weights, loads = [], []
    for period in range(periods):
        now = float(period + 1)
        applied = [f.applied for f in feeds]
        total = sum(applied)
        load = [offered * w / total / c for w, c in zip(applied, capacities, strict=True)]
        feeds = [
            feedback.step(f, agent_answer(x), now, law) for f, x in zip(feeds, load, strict=True)
        ]
        weights.append([f.applied for f in feeds])
        loads.append(load)
    return weights, loads


def direction_changes(series: list[int]) -> int:
    steps = [b - a for a, b in itertools.pairwise(series) if b != a]
    return sum(1 for a, b in itertools.pairwise(steps) if (a > 0) != (b > 0))


def test_weights_converge_without_oscillating_and_the_weak_server_stops_being_overloaded() -> None:
    # A weak (10/s) and a strong (30/s) real server, equal configured weights, 30/s offered:
    # an equal split overloads the weak one (150 %) and leaves the strong one at half.
    weights, loads = simulate([10.0, 30.0], 30.0, FAST, periods=120)
    assert loads[0] == [1.5, 0.5]
    weak, strong = [w[0] for w in weights], [w[1] for w in weights]
    # Within three periods the weak server is below the target, and it stays close, while
    # the strong one climbs to its cap (scale x configured) in one direction; the weak one's
    # weight turns once (it first falls, then follows the strong one's up), then all rest.
    assert all(0.75 <= load[0] <= 1.0 for load in loads[3:]), loads[:40]
    assert strong[-1] == 100 and direction_changes(strong) == 0
    assert direction_changes(weak) <= 1
    settled = next(i for i in range(len(weights)) if weights[i:] == [weights[-1]] * (120 - i))
    assert settled < 40, weights[:settled]
    assert 0.85 <= loads[-1][0] <= 0.95 and loads[-1][1] < 0.95
    spread_before = abs(loads[0][0] - loads[0][1])
    assert abs(loads[-1][0] - loads[-1][1]) < spread_before / 2


def test_a_capacity_step_mid_run_is_followed_without_oscillation() -> None:
    law = FAST
    feeds = [feedback.start(10, 0.0), feedback.start(10, 0.0)]
    history: list[list[int]] = []
    for period in range(160):
        capacities = [10.0, 30.0] if period < 80 else [30.0, 10.0]  # the servers swap
        applied = [f.applied for f in feeds]
        load = [30.0 * w / sum(applied) / c for w, c in zip(applied, capacities, strict=True)]
        feeds = [
            feedback.step(f, agent_answer(x), float(period + 1), law)
            for f, x in zip(feeds, load, strict=True)
        ]
        history.append([f.applied for f in feeds])
    assert history[79][0] < history[79][1] and history[-1][0] > history[-1][1]
    for server in (0, 1):
        assert direction_changes([h[server] for h in history[80:]]) <= 1
    assert history[-40:] == [history[-1]] * 40


def test_near_the_target_the_kernel_weight_rests(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whole percents and whole weights: one weight step moves the weak server's load by about
    # 1.4 points here. With the tolerance and the write threshold the weight rests; without
    # the tolerance the law's weight walks across its resting point and is written every few
    # periods, a limit cycle (the capacity swap of the test above: 44, 47, 44, ...).
    def tail_writes() -> int:
        feeds = [feedback.start(10, 0.0), feedback.start(10, 0.0)]
        writes = 0
        for period in range(300):
            before = [f.applied for f in feeds]
            capacities = [10.0, 30.0] if period < 80 else [30.0, 10.0]
            load = [30.0 * w / sum(before) / c for w, c in zip(before, capacities, strict=True)]
            feeds = [
                feedback.step(f, agent_answer(x), float(period + 1), FAST)
                for f, x in zip(feeds, load, strict=True)
            ]
            writes += period >= 200 and [f.applied for f in feeds] != before
        return writes

    assert tail_writes() == 0
    monkeypatch.setattr(feedback, "TOLERANCE", 0.0)
    assert tail_writes() > 10


def test_every_server_below_the_target_keeps_rising_to_the_cap_and_stays() -> None:
    weights, loads = simulate([10.0, 30.0], 8.0, FAST, periods=60)
    assert weights[-1] == [100, 100] and max(loads[-1]) < 0.95


def test_an_overloaded_server_falls_to_the_floor_never_to_zero() -> None:
    law = Law(min_weight=2, blackout=0, expiry=30)
    feed = feedback.start(10, 0.0)
    for t in range(1, 100):
        feed = feedback.step(feed, Reply(load=1.0), float(t), law)
    assert feed.applied == 2
    assert feedback.verdict(feed, 99.0, law).weight == 2


def test_the_blackout_ignores_a_new_agents_first_answers() -> None:
    law = Law(blackout=10, expiry=30)
    feed = feedback.start(10, 0.0)
    for t in range(1, 10):
        feed = feedback.step(feed, Reply(load=0.0), float(t), law)
        assert feedback.verdict(feed, float(t), law).weight is None  # the configured weight
    assert feed.applied == 10
    feed = feedback.step(feed, Reply(load=0.0), 11.0, law)
    assert feedback.verdict(feed, 11.0, law).weight == 15  # 10 + 5 x cbrt(0.95)


def test_a_silent_agent_expires_to_the_configured_weight_and_starts_afresh() -> None:
    law = Law(blackout=2, expiry=5)
    feed = feedback.start(10, 0.0)
    for t in range(1, 8):
        feed = feedback.step(feed, Reply(load=0.0, command=Command.DRAIN), float(t), law)
    assert feedback.verdict(feed, 7.0, law) == feedback.Verdict(feed.applied, Command.DRAIN)
    assert feed.applied > 10
    for t in range(8, 13):  # the agent stops answering: failed polls change nothing...
        feed = feedback.step(feed, None, float(t), law)
        assert feedback.verdict(feed, float(t), law).command is Command.DRAIN
    # ...until its last answer is older than the expiry: the configured weight, no drain.
    assert feedback.verdict(feed, 12.5, law) == feedback.Verdict(stale=True)
    # Back: the blackout again, and the law starts from the configured weight.
    feed = feedback.step(feed, Reply(load=0.0), 20.0, law)
    assert feedback.verdict(feed, 20.0, law) == feedback.Verdict(None, Command.UP)
    assert feed.weight == 10.0
    feed = feedback.step(feed, Reply(load=0.0), 22.0, law)
    assert feedback.verdict(feed, 22.0, law).weight == 15


def test_an_agent_that_never_answers_is_stale_after_the_expiry() -> None:
    law = Law(expiry=5)
    feed = feedback.start(10, 100.0)
    assert feedback.verdict(feed, 104.0, law) == feedback.Verdict()
    assert feedback.verdict(feed, 106.0, law).stale


def test_commands_stay_until_the_agent_takes_them_back() -> None:
    law = Law(blackout=0, expiry=30)
    feed = feedback.start(10, 0.0)
    feed = feedback.step(feed, Reply(command=Command.DRAIN, maxconn=50), 1.0, law)
    feed = feedback.step(feed, Reply(load=0.5), 2.0, law)  # unmentioned: still drained
    assert feedback.verdict(feed, 2.0, law) == feedback.Verdict(feed.applied, Command.DRAIN, 50)
    feed = feedback.step(feed, Reply(command=Command.UP), 3.0, law)
    assert feedback.verdict(feed, 3.0, law).command is Command.UP


def test_a_real_server_configured_at_weight_zero_is_left_at_zero() -> None:
    law = Law(blackout=0)
    feed = feedback.start(0, 0.0)
    for t in range(1, 5):
        feed = feedback.step(feed, Reply(load=0.0), float(t), law)
    assert feedback.verdict(feed, 4.0, law).weight is None and feed.applied == 0


def test_a_new_configured_weight_restarts_the_law_from_it() -> None:
    law = Law(blackout=0, expiry=30)
    feed = feedback.start(10, 0.0)
    feed = feedback.step(feed, Reply(load=0.0), 1.0, law)
    feed = feedback.reconfigured(feed, 20, 2.0)
    assert (feed.weight, feed.applied) == (20.0, 20)
    assert feedback.reconfigured(feed, 20, 3.0) is feed


def test_the_lvs_defaults() -> None:
    law = Law()
    assert (law.gain, law.target, law.scale) == (5.0, 0.95, 10)
    assert law.bounds(10) == (1, 100) and law.bounds(0) == (0, 0)


@pytest.mark.parametrize(("load", "step"), [(0.0, 4.92), (0.95, 0.0), (1.0, -1.84), (0.5, 3.83)])
def test_the_step_is_gain_times_the_cube_root_of_the_distance_to_the_target(
    load: float, step: float
) -> None:
    feed = feedback.step(feedback.start(50, 0.0), Reply(load=load), 1.0, Law(blackout=0))
    assert feed.weight - 50 == pytest.approx(step, abs=0.01)


def test_feed_is_a_value() -> None:
    assert feedback.start(3, 1.0) == Feed(3, 3.0, 3, last=1.0)


# ---------------------------------------------------------------- the Balance law

BALANCE = replace(FAST, balance=True)


def simulate_balance(
    capacities: list[float], offered: float, law: Law, periods: int, configured: int = 10
) -> tuple[list[list[int]], list[list[float]]]:
    """As :func:`simulate`, but each server is steered toward the mean load: polled one after
    another, as the checker does, each against the others' last answers."""
    feeds = [feedback.start(configured, 0.0) for _ in capacities]
    weights, loads = [], []
    for period in range(periods):
        now = float(period + 1)
        applied = [f.applied for f in feeds]
        load = [offered * w / sum(applied) / c for w, c in zip(applied, capacities, strict=True)]
        for i, x in enumerate(load):
            reply = agent_answer(x)
            others = feeds[:i] + feeds[i + 1 :]
            mean = feedback.mean_load(reply.load, others, now, law)
            feeds[i] = feedback.step(feeds[i], reply, now, law, mean)
        weights.append([f.applied for f in feeds])
        loads.append(load)
    return weights, loads


@pytest.mark.parametrize("offered", [8.0, 24.0, 36.0])
def test_balance_evens_out_utilisation_and_the_weights_follow_capacity(offered: float) -> None:
    # The weak (10/s) and strong (30/s) servers of the Target tests, at 20 %, 60 % and 90 % of
    # their joint capacity. Target leaves them equal at 20 % (both below it, both at the cap:
    # test_every_server_below_the_target_keeps_rising_to_the_cap_and_stays).
    weights, loads = simulate_balance([10.0, 30.0], offered, BALANCE, periods=150)
    weak, strong = [w[0] for w in weights], [w[1] for w in weights]
    mean = sum(loads[-1]) / 2  # even to within the law's tolerance, where it rests
    assert all(abs(x - mean) <= feedback.BALANCE_TOLERANCE * mean for x in loads[-1]), loads[-1]
    assert abs(loads[-1][0] - loads[-1][1]) < abs(loads[0][0] - loads[0][1]) / 4
    assert 2.4 <= strong[-1] / weak[-1] <= 3.6, weights[-1]
    assert direction_changes(weak) <= 1 and direction_changes(strong) <= 1
    settled = next(i for i in range(len(weights)) if weights[i:] == [weights[-1]] * (150 - i))
    assert settled < 60, weights[:settled]


def test_balance_stays_within_the_bounds_and_rests_on_equal_servers() -> None:
    weights, _ = simulate_balance([10.0, 10.0, 10.0], 15.0, BALANCE, periods=30)
    assert weights == [[10, 10, 10]] * 30, "nothing to even out: no weight moves"
    weights, _ = simulate_balance([1.0, 100.0], 20.0, BALANCE, periods=200)
    assert weights[-1] == [1, 100], "as far as the bounds allow (minWeight 1, scale 10 x 10)"


def test_the_mean_counts_only_real_servers_in_use() -> None:
    law = Law(blackout=5, expiry=30, balance=True)

    def answered(load: float, since: float = 0.0, last: float = 10.0, **kw: object) -> Feed:
        return replace(feedback.start(10, 0.0), since=since, last=last, answered=True,
                       load=load, **kw)  # type: ignore[arg-type]  # fmt: skip

    now = 10.0
    peers = [
        answered(0.2),
        answered(0.9, since=8.0),  # in its blackout
        answered(0.9, last=-25.0),  # expired
        answered(0.9, command=Command.DRAIN),
        replace(answered(0.9), configured=0),
        feedback.start(10, 0.0),  # never answered
    ]
    assert feedback.mean_load(0.6, peers, now, law) == pytest.approx(0.4)
    assert feedback.mean_load(0.6, peers[1:], now, law) is None, "no one to compare with"
    assert feedback.mean_load(None, peers, now, law) is None
    # Alone (or with none to compare), a Balance law holds the weight; commands still count.
    alone = feedback.step(feedback.start(10, 0.0), Reply(load=0.9), 10.0, BALANCE, None)
    assert (alone.applied, alone.weight, alone.load) == (10, 10.0, 0.9)
