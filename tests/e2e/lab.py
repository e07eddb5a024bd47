"""The lab demo: ``tests/lab`` (which installs what is missing, then runs this).

Brings up the lab (tests/e2e/bed.py: kube-apiserver + etcd and the operator on this host,
the agent on Debian's kernel in the VM with demo real servers and clients around it),
applies VirtualServers with static real servers and a LoadBalancer Service with an
AddressPool and hand-made EndpointSlices (tests/e2e/scenario.py, the objects the end-to-end
tests use too), sends TCP connections from a client namespace to each virtual address, and
prints where they went per scheduler and forwarding method.

    tests/lab                 # up, demo, down
    tests/lab --stay          # and keep it up until Ctrl-C (prints a KUBECONFIG to play with)
    tests/lab --bgp           # BGP mode: two directors announce to a BIRD router (bgpguest.py)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from tests.e2e import scenario as sc
from tests.e2e.bed import LabBed, LabError, stderr_progress
from tests.operator import harness

CONNECTIONS = 60


@dataclass(frozen=True)
class Row:
    """One virtual service of the demo and what it is made of."""

    kind: str
    name: str
    method: str
    scheduler: str
    weights: tuple[int, int, int]
    address: str = ""


DEMO = (
    Row("VirtualServer", "nat-wrr", "NAT", "wrr", (3, 2, 1), sc.NAT_VIP),
    Row("VirtualServer", "dr-wrr", "DR", "wrr", (1, 2, 3), sc.DR_VIP),
    Row("VirtualServer", "tun-sh", "TUN", "sh", (1, 1, 1), sc.TUN_VIP),
    Row("Service", "web", "NAT", "rr", (1, 1, 1)),
)


def apply_demo(bed: LabBed) -> list[Row]:
    """Apply every object of DEMO; the rows with the Service's allocated address filled in."""
    sc.prepare(bed)
    rows: list[Row] = []
    for row in DEMO:
        if row.kind == "VirtualServer":
            body = sc.virtual_server(
                row.name, row.address, method=row.method, scheduler=row.scheduler,
                weights=row.weights,
            )  # fmt: skip
            sc.apply_virtual_server(bed, body)
            bed.log(f"applied VirtualServer {sc.NAMESPACE}/{row.name} ({row.address})")
            rows.append(row)
            continue
        ready = dict.fromkeys(sc.REAL_SERVERS, "ready")
        sc.apply_endpoint_slice(bed, sc.endpoint_slice(row.name, ready))
        harness.core(bed.admin).create_namespaced_service(
            sc.NAMESPACE, sc.load_balancer_service(row.name, scheduler=row.scheduler)
        )
        address = sc.service_address(bed, row.name)
        bed.log(
            f"applied Service {sc.NAMESPACE}/{row.name} and its EndpointSlice; the operator "
            f"gave it {address} from AddressPool {sc.SERVICE_POOL}"
        )
        rows.append(Row(row.kind, row.name, row.method, row.scheduler, row.weights, address))
    return rows


def measure(bed: LabBed, rows: list[Row]) -> list[tuple[Row, dict[str, int]]]:
    results = []
    for row in rows:
        weights = dict(zip(sc.REAL_SERVERS, row.weights, strict=True))
        sc.expect_service(bed, row.address, row.scheduler, weights, row.method)
        client = sc.client_for(row.method)
        bed.log(f"{CONNECTIONS} connections from {client} to {row.address}:{sc.PORT}")
        results.append((row, sc.connections(bed, row.address, CONNECTIONS, row.method)))
    return results


def report(results: list[tuple[Row, dict[str, int]]]) -> str:
    names = list(sc.REAL_SERVERS)
    head = f"{'object':<28} {'address:port':<18} {'method':<6} {'sched':<5} {'weights':<7} "
    head += " ".join(f"{n:>4}" for n in names)
    title = (
        f"Where {CONNECTIONS} sequential TCP connections went (each real server answers its name):"
    )
    lines = [title, "", head]
    for row, counts in results:
        line = f"{row.kind + ' ' + row.name:<28} {row.address + ':' + str(sc.PORT):<18} "
        line += f"{row.method:<6} {row.scheduler:<5} {','.join(map(str, row.weights)):<7} "
        line += " ".join(f"{counts.get(n, 0):>4}" for n in names)
        lines.append(line)
    lines += [
        "",
        "real servers: " + ", ".join(f"{n} {a}" for n, a in sc.REAL_SERVERS.items()),
        "NAT from client c1 (198.51.100.101, across the director); DR and TUN from c2 "
        "(192.0.2.101, on the real servers' LAN, answered directly)",
        "sh hashes the source address: one client always lands on one real server.",
    ]
    return "\n".join(lines)


def bgp_demo(bed: LabBed) -> str:
    """BGP mode: the objects of tests/e2e/bgpscenario.py applied, the router's view, and where
    connections from the client behind the router went (per director, per real server)."""
    from tests.e2e import bgpscenario as bs
    from tests.e2e.bgpguest import NODES

    bs.prepare(bed)
    bed.log("applied BGPPeers r1 and r1-v6, AddressPool anycast (bgp), VirtualServers web4, web6")
    bs.wait_announced(bed, NODES)
    lines = [f"The router's BGP sessions (BIRD, {' '.join(NODES)} as d1 d2):"]
    lines += bed.call("birdc", args=["show", "protocols"]).splitlines()[1:]
    for name, vip in bs.VIPS.items():
        lines += ["", f"VirtualServer {bs.NAMESPACE}/{name} {vip}:{sc.PORT} (mh, DR):"]
        lines += bed.call("birdc", args=["show", "route", "for", vip]).splitlines()[1:]
        before = {n: bs.director_connections(bed, n, vip) for n in NODES}
        held = bed.call("hold_open", vip=vip, count=CONNECTIONS)
        bed.call("hold_close", handle=held["handle"])
        spread = {n: bs.director_connections(bed, n, vip) - before[n] for n in NODES}
        counts = {who: held["identities"].count(who) for who in sorted(set(held["identities"]))}
        lines.append(
            f"{CONNECTIONS} TCP connections from 198.51.100.100 behind the router: per director "
            f"{spread}, per real server {counts}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stay", action="store_true", help="keep the lab up until Ctrl-C")
    parser.add_argument(
        "--bgp", action="store_true", help="two directors announcing over BGP to a BIRD router"
    )
    args = parser.parse_args(argv)
    mode: dict[str, Any] = {}
    if args.bgp:
        from tests.e2e.bgpguest import NODES

        mode = {"guest": "tests.e2e.bgpguest", "nodes": NODES, "resync_seconds": 10}
    began = time.monotonic()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        timeout = 8 * 3600 if args.stay else None
        with LabBed(stderr_progress, vm_timeout=timeout, **mode) as bed:
            if args.bgp:
                print(bgp_demo(bed))
            else:
                rows = apply_demo(bed)
                results = measure(bed, rows)
                print(report(results))
            for node in bed.nodes:
                print(f"\n{node}'s table (ipvsadm -Ln inside the VM):")
                table: dict[str, Any] = bed.call(
                    "run", argv=["ipvsadm", "-L", "-n"], **({"node": node} if args.bgp else {})
                )
                print(table["stdout"], end="")
            stderr_progress(f"demo done {time.monotonic() - began:.0f}s after start")
            if args.stay:
                assert bed.api is not None
                print(f"\nexport KUBECONFIG={bed.api.kubeconfig}   # admin; Ctrl-C ends the lab")
                print(f"agent log: {bed.share / 'agent.log'}")
                try:
                    while not stop.wait(1.0):
                        pass
                except KeyboardInterrupt:
                    pass
            stderr_progress("tearing down")
    except (LabError, AssertionError) as error:
        print(f"lab: failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lab: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
