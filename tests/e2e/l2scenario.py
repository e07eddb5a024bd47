"""The layer-2 lab's scenario: the objects, the events, and how a client saw them.

Shared by tests/e2e/test_layer2.py (behaviour) and bench/bench_l2.py (the figures in
docs/benchmarks.md). Times are the VM's monotonic seconds (the guest timestamps everything),
so no two clocks are compared.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ipvs_agent.announce.election import elect
from tests.e2e.bed import LabBed, wait_for
from tests.e2e.l2guest import NODES, REAL_SERVERS
from tests.operator import harness

NAMESPACE = "l2"
POOL = "l2"
POOL_V4 = ("192.0.2.200", "192.0.2.220")
POOL_V6 = ("2001:db8:1::200", "2001:db8:1::220")
TIMEOUT = 180.0


def pick_addresses() -> tuple[str, str, list[str]]:
    """A v4 and a v6 VIP that the same node wins among all three, and the same second one
    when it is gone: one event moves both families the same way. Returns them and the order
    (first, second, third) in which the nodes hold them."""

    def addresses(first: str, last: str) -> Iterable[Any]:
        low, high = ipaddress.ip_address(first), ipaddress.ip_address(last)
        return (type(low)(n) for n in range(int(low), int(high) + 1))

    for v4, v6 in itertools.product(addresses(*POOL_V4), addresses(*POOL_V6)):
        order4 = _order(v4)
        if order4 == _order(v6):
            return str(v4), str(v6), order4
    raise AssertionError("no pair of addresses with one order")


def _order(vip: Any) -> list[str]:
    left = list(NODES)
    order = []
    while left:
        winner = elect(vip, left)
        assert winner is not None
        order.append(winner)
        left.remove(winner)
    return order


def prepare(bed: LabBed, v4: str, v6: str) -> None:
    """The namespace, a pool announced on layer 2, and a NAT VirtualServer per family."""
    harness.core(bed.admin).create_namespace({"metadata": {"name": NAMESPACE}})
    harness.custom(bed.admin).create_cluster_custom_object(
        harness.GROUP,
        harness.VERSION,
        "addresspools",
        {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "AddressPool",
            "metadata": {"name": POOL},
            "spec": {
                "addresses": ["-".join(POOL_V4), "-".join(POOL_V6)],
                "autoAssign": False,
                "layer2": {},
            },
        },
    )
    for name, vip, family in (("web4", v4, 0), ("web6", v6, 1)):
        harness.custom(bed.admin).create_namespaced_custom_object(
            harness.GROUP,
            harness.VERSION,
            NAMESPACE,
            "virtualservers",
            {
                "apiVersion": "ipvs.io/v1alpha1",
                "kind": "VirtualServer",
                "metadata": {"name": name},
                "spec": {
                    "address": vip,
                    "addressPool": POOL,
                    "ports": [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}],
                    "scheduler": {"name": "rr"},
                    "drainTimeoutSeconds": 0,
                    "backends": {
                        "static": [{"address": addrs[family]} for addrs in REAL_SERVERS.values()]
                    },
                },
            },
        )


def announcers(bed: LabBed) -> dict[str, list[str]]:
    """VirtualServer name → the nodes its status says announce it."""
    found = harness.list_vs(bed.admin, NAMESPACE)
    return {
        vs["metadata"]["name"]: list(
            (vs.get("status") or {}).get("announcement", {}).get("nodes", [])
        )
        for vs in found
    }


def wait_announced(bed: LabBed, node: str, timeout: float = TIMEOUT) -> None:
    wait_for(
        f"both VIPs announced by {node}",
        lambda: announcers(bed) == {"web4": [node], "web6": [node]},
        timeout,
        0.5,
    )


@dataclass(frozen=True)
class Seen:
    """What the client saw of one VIP during an event at ``at``."""

    vip: str
    at: float
    tcp: Sequence[tuple[float, str]]
    udp: Sequence[tuple[float, str]]
    answers: Sequence[tuple[float, str]]

    def longest_gap(self, samples: Sequence[tuple[float, str]]) -> float:
        """Longest time between two successes from one second before the event on."""
        times = [t for t, who in samples if who and t >= self.at - 1.0]
        if len(times) < 2:
            return float("inf")
        return max(b - a for a, b in itertools.pairwise(times))

    @property
    def tcp_gap(self) -> float:
        return self.longest_gap(self.tcp)

    @property
    def udp_gap(self) -> float:
        return self.longest_gap(self.udp)

    def macs_after(self, since: float) -> set[str]:
        return {mac for t, mac in self.answers if t >= since}

    def first_answer_from(self, mac: str) -> float | None:
        times = [t for t, m in self.answers if m == mac and t >= self.at]
        return min(times) if times else None

    def failures_after(self, since: float) -> int:
        return sum(1 for t, who in [*self.tcp, *self.udp] if t >= since and not who)


def watch(bed: LabBed, vips: Sequence[str], limit: float = 300.0) -> list[int]:
    """Start the client's streams to ``vips``; each ends by itself after ``limit`` seconds."""
    return [int(bed.call("stream_start", vip=vip, limit=limit)) for vip in vips]


def seen(bed: LabBed, vips: Sequence[str], handles: Sequence[int], at: float) -> list[Seen]:
    out = []
    for vip, handle in zip(vips, handles, strict=True):
        data = bed.call("stream_stop", handle=handle)
        out.append(
            Seen(
                vip,
                at,
                [tuple(x) for x in data["tcp"]],
                [tuple(x) for x in data["udp"]],
                [tuple(x) for x in data["answers"]],
            )
        )
    return out


def settle(bed: LabBed, seconds: float) -> None:
    """Let the client's streams run on for ``seconds`` of the VM's clock (polled, bounded)."""
    start = float(bed.call("now"))
    wait_for(f"{seconds}s of traffic", lambda: float(bed.call("now")) - start >= seconds, 60, 0.2)


__all__ = [
    "NAMESPACE",
    "NODES",
    "REAL_SERVERS",
    "Seen",
    "announcers",
    "harness",
    "pick_addresses",
    "prepare",
    "seen",
    "settle",
    "wait_announced",
    "watch",
]
