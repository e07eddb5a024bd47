"""The agent's full pass with its real host side, at S services x D real servers.

bench_kernel.py (d) times the pass against a stand-in host that owns every service and does
nothing; the in-cluster agent's pass also lists and writes its nftables tables, reads and
writes its state file and syncs its virtual addresses (``system.LinuxHost``). This bench runs
that whole pass, in a private network namespace of the IPVS test VM::

    .venv/bin/python -m tests.vm.qemu -- python bench/bench_host_pass.py [--profile]

It programs the table (the first pass), then times ``--rounds`` resyncs (nothing to do) and
``--rounds`` drift audits (``ipvs_agent.audit``: the reading and judging the in-cluster agent
does beside its loop instead of a resync pass) next to one ``ipvsadm -Ln`` of the same table,
and with ``--profile`` prints where one more resync spends its time (cProfile, cumulative).
Every step is bounded by ``--deadline``.
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import json
import os
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))

from bench.bench_kernel import inside, machine, run  # noqa: E402

NETNS = "ipvs-bench-host"


def virtual_server(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": f"vs{i}", "namespace": "bench", "generation": 1,
                     "resourceVersion": str(i + 1)},
        "spec": {"address": str(ipaddress.IPv4Address("198.18.16.1") + i),
                 "ports": [{"port": 80}], "scheduler": {"name": "wlc"},
                 "backends": {"service": {"name": f"s{i}"}}},
    }  # fmt: skip


def endpoint_slice(i: int, dests: int) -> dict[str, Any]:
    first = ipaddress.IPv4Address("198.19.64.1") + i * dests
    return {
        "metadata": {"name": f"s{i}-1", "namespace": "bench", "resourceVersion": str(10**6 + i),
                     "labels": {"kubernetes.io/service-name": f"s{i}"}},
        "addressType": "IPv4",
        "ports": [{"port": 80, "protocol": "TCP"}],
        "endpoints": [{"addresses": [str(first + j)], "conditions": {"ready": True}}
                      for j in range(dests)],
    }  # fmt: skip


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from ipvs_agent.audit import Auditor, expected_after
    from ipvs_agent.desired import Node
    from ipvs_agent.host.podnetns import PodNamespaces
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.reconciler import Memory, reconcile
    from ipvs_agent.snapshot import EndpointCache, ReadCache, take
    from ipvs_agent.system import LinuxHost

    objects = [virtual_server(i) for i in range(args.services)]
    slices = [endpoint_slice(i, args.dests) for i in range(args.services)]
    host = LinuxHost(
        netns=NETNS,
        pods=PodNamespaces([], None, own=f"/run/netns/{NETNS}"),
        state_dir=tempfile.mkdtemp(prefix="bench-state-"),
    )
    with IPVSKernel(netns=NETNS) as kernel:
        node = Node("bench", {}, kernel.info())
        memory, cache, endpoints = Memory(), ReadCache(), EndpointCache()

        last: list[Any] = []

        def one_pass() -> tuple[float, int]:
            began = time.perf_counter()
            snap = take(objects, slices, node, cache=cache, endpoint_cache=endpoints)
            result = reconcile(snap, kernel, host, memory, time.monotonic())
            if result.failures:
                raise RuntimeError(f"pass failed: {result.failures[0]}")
            last[:] = [result]
            return time.perf_counter() - began, len(result.ops)

        first, ops = one_pass()
        resyncs = []
        for _ in range(args.rounds):
            took, left = one_pass()
            if left:
                raise RuntimeError(f"a resync of an unchanged table sent {left} ops")
            resyncs.append(took)
        expected = expected_after(1, last[0], memory)
        auditor = Auditor(IPVSKernel(netns=NETNS), host.reader())
        audits = []
        try:
            for _ in range(args.rounds):
                began = time.perf_counter()
                finding = auditor.audit(expected, lambda generation: frozenset())
                audits.append(time.perf_counter() - began)
                if finding is None or finding:
                    raise RuntimeError(f"an audit of an unchanged table found {finding}")
        finally:
            auditor.kernel.close()
            if auditor.host is not None:
                auditor.host.close()
        with inside(NETNS):
            began = time.perf_counter()
            run(["ipvsadm", "-Ln"], 600)
            listing = time.perf_counter() - began
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            one_pass()
            profile.disable()
            pstats.Stats(profile, stream=sys.stderr).sort_stats("cumtime").print_stats(30)
        if args.profile_audit:
            reading = Auditor(IPVSKernel(netns=NETNS), host.reader())
            profile = cProfile.Profile()
            profile.enable()
            reading.audit(expected, lambda generation: frozenset())
            profile.disable()
            reading.kernel.close()
            pstats.Stats(profile, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return {
        "first pass (programs the table)": first,
        "first pass ops": ops,
        "resync passes": resyncs,
        "ipvsadm -Ln": listing,
        "resync ratio vs -Ln (best)": min(resyncs) / listing,
        "drift audits": audits,
        "audit ratio vs -Ln (best)": min(audits) / listing,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--dests", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-audit", action="store_true", help="profile one drift audit")
    parser.add_argument("--deadline", type=float, default=1200.0, help="whole run, seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_host_pass: needs root and an IPVS kernel (run it in the test VM)")

    def out_of_time(signum: int, frame: object) -> None:
        raise RuntimeError(f"the benchmark ran longer than --deadline {args.deadline:.0f}s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.deadline))
    run(["ip", "netns", "add", NETNS], 60)
    try:
        run(["ip", "-n", NETNS, "link", "set", "lo", "up"], 60)
        report = {"machine": machine(), "args": vars(args) | {"json": None}} | bench(args)
    finally:
        run(["ip", "netns", "del", NETNS], 120)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
