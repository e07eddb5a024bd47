"""Dynamic feedback weights against static wrr and wlc, on real servers of different capacity.

Run inside the IPVS test VM (a kernel with IPVS, root), from the checkout::

    .venv/bin/python -m tests.vm.qemu -- python bench/bench_feedback.py [--workload sessions]

One NAT topology (tests/kernel/topology.py), two real servers with equal configured weights
(5) but different capacity: rs1 serves one request at a time, rs2 three, each request held
0.2 s (5 and 15 requests/s). Two workloads, each offering 60 % of the total capacity, so that
an equal split overloads rs1:

- ``requests`` (default): one request per connection, 12 connections/s, open loop. Each
  request keeps its connection open while it waits, so the kernel's count of active
  connections on a real server *is* its queue: wlc sees overload directly.
- ``sessions``: 2 connections/s, each a client that sends 6 requests one after another,
  1 s apart (HTTP keep-alive, a database pool): a connection counts the same whether its
  server is busy or idle, so connection counts do not show the load, as with most real
  traffic.

Each real server runs a feedback agent (HAProxy agent-check) that reports its free capacity
over the last 2 s (``--window``). Per scenario — static wrr, static wlc, feedback (mode Target)
with wlc and with wrr, mode Balance with wlc and with wrr — the load runs for a warm-up (the
feedback law converges) and then a measured stretch, over which it reports each real
server's utilisation (busy slot-seconds over the stretch, from the servers' own accounting),
their spread, the share of requests, p50 and p99 latency of the requests, errors, and how
often the weights changed.

Feedback settings: target 80 %, gain 5, scale 10 (weights 1..50), blackout 0.5 s, period 1 s
(``--period``; the test bed compresses time, LVS suggests 5-20 s) and write threshold 15 %, the
API's default (``--threshold``). ``--repeats N`` runs the scenarios N times, interleaved, and
reports each one's medians: one run cannot tell 0.54 s from 0.47 s in this noisy bed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kernel import health_servers as hs
from tests.kernel.health_bed import LoopAgent, time_until, virtual_server
from tests.kernel.topology import Lab, build_nat

WORK, AGENT = 8000, 3333
FEEDBACK: dict[str, Any] = {
    "agent": {"port": AGENT},
    "period": "1s",
    "timeout": "250ms",
    "blackout": "500ms",
    "expiry": "5s",
    "targetLoadPercent": 80,
}
#: mode Balance: each real server toward the mean load (its target is unused).
BALANCE = {**FEEDBACK, "mode": "Balance"}
SCENARIOS: dict[str, dict[str, Any]] = {
    "wrr": {"scheduler": {"name": "wrr"}},
    "wlc": {"scheduler": {"name": "wlc"}},
    "feedback+wlc": {"scheduler": {"name": "wlc"}, "feedback": FEEDBACK},
    "feedback+wrr": {"scheduler": {"name": "wrr"}, "feedback": FEEDBACK},
    "balance+wlc": {"scheduler": {"name": "wlc"}, "feedback": BALANCE},
    "balance+wrr": {"scheduler": {"name": "wrr"}, "feedback": BALANCE},
}


def scenario(
    name: str,
    agent: LoopAgent,
    servers: dict[str, hs.RealServer],
    topology: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rips = [rs.rip for rs in topology.real_servers]
    vip = topology.vip
    vs = virtual_server(
        "work",
        vip,
        WORK,
        rips,
        backends={"defaultWeight": 5, "static": [{"address": a} for a in rips]},
        **SCENARIOS[name],
    )
    agent.set([])  # a fresh start: no weights or feedback state from the scenario before
    time_until(lambda: agent.weights(vip, WORK) == {}, f"{name}: a clean table", 60)
    agent.set([vs])
    equal = {rips[0]: 5, rips[1]: 5}
    time_until(lambda: agent.weights(vip, WORK) == equal, f"{name}: programmed", 60)
    for server in servers.values():  # nothing left queued from the scenario before
        time_until(lambda: server.stats()["queued"] == 0, "queues drained", 120)  # noqa: B023
    total = args.warmup + args.measure
    weights: list[dict[str, int]] = []

    def sample(until: float) -> bool:
        weights.append(agent.weights(vip, WORK))
        return time.monotonic() >= until

    sessions = args.workload == "sessions"
    with hs.offered_load(
        topology.client.ns,
        vip,
        WORK,
        args.session_rate if sessions else args.rate,
        total,
        per_session=args.per_session if sessions else 1,
        think=args.think,
    ) as results:
        started = time.monotonic()
        time_until(lambda: sample(started + args.warmup), "warm-up", total, 0.5)
        first = {n: s.stats() for n, s in servers.items()}
        time_until(lambda: sample(started + total), "measured stretch", total + 5, 0.5)
        last = {n: s.stats() for n, s in servers.items()}
        outcomes = results()
    measured = [o for o in outcomes if o.start >= args.warmup]
    latencies = [o.latency for o in measured if o.served_by in servers]
    share = {n: sum(1 for o in measured if o.served_by == n) for n in servers}
    utilisation = {
        n: round(
            (last[n]["busy"] - first[n]["busy"])
            / (servers[n].config.slots * (last[n]["at"] - first[n]["at"])),
            3,
        )
        for n in servers
    }
    tail = weights[-int(args.measure * 2) :]
    writes = sum(1 for a, b in itertools.pairwise(tail) if a != b)
    return {
        "scenario": name,
        "utilisation": utilisation,
        "spread": round(abs(utilisation["rs1"] - utilisation["rs2"]), 3),
        "share": share,
        "p50_s": round(hs.percentile(latencies, 0.5), 3),
        "p99_s": round(hs.percentile(latencies, 0.99), 3),
        "errors": sum(1 for o in measured if o.served_by not in servers),
        "requests": len(measured),
        "weights_end": weights[-1] if weights else {},
        "weight_changes_measured": writes,
    }


def medians(found: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per scenario, the median over the repeats of spread, p50, p99 and weight writes."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["scenario"] for r in found):
        runs = [r for r in found if r["scenario"] == name]
        out[name] = {
            key: statistics.median(r[key] for r in runs)
            for key in ("spread", "p50_s", "p99_s", "weight_changes_measured")
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workload",
        choices=["requests", "sessions"],
        default="requests",
        help="requests: one request per connection, at --rate; sessions: connections at "
        "--session-rate, each with --per-session requests and --think seconds between them",
    )
    parser.add_argument("--rate", type=float, default=12.0, help="requests per second offered")
    parser.add_argument("--session-rate", type=float, default=2.0, help="sessions per second")
    parser.add_argument("--per-session", type=int, default=6, help="requests per session")
    parser.add_argument("--think", type=float, default=1.0, help="seconds between requests")
    parser.add_argument("--warmup", type=float, default=25.0, help="seconds before measuring")
    parser.add_argument("--measure", type=float, default=30.0, help="seconds measured")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma separated, of: " + ", ".join(SCENARIOS),
    )
    parser.add_argument("--period", default="1s", help="feedback period")
    parser.add_argument("--threshold", type=int, default=15, help="feedback thresholdPercent")
    parser.add_argument("--window", type=float, default=2.0, help="agents' measuring window, s")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run the scenarios this many times, interleaved"
    )
    parser.add_argument("--deadline", type=float, default=1500.0, help="whole run, seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_feedback.py: run it in the IPVS VM (tests.vm.qemu)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("bench_feedback.py: --deadline passed"))
    signal.alarm(int(args.deadline))
    FEEDBACK.update(period=args.period, thresholdPercent=args.threshold)
    lab = Lab()
    found = []
    try:
        topology = build_nat(lab, 4, real_servers=2)
        capacity = {"rs1": 1, "rs2": 3}
        servers = {
            rs.name: hs.start(
                lab,
                rs.ns,
                hs.Config(
                    rs.name,
                    work_port=WORK,
                    agent_port=AGENT,
                    slots=capacity[rs.name],
                    service=0.2,
                    window=args.window,
                ),
            )
            for rs in topology.real_servers
        }
        agent = LoopAgent(topology.director, [])
        try:
            for repeat in range(args.repeats):
                for name in args.scenarios.split(","):
                    result = scenario(name, agent, servers, topology, args)
                    found.append({"repeat": repeat, **result})
                    print(json.dumps(found[-1]), file=sys.stderr, flush=True)
        finally:
            agent.close()
    finally:
        lab.close()
    report = {
        "machine": {"kernel": platform.release(), "python": platform.python_version()},
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "scenarios": found,
        "medians": medians(found),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
