"""Connections through a director's loss, behind a BGP router with ECMP (run inside the VM).

    .venv/bin/python -m tests.vm.qemu -- python bench/bench_bgp.py [--connections 200]

For each configuration — DR, TUN and NAT with ``mh`` and connection sync, and the baseline of
DR with ``wlc`` and no sync — and each event — one of two directors stopped (SIGTERM: withdraw,
then ExaBGP closes its sessions) or killed (silent: every packet dropped, its agent and ExaBGP
gone) — it builds the bed of tests/kernel/bgpbed.py (BIRD router, two directors with the agent's
pass and BGP speaker, a client behind the router), holds ``--connections`` TCP connections
through the router, applies the event, waits until the router's FIB has only the surviving
director, then asks every held connection for its real server's name again. Reported: how many
went through the lost director, how many survived (same real server), how long the route took
to go, and how long until a new connection succeeded. Every step is bounded in time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ipvs_agent.kernel.ipvs import IPVSKernel  # noqa: E402
from tests.kernel import bgpbed  # noqa: E402
from tests.kernel.topology import Lab  # noqa: E402
from tests.kernel.traffic import open_tcp, wait_for  # noqa: E402

CONFIGS = (
    ("DR", "mh", True),
    ("TUN", "mh", True),
    ("NAT", "mh", True),
    ("DR", "wlc", False),
)


def _through(d: bgpbed.Director, vip: str) -> int:
    """Connection entries for ``vip`` in the director's table (its own and, with sync, the
    other's)."""
    from tests.kernel.traffic import _address

    with d.ns.entered(), open("/proc/thread-self/net/ip_vs_conn") as handle:
        lines = handle.read().splitlines()[1:]
    return sum(1 for line in lines if _address(line.split()[3]) == vip)


def _scheduled(d: bgpbed.Director) -> int:
    """Connections this director scheduled itself (its service counter; synced ones do not
    count), as of the kernel's last 2-second estimator tick."""
    with IPVSKernel(netns=d.ns.name) as kernel:
        return sum(s.stats.connections for s in kernel.dump().values())


def run(
    method: str, scheduler: str, sync: bool, event: str, count: int, work: Path, attempt: float
) -> str:
    lab = Lab()
    try:
        with bgpbed.bed(lab, work, directors=2, real_servers=2, method=method, sync=sync) as bed:
            d1, d2 = bed.directors
            peers, pool = bgpbed.peer_objects(), bgpbed.pool_object()
            vs = bgpbed.virtual_server(bgpbed.VIP4, method, bed.real_servers, scheduler=scheduler)
            for d in bed.directors:
                bed.pass_on(d, [vs], pool, peers)
            for d in bed.directors:
                wait_for(lambda d=d: bed.established(d, ["r1"]), "sessions", 240, 0.5)  # type: ignore[misc]
            bed.wait_next_hops(bgpbed.VIP4, {d1.addr4, d2.addr4}, 60)
            sockets, names = [], []
            for _ in range(count):
                sock, name = open_tcp(bed.client, bgpbed.VIP4, bgpbed.PORT)
                if sock is not None:
                    sockets.append(sock)
                    names.append(name)
            # both counters have caught up (estimator tick), and with sync the survivor has
            # learned the other's connections (bounded waits)
            wait_for(lambda: _scheduled(d1) + _scheduled(d2) >= len(sockets), "counters", 30, 0.5)
            lost_director = _scheduled(d2)
            if sync:
                wait_for(lambda: _through(d1, bgpbed.VIP4) >= len(sockets), "sync", 30, 0.5)
            started = time.monotonic()
            if event == "stop":
                bed.stop_director(d2)
            else:
                bed.kill_director(d2)
            # New connections from the event on, one at a time (``attempt`` seconds each at
            # most), until the route has converged and 5 in a row succeeded: when did they work
            # again for good? An attempt is judged when it ends: it began up to ``attempt``
            # earlier. ``last_failure`` is when the last failed attempt *began* (None: none).
            gone, last_failure, streak = -1.0, None, 0
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and (gone < 0 or streak < 5):
                if gone < 0 and bed.next_hops(bgpbed.VIP4) == {d1.addr4}:
                    gone = time.monotonic() - started
                began = time.monotonic() - started
                try:
                    sock, _ = open_tcp(bed.client, bgpbed.VIP4, bgpbed.PORT, timeout=attempt)
                except OSError:
                    sock = None
                if sock is None:
                    last_failure, streak = began, 0
                else:
                    sock.close()
                    streak += 1
            new_ok = "none" if last_failure is None else f"{last_failure:.1f} s"
            alive = bgpbed.survivors(sockets, names, timeout=3)
            for sock in sockets:
                sock.close()
            share = 100.0 * alive / max(1, len(sockets))
            return (
                f"| {method} | {scheduler} | {'yes' if sync else 'no'} | {event} | "
                f"{len(sockets)} | {lost_director} | {alive} ({share:.1f} %) | {gone:.1f} s | "
                f"{new_ok} |"
            )
    finally:
        lab.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--only", default="", help="METHOD:scheduler to run one configuration")
    parser.add_argument(
        "--attempt-timeout", type=float, default=1.0, help="seconds a new connection may take"
    )
    args = parser.parse_args(argv)
    print("| method | scheduler | sync | event | held | scheduled by the lost director | "
          "survived | route gone after | last failed new connection began |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for method, scheduler, sync in CONFIGS:
        if args.only and args.only != f"{method}:{scheduler}":
            continue
        for event in ("stop", "kill"):
            with tempfile.TemporaryDirectory(dir="/run") as tmp:
                line = run(
                    method, scheduler, sync, event, args.connections, Path(tmp),
                    args.attempt_timeout,
                )  # fmt: skip
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
