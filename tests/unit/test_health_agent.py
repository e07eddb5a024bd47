"""Health checks and feedback in the agent: targets, the checker shell on a hand-moved clock,
and their decisions as planner inputs (plan → diff → the in-memory kernel), and the report."""

from __future__ import annotations

import ipaddress
import itertools
import random
import threading
from dataclasses import replace
from typing import Any

from ipvs_agent.agent import Agent, Settings
from ipvs_agent.desired import Node, State, plan
from ipvs_agent.health import metrics as health_metrics
from ipvs_agent.health.checker import Checker
from ipvs_agent.health.probes import Result
from ipvs_agent.health.targets import Poll, Probe, targets
from ipvs_agent.health.verdict import Adjustment, Attention, RealServerHealth
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.model import DestKey, DestStats, Protocol, ServiceKey
from ipvs_agent.ops import OpKind
from ipvs_agent.reconciler import Memory, reconcile
from ipvs_agent.snapshot import take
from ipvs_agent.status import entry
from ipvs_api.types import OnFailure
from tests.unit.agent_helpers import FakeHost, StubMirror, endpoints, slice_, vs

NODE = Node("node-a", {"edge": "true"})
RS1, RS2 = "198.51.100.11", "198.51.100.12"
TCP = {"type": "TCP", "interval": "1s", "timeout": "500ms", "failureThreshold": 2}
HTTP80 = ServiceKey.for_address(ipaddress.ip_address("192.0.2.1"), Protocol.TCP, 80)


def checked(**spec: Any) -> Any:
    body: dict[str, Any] = {
        "address": "192.0.2.1",
        "ports": [{"port": 80, "targetPort": 8080}],
        "healthCheck": TCP,
        "backends": {"static": [{"address": RS1}, {"address": RS2, "weight": 3}]},
    }
    body.update(spec)
    return vs(**{k: v for k, v in body.items() if v is not None})


def weights(p: Any, key: ServiceKey = HTTP80) -> dict[str, int]:
    return {d.key.address: d.weight for d in p.table[key].dests.values()}


# ---------------------------------------------------------------- planner inputs


def test_a_down_real_server_is_quiesced_and_counted_as_down_not_draining() -> None:
    down = {"ns/web": {(RS1, 0): Adjustment(True, attention=Attention.DOWN, message="refused")}}
    p = plan([checked()], {}, NODE, adjustments=down)
    assert weights(p) == {RS1: 0, RS2: 3}
    o = p.outcomes["ns/web"]
    assert (o.real_servers, o.draining_real_servers, o.down_real_servers) == (1, 0, 1)
    assert o.health == (RealServerHealth(RS1, 0, Attention.DOWN, "refused"),)
    assert p.remove_now == frozenset()


def test_a_removed_real_server_leaves_the_table_at_once_instead_of_draining() -> None:
    kernel, host, memory = FakeKernel(), FakeHost(), Memory()
    objects = [
        {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "VirtualServer",
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {
                "address": "192.0.2.1",
                "ports": [{"port": 80}],
                "healthCheck": {**TCP, "onFailure": "Remove"},
                "backends": {"static": [{"address": RS1}, {"address": RS2}]},
            },
        }
    ]
    snap = take(objects, [], NODE)
    reconcile(snap, kernel, host, memory, 0)
    key = next(iter(kernel.dump()))
    # Even with a connection on it, a removed real server is not drained.
    kernel.set_dest_stats(key, DestKey(RS1, 80), DestStats(active_connections=5))
    removed = {"ns/web": {(RS1, 0): Adjustment(True, True, attention=Attention.DOWN)}}
    result = reconcile(replace(snap, adjustments=removed), kernel, host, memory, 1)
    assert [(op.kind, op.dest.key.address if op.dest else "") for op in result.ops] == [
        (OpKind.DEL_DEST, RS1)
    ]
    back = reconcile(snap, kernel, host, memory, 2)
    assert [op.kind for op in back.ops] == [OpKind.ADD_DEST]


def test_feedback_weights_and_maxconn_replace_the_configured_ones() -> None:
    adjust = {
        "ns/web": {
            (RS1, 0): Adjustment(weight=7, upper_threshold=40),
            (RS2, 0): Adjustment(weight=25),
        }
    }
    p = plan([checked(healthCheck=None)], {}, NODE, adjustments=adjust)
    dests = {d.key.address: d for d in p.table[HTTP80].dests.values()}
    assert (dests[RS1].weight, dests[RS1].upper_threshold, dests[RS1].lower_threshold) == (
        7,
        40,
        30,
    )
    assert (dests[RS2].weight, dests[RS2].upper_threshold) == (25, 0)


def test_a_real_server_configured_at_weight_zero_stays_at_zero() -> None:
    static = {"static": [{"address": RS1, "weight": 0}, {"address": RS2}]}
    adjust = {"ns/web": {(RS1, 0): Adjustment(weight=9)}}
    p = plan([checked(backends=static)], {}, NODE, adjustments=adjust)
    assert weights(p) == {RS1: 0, RS2: 1}


def test_feedback_applies_to_ready_endpoints_of_a_service() -> None:
    v = vs(address="192.0.2.1", ports=[{"port": 80}], backends={"service": {"name": "web"}})
    eps = endpoints(
        slice_(
            [
                ("10.1.0.5", {"ready": True}, "node-a"),
                ("10.1.0.6", {"ready": False, "serving": True, "terminating": True}, "node-a"),
            ],
            [("", 80, "TCP")],
        )
    )
    adjust = {
        "ns/web": {("10.1.0.5", 0): Adjustment(weight=4), ("10.1.0.6", 0): Adjustment(weight=9)}
    }
    p = plan([v], {("ns", "web"): eps}, NODE, adjustments=adjust)
    assert weights(p) == {"10.1.0.5": 4, "10.1.0.6": 0}  # a draining endpoint stays drained


# ---------------------------------------------------------------- targets


def test_targets_share_identical_probes_and_pick_the_port_to_check() -> None:
    a = checked()
    b = checked(name="other", address="192.0.2.2")
    c = checked(
        name="udp",
        ports=[{"port": 53, "protocol": "UDP"}],
        healthCheck={**TCP, "port": 5353},
        backends={"static": [{"address": RS1, "checkAddress": "198.51.100.111"}]},
    )
    quiet = checked(name="elsewhere", nodeSelector={"matchLabels": {"edge": "false"}})
    t = targets([a, b, c, quiet], {}, NODE)
    by_probe = {(str(p.address), p.port): refs for p, refs in t.probes.items()}
    assert by_probe == {
        (RS1, 8080): {("ns/web", (RS1, 0)), ("ns/other", (RS1, 0))},
        (RS2, 8080): {("ns/web", (RS2, 0)), ("ns/other", (RS2, 0))},
        ("198.51.100.111", 5353): {("ns/udp", (RS1, 0))},
    }
    assert t.on_failure == {k: OnFailure.QUIESCE for k in ("ns/web", "ns/other", "ns/udp")}


def test_nothing_is_checked_before_the_virtual_server_has_an_address() -> None:
    pending = checked(address=None, addressPool="default")
    assert targets([pending], {}, NODE).probes == {}


def test_feedback_targets_static_servers_and_local_ready_endpoints() -> None:
    fb = {"agent": {"port": 3333}, "period": "2s"}
    v = vs(
        address="192.0.2.1",
        ports=[{"port": 80}],
        feedback=fb,
        trafficPolicy="Local",
        backends={"service": {"name": "web"}, "defaultWeight": 10},
    )
    eps = endpoints(
        slice_(
            [
                ("10.1.0.5", {"ready": True}, "node-a"),
                ("10.1.0.6", {"ready": True}, "node-b"),
                ("10.1.0.7", {"ready": False}, "node-a"),
            ],
            [("", 80, "TCP")],
        )
    )
    t = targets([v], {("ns", "web"): eps}, NODE)
    assert list(t.feeds) == [("ns/web", ("10.1.0.5", 0))]
    ft = t.feeds[("ns/web", ("10.1.0.5", 0))]
    assert (ft.poll.port, ft.poll.period, ft.configured) == (3333, 2.0, 10)


# ---------------------------------------------------------------- the checker shell


class NoJitter(random.Random):
    """First probes at once, so a test knows when each probe runs."""

    def uniform(self, a: float, b: float) -> float:
        return a


class Bed:
    """A checker on a hand-moved clock, running probes at once with scripted results."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.now = 100.0
        self.results: dict[str, list[bool]] = {}
        self.answers: dict[str, list[bytes]] = {}
        self.wakes = 0
        self.probed: list[tuple[str, float]] = []
        self.checker = Checker(
            self.wake,
            clock=lambda: self.now,
            probe=self.probe,
            ask=self.ask,
            submit=lambda job: job(),
            rng=rng or NoJitter(),
        )

    def wake(self) -> None:
        self.wakes += 1

    def probe(self, p: Probe) -> Result:
        self.probed.append((str(p.address), self.now))
        queue = self.results.get(str(p.address), [])
        ok = queue.pop(0) if queue else True
        return Result(ok, "" if ok else "connection refused", 0.002)

    def ask(self, q: Poll) -> tuple[bytes, str]:
        queue = self.answers.get(str(q.address), [])
        if not queue:
            return b"", "connection refused"
        return queue.pop(0), ""

    def advance(self, seconds: float, step: float = 0.1) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = min(end, self.now + step)
            self.checker.run_due()


def test_first_probes_are_spread_over_the_first_interval_then_one_per_interval() -> None:
    bed = Bed(random.Random(7))
    servers = {"static": [{"address": f"198.51.100.{i}"} for i in range(10, 30)]}
    bed.checker.configure(targets([checked(backends=servers)], {}, NODE))
    bed.advance(1.0, step=0.05)
    firsts = sorted(t for _, t in bed.probed)
    assert len(firsts) == 20 and firsts[-1] - firsts[0] > 0.5  # not in step
    bed.advance(3.0, step=0.05)
    per_server: dict[str, list[float]] = {}
    for address, t in bed.probed:
        per_server.setdefault(address, []).append(t)
    for times in per_server.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(abs(g - 1.0) < 0.051 for g in gaps), gaps


def test_a_failing_server_goes_down_after_the_threshold_wakes_the_loop_and_comes_back() -> None:
    bed = Bed()
    bed.checker.configure(targets([checked()], {}, NODE))
    assert bed.checker.adjustments() == {}
    bed.results[RS1] = [False, False, True, True]
    bed.advance(1.0)
    assert bed.wakes == 0 and bed.checker.adjustments() == {}  # one failure: still up
    bed.advance(1.0)
    assert bed.wakes == 1
    assert bed.checker.adjustments() == {
        "ns/web": {
            (RS1, 0): Adjustment(True, attention=Attention.DOWN, message="connection refused")
        }
    }
    bed.advance(1.0)
    assert bed.wakes == 1  # one success: still down, nothing to plan anew
    bed.advance(1.0)
    assert bed.wakes == 2 and bed.checker.adjustments() == {}


def test_a_server_that_starts_down_is_out_until_its_first_success() -> None:
    bed = Bed()
    bed.checker.configure(targets([checked(healthCheck={**TCP, "initialState": "Down"})], {}, NODE))
    first = bed.checker.adjustments()["ns/web"]
    assert set(first) == {(RS1, 0), (RS2, 0)} and all(a.down for a in first.values())
    bed.advance(1.0)
    assert bed.checker.adjustments() == {} and bed.wakes >= 1


def test_reconfiguring_keeps_the_state_of_unchanged_probes_and_drops_the_rest() -> None:
    bed = Bed()
    bed.results[RS1] = [False, False]
    bed.checker.configure(targets([checked()], {}, NODE))
    bed.advance(2.0)
    assert (RS1, 0) in bed.checker.adjustments()["ns/web"]
    bed.checker.configure(targets([checked()], {}, NODE))  # a resync: the same targets
    assert (RS1, 0) in bed.checker.adjustments()["ns/web"]
    bed.checker.configure(targets([], {}, NODE))
    assert bed.checker.adjustments() == {}
    bed.probed.clear()
    bed.advance(3.0)
    assert bed.probed == []


def test_feedback_drain_weights_blackout_and_expiry_through_the_checker() -> None:
    bed = Bed()
    fb = {"agent": {"port": 3333}, "period": "1s", "blackout": "3s", "expiry": "5s"}
    v = checked(
        healthCheck=None, feedback=fb, backends={"static": [{"address": RS1, "weight": 10}]}
    )
    bed.checker.configure(targets([v], {}, NODE))
    bed.answers[RS1] = [b"100%\n"] * 5 + [b"drain\n"]
    bed.advance(2.0)  # the first answer comes within the first period, at random
    assert bed.checker.adjustments() == {}  # blackout: the configured weight
    bed.advance(3.0)
    weight = bed.checker.adjustments()["ns/web"][(RS1, 0)].weight
    assert weight is not None and weight > 10
    bed.advance(1.5)
    assert bed.checker.adjustments()["ns/web"][(RS1, 0)].attention is Attention.DRAIN
    wakes = bed.wakes
    bed.advance(6.0)  # the agent is silent: everything it said expires
    stale = bed.checker.adjustments()["ns/web"][(RS1, 0)]
    assert stale == Adjustment(
        attention=Attention.STALE,
        message="feedback agent silent for 5s (connection refused)",
    )
    assert bed.wakes > wakes


def test_balance_steers_each_real_server_toward_the_mean_of_its_virtual_server() -> None:
    """Through the checker: each real server's answer is judged against the last answers of
    the other real servers of the same VirtualServer (only), whatever order they come in."""
    bed = Bed()
    fb = {"agent": {"port": 3333}, "period": "1s", "blackout": "0s", "mode": "Balance"}
    servers = {"static": [{"address": RS1, "weight": 10}, {"address": RS2, "weight": 10}]}
    lone = {"static": [{"address": "198.51.100.13", "weight": 10}]}
    other = checked(name="other", address="192.0.2.2", healthCheck=None, feedback=fb,
                    backends=lone)  # fmt: skip
    bed.checker.configure(
        targets([checked(healthCheck=None, feedback=fb, backends=servers), other], {}, NODE)
    )
    bed.answers[RS1] = [b"10%\n"] * 3  # load 0.9
    bed.answers[RS2] = [b"70%\n"] * 3  # load 0.3: the mean is 0.6
    bed.answers["198.51.100.13"] = [b"0%\n"] * 3  # alone: nobody to balance against
    bed.advance(3.0)
    moved = bed.checker.adjustments()["ns/web"]
    weak, strong = moved[(RS1, 0)].weight, moved[(RS2, 0)].weight
    assert weak is not None and strong is not None and weak < 10 < strong
    lone_weight = bed.checker.adjustments()["ns/other"][("198.51.100.13", 0)].weight
    assert lone_weight == 10, "a lone real server keeps its weight, however loaded"


def test_metrics_of_probes_transitions_and_feedback() -> None:
    bed = Bed()
    fb = {"agent": {"port": 3333}, "period": "1s", "blackout": "0s"}
    agent = Agent(Settings("node-a"), FakeKernel(), FakeHost(), [], threading.Event())
    bed.checker.observer = health_metrics.register(agent.metrics.registry, bed.checker)
    bed.checker.configure(targets([checked(feedback=fb)], {}, NODE))
    bed.results[RS1] = [False, False]
    bed.answers[RS2] = [b"50%"] * 3
    bed.advance(2.0)
    text = agent.metrics.exposition().decode()
    labels = 'namespace="ns",real_server="{}",virtualserver="web"'
    assert "ipvs_agent_real_server_up{" + labels.format(RS1) + "} 0.0" in text
    assert 'ipvs_agent_health_transitions_total{to="down"} 1.0' in text
    assert 'ipvs_agent_health_probe_duration_seconds_count{result="failure",type="TCP"} 2.0' in text
    assert "ipvs_agent_feedback_load{" + labels.format(RS2) + "} 0.5" in text
    assert 'ipvs_agent_feedback_polls_total{result="answered"} 2.0' in text


# ---------------------------------------------------------------- the agent loop and report


def test_the_agent_plans_the_checkers_decisions_and_reports_them() -> None:
    bed = Bed()
    obj = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "ns", "generation": 1},
        "spec": {
            "address": "192.0.2.1",
            "ports": [{"port": 80}],
            "healthCheck": TCP,
            "backends": {"static": [{"address": RS1}, {"address": RS2}]},
        },
        "status": {"address": "192.0.2.1"},
    }
    reports: list[dict[str, Any]] = []
    kernel = FakeKernel()
    agent = Agent(
        Settings("node-a"),
        kernel,
        FakeHost(),
        [StubMirror("virtualservers", [obj]), StubMirror("endpointslices", [])],
        threading.Event(),
        report=lambda status, uid: reports.append(status),
        checker=bed.checker,
    )
    agent.run_once("change")
    bed.results[RS1] = [False, False]
    bed.advance(2.0)
    agent.run_once("change")
    (service,) = kernel.dump().values()
    assert {d.address: od.dest.weight for d, od in service.dests.items()} == {RS1: 0, RS2: 1}
    (report,) = reports[-1]["virtualServers"]
    assert report["realServers"] == 1 and report["drainingRealServers"] == 0
    assert report["downRealServers"] == 1
    assert report["realServerHealth"] == [
        {"address": RS1, "state": "Down", "message": "connection refused"}
    ]


def test_a_report_without_health_has_no_health_fields() -> None:
    p = plan([checked(healthCheck=None)], {}, NODE)
    out = entry("ns/web", p.outcomes["ns/web"])
    assert "downRealServers" not in out and "realServerHealth" not in out
    assert p.outcomes["ns/web"].state is State.PROGRAMMED


def test_a_protected_port_of_this_node_is_never_probed_nor_polled() -> None:
    """The node's own kubelet, API server, etcd... are no target, as they are no real server:
    a check there fails without a packet sent, a feedback agent there is never asked."""
    node = Node(
        "node-a",
        {"edge": "true"},
        addresses=frozenset({ipaddress.ip_address(RS1)}),
        protected_ports=frozenset({10250}),
    )
    fb = {"agent": {"port": 10250}, "period": "1s", "expiry": "5s"}
    t = targets([checked(healthCheck={**TCP, "port": 10250}, feedback=fb)], {}, node)
    why = "not probed: 10250 is a protected port of this node"
    assert {str(p.address): p.refused for p in t.probes} == {RS1: why, RS2: ""}
    assert {ref[1][0]: ft.poll.refused for ref, ft in t.feeds.items()} == {RS1: why, RS2: ""}
    bed = Bed()
    bed.answers[RS1] = [b"drain\n"] * 20
    bed.answers[RS2] = [b"100%\n"] * 20
    bed.checker.configure(t)
    bed.advance(6.5)
    assert {a for a, _ in bed.probed} == {RS2}  # RS1 was never probed
    assert len(bed.answers[RS1]) == 20 and len(bed.answers[RS2]) < 20  # nor asked
    out = bed.checker.adjustments()["ns/web"][(RS1, 0)]
    assert out.down and out.attention is Attention.DOWN and out.message == why
