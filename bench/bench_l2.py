#!/usr/bin/env python3
"""Layer-2 announcement: API writes at 1000 VIPs, and failover as a client sees it.

``api`` (on the host, against the API-server test bed): ``--nodes`` speakers, each with its
own LeaseKeeper writing a real coordination.k8s.io Lease as the agent's ServiceAccount, elect
over ``--vips`` VIPs for ``--seconds``; the API server's own request counters say how many
writes that cost per second (and of what). Then one keeper stops renewing (a crash) and one
releases its Lease (a stop): how long until the others answer for its VIPs, on the host's
clock. For comparison, the per-VIP Lease design of kube-vip and Cilium would renew
``vips / renew`` Leases per second::

    .venv/bin/python bench/bench_l2.py api --nodes 3 --vips 1000

``lab`` (the three-director lab in the VM, tests/e2e/l2guest.py): ``--rounds`` planned
handovers (SIGTERM) with the return of the stopped agent, then agent kills and a link going
down, each measured from the client's stream of new TCP connections and UDP datagrams (the
longest time without a success) and its ARP/NDP probes (when the new MAC answered)::

    .venv/bin/python bench/bench_l2.py lab --rounds 2

Results go to docs/benchmarks.md ("Layer-2 announcement").
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import platform
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ipvs_agent.announce.election import Wanted  # noqa: E402
from ipvs_agent.announce.members import DURATION, RENEW, LeaseKeeper  # noqa: E402
from ipvs_agent.announce.speaker import Inputs, Speaker  # noqa: E402
from ipvs_agent.cluster import lease_mirror  # noqa: E402
from tests.apiserver.cluster import LocalApiServer  # noqa: E402
from tests.apiserver.fixtures import repo_crd_files  # noqa: E402
from tests.operator import harness  # noqa: E402
from tests.vm.qemu import exit_on_signals  # noqa: E402

NAMESPACE = harness.OPERATOR_NAMESPACE
NICS = {"eth0": [ipaddress.ip_interface("198.18.0.1/15")]}


class Answering:
    """The responder's interface without sockets: who answers what, and since when."""

    def __init__(self) -> None:
        self.current: dict[Any, tuple[str, ...]] = {}
        self.changed_at = 0.0

    def set(self, wanted: Any) -> None:
        self.current = dict(wanted)
        self.changed_at = time.monotonic()

    def announced(self) -> dict[Any, tuple[str, ...]]:
        return dict(self.current)

    def claims(self) -> dict[Any, int]:
        return {}


def lease_writes(admin: Any) -> dict[str, float]:
    """The API server's request counters for Leases, by verb (its /metrics)."""
    method, url, headers, body, _ = admin.param_serialize("GET", "/metrics")
    response = admin.call_api(method, url, header_params=headers, body=body)
    response.read()
    text = response.data.decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="leases"' in line:
            verb = re.search(r'verb="([A-Z]+)"', line)
            if verb:
                found[verb.group(1)] = found.get(verb.group(1), 0.0) + float(line.split()[-1])
    return found


def api_bench(args: argparse.Namespace) -> dict[str, Any]:
    from kubernetes import client

    server = LocalApiServer()
    server.start()
    try:
        server.install_crds(repo_crd_files())
        with server.api_client() as admin:
            harness.core(admin).create_namespace({"metadata": {"name": NAMESPACE}})
            harness.apply_manifests(admin, REPO / "rbac" / "agent.yaml")
        vips = [ipaddress.ip_address(int(ipaddress.ip_address("198.18.0.10")) + i)
                for i in range(args.vips)]  # fmt: skip
        wanted = tuple(Wanted(v) for v in vips)
        stop = threading.Event()
        speakers: dict[str, tuple[Speaker, LeaseKeeper, Answering, threading.Event]] = {}
        clients = []
        for i in range(args.nodes):
            node = f"node-{i}"
            api = server.client_for_service_account(NAMESPACE, harness.AGENT_SA, create=False)
            clients.append(api)
            wake = threading.Event()
            leases = lease_mirror(api, NAMESPACE, wake)
            keeper = LeaseKeeper(
                client.CustomObjectsApi(api), NAMESPACE, node,
                duration=args.lease_seconds, renew=args.renew_seconds,
            )  # fmt: skip
            answering = Answering()
            speaker = Speaker(node, keeper, leases, answering, wake)
            speaker.update(Inputs(True, {}, wanted, frozenset(), NICS))
            own = threading.Event()
            for body, target in ((leases.run, stop), (speaker.run, stop), (keeper.run, own)):
                threading.Thread(target=body, args=(target,), daemon=True).start()
            speakers[node] = (speaker, keeper, answering, own)
        deadline = time.monotonic() + 60
        while sum(len(a.current) for _, _, a, _ in speakers.values()) != args.vips:
            if time.monotonic() > deadline:
                raise AssertionError("the speakers never covered every VIP")
            time.sleep(0.1)  # poll interval
        with server.api_client() as admin:
            before = lease_writes(admin)
            began = time.monotonic()
            time.sleep(args.seconds)  # the measurement window itself
            after = lease_writes(admin)
        elapsed = time.monotonic() - began
        per_second = {
            verb: round((after.get(verb, 0) - before.get(verb, 0)) / elapsed, 2)
            for verb in sorted(set(after) | set(before))
        }
        shares = {n: len(a.current) for n, (_, _, a, _) in speakers.items()}

        def takeover(victim: str, how: str) -> float:
            _, _, answering, own = speakers[victim]
            theirs = set(answering.current)
            started = time.monotonic()
            own.set()  # stop renewing
            if how == "stop":
                speakers[victim][0].leave()
            else:
                answering.set({})  # its agent died: its responder with it
            deadline = time.monotonic() + 30
            while True:
                covered = set().union(
                    *(set(a.current) for n, (_, _, a, _) in speakers.items() if n != victim)
                )
                if theirs <= covered:
                    return round(time.monotonic() - started, 2)
                if time.monotonic() > deadline:
                    raise AssertionError(f"{how}: {victim}'s VIPs were never taken over")
                time.sleep(0.01)  # poll interval

        planned = takeover("node-0", "stop")
        crash = takeover("node-1", "crash") if args.nodes > 2 else None
        stop.set()
        for api in clients:
            api.close()
        return {
            "nodes": args.nodes,
            "vips": args.vips,
            "renew_seconds": args.renew_seconds,
            "lease_seconds": args.lease_seconds,
            "lease_requests_per_second": per_second,
            "per_vip_lease_design_writes_per_second": round(args.vips / args.renew_seconds, 1),
            "vips_per_node": shares,
            "planned_takeover_seconds": planned,
            "crash_takeover_seconds": crash,
            "machine": platform.node(),
        }
    finally:
        server.stop()


def lab_bench(args: argparse.Namespace) -> dict[str, Any]:
    from tests.e2e import l2scenario as sc
    from tests.e2e.bed import LabBed

    figures: list[dict[str, Any]] = []
    # An agent restart under emulation takes minutes: the VM may live an hour.
    bed = LabBed(resync_seconds=10, guest="tests.e2e.l2guest", nodes=sc.NODES, vm_timeout=3600.0)
    v4, v6, order = sc.pick_addresses()
    try:
        bed.start()
        sc.prepare(bed, v4, v6)
        sc.wait_announced(bed, order[0])
        macs = bed.call("macs")

        def event(
            name: str, action: Any, new: str, old: str | None, timeout: float = sc.TIMEOUT
        ) -> None:
            handles = sc.watch(bed, [v4, v6], limit=900.0)
            sc.settle(bed, 1.0)
            at = float(bed.call("now"))
            action()
            sc.wait_announced(bed, new, timeout)
            sc.settle(bed, 3.0)
            for s in sc.seen(bed, [v4, v6], handles, at):
                took = s.first_answer_from(macs[new])
                last_old = max((t for t, m in s.answers if old and m == macs[old]), default=None)
                figures.append(
                    {
                        "event": name,
                        "vip": s.vip,
                        "tcp_gap": round(s.tcp_gap, 2),
                        "udp_gap": round(s.udp_gap, 2),
                        "new_mac_after": None if took is None else round(took - at, 2),
                        # Nobody answered ARP/NDP for this long (the gap a client sees once
                        # the old node is really gone, not only its agent).
                        "unanswered": (
                            None
                            if took is None or last_old is None
                            else round(max(0.0, took - last_old), 2)
                        ),
                        "macs_after": sorted(s.macs_after((took or at) + 0.5)),
                    }
                )
                print(json.dumps(figures[-1]), flush=True)

        # The lab's floor under emulation: the longest gaps while nothing happens.
        handles = sc.watch(bed, [v4, v6])
        at = float(bed.call("now"))
        sc.settle(bed, 10.0)
        for s in sc.seen(bed, [v4, v6], handles, at):
            figures.append(
                {"event": "steady", "vip": s.vip, "tcp_gap": round(s.tcp_gap, 2),
                 "udp_gap": round(s.udp_gap, 2)}
            )  # fmt: skip
            print(json.dumps(figures[-1]), flush=True)

        first, second = order[0], order[1]
        for _ in range(args.rounds):
            event("planned (SIGTERM)", lambda: bed.call("stop_agent", node=first), second, first)
            event(
                "return after restart",
                lambda: bed.call("start_agent", node=first),
                first,
                second,
                timeout=600,
            )
        for _ in range(args.rounds):
            event(
                "agent killed (SIGKILL)",
                lambda: bed.call("stop_agent", node=first, kill=True),
                second,
                first,
            )
            event(
                "return after restart",
                lambda: bed.call("start_agent", node=first),
                first,
                second,
                timeout=600,
            )
        event("link down", lambda: bed.call("link", node=first, up=False), second, first)
        return {"events": figures, "machine": platform.node()}
    finally:
        bed.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    api = sub.add_parser("api")
    api.add_argument("--nodes", type=int, default=3)
    api.add_argument("--vips", type=int, default=1000)
    api.add_argument("--seconds", type=float, default=30.0)
    api.add_argument("--lease-seconds", type=float, default=DURATION)
    api.add_argument("--renew-seconds", type=float, default=RENEW)
    lab = sub.add_parser("lab")
    lab.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    exit_on_signals()  # SIGTERM too stops what the run started (see qemu.exit_on_signals)
    result = api_bench(args) if args.mode == "api" else lab_bench(args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
