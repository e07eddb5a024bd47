"""Detection and recovery times of the agent's health checks against keepalived's, side by side.

Run inside the IPVS test VM (a kernel with IPVS, root, Debian's keepalived installed by
tests/setup.sh), from the checkout::

    .venv/bin/python -m tests.vm.qemu -- python bench/bench_health.py

One NAT topology (tests/kernel/topology.py) with two real servers; the agent's loop directs
from one namespace, keepalived (checker only, ``inhibit_on_failure``) from another, both
checking the same real servers with the same timing: every 1 s, a 0.5 s timeout, two failures
to go down (keepalived: ``retry 1`` with ``delay_before_retry 1``). Each round takes rs1 out in
one of two ways and back, and records when each director's kernel table changed:

- ``refused``: its listener closes (connections are refused at once);
- ``silent``: its port drops every packet (nftables in rs1's namespace), so probes time out.

The agent also needs two successes to take a real server back (keepalived has no rise
counter: one). Bounds: down within 2 x interval + timeout; back within 2 x interval + timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.kernel import health_servers as hs
from tests.kernel.health_bed import (
    Keepalived,
    KeepalivedServer,
    LoopAgent,
    first_times,
    keepalived_namespace,
    keepalived_tcp_config,
    time_until,
    virtual_server,
)
from tests.kernel.topology import Lab, RealServer, build_nat

SERVICE = 8080


def _drop(rs: RealServer, on: bool) -> float:
    """Drop (or stop dropping) every packet to rs1's service port; returns when done."""
    if on:
        rules = (
            "add table inet bench; add chain inet bench in { type filter hook input priority 0; }; "
            f"add rule inet bench in tcp dport {SERVICE} drop"
        )
    else:
        rules = "delete table inet bench"
    rs.ns.run("nft", rules)
    return time.monotonic()


def rounds(count: int) -> list[dict[str, object]]:
    lab = Lab()
    try:
        topology = build_nat(lab, 4, real_servers=2)
        servers = [
            hs.start(lab, rs.ns, hs.Config(rs.name, tcp_ports=[SERVICE]))
            for rs in topology.real_servers
        ]
        rips = [rs.rip for rs in topology.real_servers]
        vip = topology.vip
        check = {"type": "TCP", "interval": "1s", "timeout": "500ms", "failureThreshold": 2}
        vs = virtual_server(
            "web", vip, 80, rips, ports=[{"port": 80, "targetPort": SERVICE}], healthCheck=check
        )
        kdir = keepalived_namespace(lab, topology, "192.0.2.2")
        config = keepalived_tcp_config(
            vip,
            80,
            [KeepalivedServer(a, SERVICE) for a in rips],
            delay_loop=1,
            connect_timeout=0.5,
            retry=1,
            delay_before_retry=1,
        )
        agent = LoopAgent(topology.director, [vs])
        keepalived = Keepalived(kdir, config)
        up = {rips[0]: 1, rips[1]: 1}
        down = {rips[0]: 0, rips[1]: 1}
        found: list[dict[str, object]] = []
        try:
            time_until(lambda: agent.weights(vip, 80) == up, "the agent programs both", 60)
            time_until(lambda: keepalived.weights(vip, 80) == up, "keepalived programs", 60)
            for index in range(count):
                mode = "refused" if index % 2 == 0 else "silent"
                if mode == "refused":
                    gone = servers[0].stop_listening("tcp")
                else:
                    gone = _drop(topology.real_servers[0], True)
                seen = first_times(
                    {
                        "agent": lambda: agent.weights(vip, 80) == down,
                        "keepalived": lambda: keepalived.weights(vip, 80) == down,
                    },
                    "rs1 out",
                )
                back = (
                    servers[0].listen("tcp")
                    if mode == "refused"
                    else _drop(topology.real_servers[0], False)
                )
                returned = first_times(
                    {
                        "agent": lambda: agent.weights(vip, 80) == up,
                        "keepalived": lambda: keepalived.weights(vip, 80) == up,
                    },
                    "rs1 back",
                )
                found.append(
                    {
                        "mode": mode,
                        "down": {k: round(t - gone, 3) for k, t in seen.items()},
                        "up": {k: round(t - back, 3) for k, t in returned.items()},
                    }
                )
                print(json.dumps(found[-1]), file=sys.stderr, flush=True)
                time.sleep(1.5)  # let both checkers see rs1 healthy for a while; not a sync
        finally:
            keepalived.close()
            agent.close()
        return found
    finally:
        lab.close()


def summary(found: list[dict[str, object]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for mode in ("refused", "silent"):
        these = [r for r in found if r["mode"] == mode]
        for edge in ("down", "up"):
            for who in ("agent", "keepalived"):
                values = [float(r[edge][who]) for r in these]  # type: ignore[index]
                if values:
                    out.setdefault(mode, {})[f"{edge} {who}"] = {
                        "median": round(statistics.median(values), 2),
                        "min": round(min(values), 2),
                        "max": round(max(values), 2),
                    }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="take rs1 out and back this often")
    parser.add_argument("--deadline", type=float, default=900.0, help="whole run, seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_health.py: run it in the IPVS VM (tests.vm.qemu), as root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("bench_health.py: --deadline passed"))
    signal.alarm(int(args.deadline))
    found = rounds(args.rounds)
    report = {
        "machine": {"kernel": platform.release(), "python": platform.python_version()},
        "rounds": found,
        "summary": summary(found),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
