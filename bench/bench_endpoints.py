#!/usr/bin/env python3
"""Endpoint-change latency on the lab: EndpointSlice write on the API server -> kernel.

Issue 13 §1. Brings up the lab (tests/e2e/bed.py: kube-apiserver + etcd and the operator on
this host, the node agent of this checkout in the qemu VM on Debian's kernel), creates
``--services`` VirtualServers whose backends are a Service, each with one hand-made
EndpointSlice of ``--reals`` ready endpoints, and waits until the VM's kernel holds every
service with every real server. Then, ``--warmup`` + ``--changes`` times, one after the
other: pick a service (seeded), arm a watch in the VM for a new real server of that service
(tests/e2e/destwatch.py: one netlink ``GET_DEST`` of that one service every ``--poll``
seconds), replace one endpoint's address in its EndpointSlice with the new one (one PUT as
the admin), and collect how long after arming the kernel had it. A change not seen within
``--change-timeout`` is a miss. Reported: p50, p90, p99, max, count and misses (warm-up apart),
the PUT's own round trip, the time to program the table, and the agent's /metrics before and
after the changes (passes, kernel operations).

The figure is an upper bound of write -> netlink operation: the watch is armed before the
write, so it also holds the control channel's reply to the arming, the PUT's round trip and
up to one poll interval. No mocks: a real API server, the real agent and kernel.

Addresses are documentation ranges: VIPs from 198.18.16.0/20 (an AddressPool of their own),
real servers from 198.19.64.0/18, each change's new real server from 198.18.128.0/17. Nothing
answers at them; programming needs no real server to exist.

    .venv/bin/python bench/bench_endpoints.py                    # 2000 x 10, 120 changes
    .venv/bin/python bench/bench_endpoints.py --services 50 --changes 20 --json out.json

Every step is bounded (``--deadline``, ``--program-timeout``, ``--change-timeout``).
Results go to docs/benchmarks.md ("Endpoint changes on the lab").
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kubernetes.client.exceptions import ApiException  # noqa: E402

from bench.bench_operator import load_average, machine  # noqa: E402
from tests.e2e.bed import NODE_NAME, LabBed, stderr_progress, wait_for  # noqa: E402
from tests.operator import harness  # noqa: E402
from tests.vm.qemu import exit_on_signals  # noqa: E402

NAMESPACE = "bench-endpoints"
POOL = "bench-endpoints"
PORT = 80
VIPS = ipaddress.ip_network("198.18.16.0/20")
REALS = ipaddress.ip_network("198.19.64.0/18")
NEW_REALS = ipaddress.ip_network("198.18.128.0/17")
#: The control channel's own bound on one request (tests/e2e/bed.py REQUEST_TIMEOUT is 180 s).
MAX_CHANGE_TIMEOUT = 150.0


class BenchError(AssertionError):
    """The lab did not reach the state the bench needs; the message says which."""


def vip(index: int) -> str:
    return str(VIPS[1 + index])


def real(index: int) -> str:
    """The ``index``-th real-server address (wraps: services share addresses, never within
    one while ``--reals`` is below the range's size)."""
    return str(REALS[1 + index % (REALS.num_addresses - 2)])


def new_real(change: int) -> str:
    return str(NEW_REALS[1 + change])


def name(index: int) -> str:
    return f"svc-{index:05d}"


def virtual_server(index: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{harness.GROUP}/{harness.VERSION}",
        "kind": "VirtualServer",
        "metadata": {"name": name(index), "namespace": NAMESPACE},
        "spec": {
            "address": vip(index),
            "addressPool": POOL,
            "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
            "scheduler": {"name": "wlc"},
            "forwarding": {"method": "NAT"},
            "backends": {"service": {"name": name(index)}},
        },
    }


def endpoint_slice(index: int, addresses: Sequence[str]) -> dict[str, Any]:
    """The Service's one EndpointSlice, as the EndpointSlice controller would write it."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{name(index)}-bench",
            "namespace": NAMESPACE,
            "labels": {
                "kubernetes.io/service-name": name(index),
                "endpointslice.kubernetes.io/managed-by": "bench.ipvs.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": NODE_NAME,
            }
            for address in addresses
        ],
    }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of all at or below it."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def summary(values: Sequence[float | None]) -> dict[str, Any]:
    """p50/p90/p99/max of ``values``, a miss (None) counting as longer than any."""
    landed = sorted(v for v in values if v is not None)
    misses = len(values) - len(landed)
    ordered = landed + [math.inf] * misses

    def figure(x: float) -> float | None:
        return None if math.isinf(x) or math.isnan(x) else round(x, 3)

    return {
        "count": len(values),
        "misses": misses,
        "p50": figure(percentile(ordered, 0.50)),
        "p90": figure(percentile(ordered, 0.90)),
        "p99": figure(percentile(ordered, 0.99)),
        "max": figure(ordered[-1]) if ordered else None,
        "min": figure(landed[0]) if landed else None,
    }


def create_all(bed: LabBed, count: int, reals: list[list[str]], threads: int) -> float:
    """Namespace, pool, then every EndpointSlice and VirtualServer; seconds it took."""

    def tolerate(call: Callable[[], Any]) -> None:
        try:
            call()
        except ApiException as exc:
            if exc.status != 409:  # there already (a rerun)
                raise

    custom, discovery = harness.custom(bed.admin), harness.discovery(bed.admin)
    tolerate(lambda: harness.core(bed.admin).create_namespace({"metadata": {"name": NAMESPACE}}))
    tolerate(
        lambda: custom.create_cluster_custom_object(
            harness.GROUP,
            harness.VERSION,
            "addresspools",
            harness.address_pool(POOL, [str(VIPS)], autoAssign=False),
        )
    )
    started = time.monotonic()

    def one(index: int) -> None:
        body = endpoint_slice(index, reals[index])
        tolerate(lambda: discovery.create_namespaced_endpoint_slice(NAMESPACE, body))
        tolerate(
            lambda: custom.create_namespaced_custom_object(
                harness.GROUP, harness.VERSION, NAMESPACE, "virtualservers", virtual_server(index)
            )
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))  # raises the first failure
    return time.monotonic() - started


def wait_programmed(
    bed: LabBed, services: int, dests: int, timeout: float, began: float
) -> list[dict[str, float]]:
    """Poll the VM's kernel (/proc/net/ip_vs, one read) until it holds ``services`` services
    and ``dests`` real servers; the progress seen (seconds since ``began``)."""
    progress: list[dict[str, float]] = []

    def done() -> bool:
        counts = bed.call("table_counts")
        if not progress or (counts["services"], counts["dests"]) != (
            progress[-1]["services"],
            progress[-1]["dests"],
        ):
            at = round(time.monotonic() - began, 1)
            progress.append({"seconds": at, **counts})
            bed.log(f"kernel: {counts['services']} services, {counts['dests']} real servers "
                    f"({at:.0f}s)")  # fmt: skip
        return bool(counts["services"] >= services and counts["dests"] >= dests)

    try:
        wait_for(f"{services} services and {dests} real servers in the kernel", done, timeout, 5.0)
    except AssertionError as error:
        raise BenchError(f"{error}\n{bed.diagnostics()}") from None
    return progress


def agent_metrics(bed: LabBed) -> dict[str, float]:
    try:
        found: dict[str, float] = bed.call("agent_metrics")
        return found
    except Exception as error:  # the figures are extra: never lose the run for them
        bed.log(f"no agent metrics: {error}")
        return {}


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters and sums that moved between two scrapes."""
    moved = {}
    for key in sorted(after):
        delta = after[key] - before.get(key, 0.0)
        if delta and not key.startswith("ipvs_agent_virtual_servers"):
            moved[key] = round(delta, 4)
    return moved


def change_loop(
    bed: LabBed, args: argparse.Namespace, reals: list[list[str]], deadline: float
) -> list[dict[str, Any]]:
    """Warm-up and measured changes, one at a time; one record each."""
    rng = random.Random(args.seed)
    discovery = harness.discovery(bed.admin)
    records: list[dict[str, Any]] = []
    for change in range(args.warmup + args.changes):
        if time.monotonic() + args.change_timeout + 30 > deadline:
            bed.log(f"deadline: stopping after {change} changes")
            break
        index, slot = rng.randrange(args.services), rng.randrange(args.reals)
        old, new = reals[index][slot], new_real(change)
        armed = bed.call(
            "watch_dest", vip=vip(index), port=PORT, real=f"{new}:{PORT}",
            timeout=args.change_timeout, interval=args.poll,
        )  # fmt: skip
        reals[index][slot] = new
        body = endpoint_slice(index, reals[index])
        t = time.monotonic()
        discovery.replace_namespaced_endpoint_slice(body["metadata"]["name"], NAMESPACE, body)
        put = time.monotonic() - t
        outcome = bed.call("watch_result", handle=armed["handle"], timeout=args.change_timeout)
        record = {
            "change": change,
            "warmup": change < args.warmup,
            "service": name(index),
            "old": old,
            "new": new,
            "seconds": outcome["seconds"],
            "put_seconds": round(put, 4),
            "polls": outcome["polls"],
            "mean_poll_ms": outcome["mean_poll_ms"],
            "dests_before": len(armed["before"]),
            "old_was_there": f"{old}:{PORT}" in armed["before"],
        }
        if outcome["error"]:
            record["error"] = outcome["error"]
        records.append(record)
        seen = "MISS" if outcome["seconds"] is None else f"{outcome['seconds']:.3f}s"
        bed.log(f"change {change + 1}/{args.warmup + args.changes} {name(index)} "
                f"{old} -> {new}: {seen} (PUT {put * 1000:.0f} ms)")  # fmt: skip
    return records


def git_describe() -> str:
    def git(*argv: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip
        return proc.stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain") else ""
    branch, commit = git("rev-parse", "--abbrev-ref", "HEAD"), git("rev-parse", "--short", "HEAD")
    return f"{branch} {commit}{dirty}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    deadline = began + args.deadline
    reals = [[real(i * args.reals + j) for j in range(args.reals)] for i in range(args.services)]
    result: dict[str, Any] = {
        "services": args.services,
        "reals": args.reals,
        "changes_asked": args.changes,
        "warmup_asked": args.warmup,
        "poll_seconds": args.poll,
        "resync_seconds": args.resync_seconds,
        "seed": args.seed,
        "checkout": git_describe(),
        "machine": machine(),
        "load_before": load_average(),
    }
    bed = LabBed(resync_seconds=args.resync_seconds, vm_timeout=args.deadline + 600)
    try:
        bed.start()
        assert bed.guest is not None
        result["guest_kernel"] = bed.guest.hello["kernel"]
        result["lab_up_seconds"] = round(bed.timings.get("total", 0.0), 1)
        # The agent's code in the VM must be this checkout's (bed.py puts it first).
        where = bed.call(
            "run", argv=["python", "-c", "import ipvs_agent; print(ipvs_agent.__file__)"]
        )
        result["agent_code"] = where["stdout"].strip() or where["stderr"][-300:]
        bed.log(f"the agent in the VM runs {result['agent_code']}")
        t = time.monotonic()
        result["create_seconds"] = round(create_all(bed, args.services, reals, args.threads), 1)
        bed.log(f"created {args.services} EndpointSlices and VirtualServers "
                f"in {result['create_seconds']:.0f}s")  # fmt: skip
        timeout = min(args.program_timeout, deadline - time.monotonic())
        progress = wait_programmed(bed, args.services, args.services * args.reals, timeout, t)
        result["program_seconds"] = round(time.monotonic() - t, 1)
        result["program_progress"] = progress
        bed.log(f"kernel programmed: {args.services} x {args.reals} "
                f"{result['program_seconds']:.0f}s after the first create")  # fmt: skip
        before = agent_metrics(bed)
        t = time.monotonic()
        records = change_loop(bed, args, reals, deadline)
        result["changes_seconds"] = round(time.monotonic() - t, 1)
        after = agent_metrics(bed)
        result["load_after"] = load_average()
        measured = [r for r in records if not r["warmup"]]
        warm = [r for r in records if r["warmup"]]
        result["latency"] = summary([r["seconds"] for r in measured])
        result["latency_warmup"] = summary([r["seconds"] for r in warm])
        result["put_seconds"] = summary([r["put_seconds"] for r in measured])
        polls = [r["mean_poll_ms"] for r in records if r["polls"]]
        result["mean_poll_ms"] = round(sum(polls) / len(polls), 2) if polls else None
        result["agent_metrics_delta"] = metrics_delta(before, after)
        for key, figure in (("reconcile_duration_seconds_count", "agent_passes"),
                            ("reconcile_duration_seconds_sum", "agent_pass_seconds")):  # fmt: skip
            name_ = f"ipvs_agent_{key}"
            if name_ in before and name_ in after:  # 0 passes is a figure too
                result[figure] = round(after[name_] - before[name_], 3)
        result["agent_metrics_after"] = after
        result["agent_log_tail"] = bed.agent_log_tail(lines=40).splitlines()
        result["changes"] = records
        return result
    except BaseException:
        with_logs = bed.diagnostics() if bed.guest is not None else ""
        if with_logs:
            print(with_logs[-8000:], file=sys.stderr)
        raise
    finally:
        bed.close()


def report(result: dict[str, Any]) -> str:
    def line(label: str, s: dict[str, Any]) -> str:
        return (f"{label}: p50 {s['p50']} s, p90 {s['p90']} s, p99 {s['p99']} s, max {s['max']} s"
                f" ({s['count']} changes, {s['misses']} missed)")  # fmt: skip

    passes, pass_seconds = result.get("agent_passes"), result.get("agent_pass_seconds")
    mean_pass = round(pass_seconds / passes, 2) if passes and pass_seconds else None
    lines = [
        f"lab: {result['services']} services x {result['reals']} real servers; "
        f"{result['checkout']}; {result['machine']}; guest {result.get('guest_kernel')}",
        f"setup: lab up {result.get('lab_up_seconds')} s, create {result.get('create_seconds')} "
        f"s, kernel programmed {result.get('program_seconds')} s after the first create",
        line("write -> kernel (upper bound)", result["latency"]),
        line("warm-up", result["latency_warmup"]),
        line("PUT round trip", result["put_seconds"]),
        f"watch poll: {result['mean_poll_ms']} ms each, every {result['poll_seconds']} s; "
        f"agent passes during the changes: {passes} (mean {mean_pass} s); goal p99 <= 1 s: "
        + (
            "met"
            if result["latency"]["p99"] is not None and result["latency"]["p99"] <= 1.0
            else "NOT met"
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2000, help="VirtualServers (<= 4000)")
    parser.add_argument("--reals", type=int, default=10, help="endpoints per EndpointSlice")
    parser.add_argument("--changes", type=int, default=120, help="measured endpoint changes")
    parser.add_argument("--warmup", type=int, default=5, help="changes before, reported apart")
    parser.add_argument("--poll", type=float, default=0.02, help="the VM's poll interval (s)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--threads", type=int, default=8, help="parallel creates")
    parser.add_argument(
        "--resync-seconds", type=float, default=30.0, help="the agent's (its default: 30)"
    )
    parser.add_argument("--change-timeout", type=float, default=60.0, help="a miss after this")
    parser.add_argument(
        "--program-timeout", type=float, default=5400.0, help="for the first programming"
    )
    parser.add_argument("--deadline", type=float, default=9000.0, help="the whole run (s)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    exit_on_signals()  # SIGTERM too stops what the run started (see qemu.exit_on_signals)
    if not 1 <= args.services <= 4000 or not 1 <= args.reals <= 1000:
        parser.error("--services must be 1..4000 and --reals 1..1000")
    if not 0 <= args.warmup + args.changes <= 30000:
        parser.error("--warmup + --changes must be at most 30000")
    if not 0 < args.change_timeout <= MAX_CHANGE_TIMEOUT:
        parser.error(f"--change-timeout must be in (0, {MAX_CHANGE_TIMEOUT:.0f}]")
    stderr_progress(f"bench_endpoints: {args.services} x {args.reals}, {args.changes} changes")
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
