"""The in-cluster agent loop on a real kernel: its metrics and probes as a scraper sees them.

``Agent.run`` runs as in the DaemonSet, with the real kernel layer in the director's netns and
its HTTP server; only the API side is replaced by mirrors whose contents the test sets (the API
side is proven against a real kube-apiserver in tests/api/test_agent_outage.py).
"""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ipvs_agent.agent import Agent, Settings, serve_http
from ipvs_agent.kernel.ipvs import IPVSKernel
from ipvs_agent.snapshot import service_of
from ipvs_api.endpoints import SERVICE_NAME_LABEL
from tests.kernel.topology import Lab, Topology, build_nat
from tests.kernel.traffic import held_tcp, tcp_identity
from tests.unit.agent_helpers import FakeHost, StubMirror
from tests.unit.test_change_pass import JournalMirror

DEADLINE = 30.0


def wait_for(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)  # poll interval


def virtual_server(topology: Topology, weights: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "shop", "generation": 3},
        "spec": {
            "address": topology.vip,
            "ports": [{"port": topology.port}],
            "scheduler": {"name": "wrr"},
            "backends": {
                "static": [
                    {"address": rs.rip, "weight": w}
                    for rs, w in zip(topology.real_servers, weights, strict=True)
                ]
            },
        },
        "status": {"address": topology.vip},  # confirmed by the operator
    }


class Running:
    """The agent loop and its HTTP server, started and stopped around a test."""

    def __init__(self, topology: Topology) -> None:
        self.vs = StubMirror("virtualservers", [], synced=False)
        self.kernel = IPVSKernel(netns=topology.director.name)
        self.agent = Agent(
            Settings("director", resync_seconds=60, settle_seconds=0),
            self.kernel,
            FakeHost(),
            [self.vs, StubMirror("endpointslices", []), StubMirror("node", [])],
            threading.Event(),
        )
        self.server = serve_http(self.agent, 0, "127.0.0.1")
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def close(self) -> None:
        self.stop.set()
        self.agent.changed.set()
        self.thread.join(10)
        self.server.shutdown()
        self.kernel.close()


@pytest.fixture
def running(lab: Lab) -> Iterator[tuple[Topology, Running]]:
    topology = build_nat(lab, family=4, real_servers=3)
    agent = Running(topology)
    try:
        yield topology, agent
    finally:
        agent.close()


def sample(text: str, metric: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        match = re.match(r"([a-zA-Z_:][\w:]*)(\{[^}]*\})?", line)
        if match is None or match.group(1) != metric:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_probes_and_metrics_follow_real_traffic(running: tuple[Topology, Running]) -> None:
    topology, agent = running
    assert agent.get("/healthz")[0] == 200
    assert agent.get("/readyz")[0] == 503, "not ready before the first full list"

    agent.vs._items = [virtual_server(topology, [3, 2, 1])]
    agent.vs.synced.set()
    agent.agent.changed.set()
    wait_for("ready", lambda: agent.get("/readyz")[0] == 200)
    counts = topology.client.tcp_identities(topology.vip, topology.port, 60)
    assert sum(counts.values()) == 60

    def scraped(metric: str, rs: int) -> float | None:
        agent.agent.changed.set()  # a pass refreshes the table the metrics come from
        text = agent.get("/metrics")[1]
        real = f"{topology.real_servers[rs].rip}:{topology.port}"
        return sample(text, metric, namespace="shop", virtualserver="web", real_server=real)

    # The kernel folds per-CPU counters into what it reports every 2 s: poll.
    for rs, expected in enumerate([30, 20, 10]):

        def arrived(rs: int = rs, expected: int = expected) -> bool:
            return scraped("ipvs_real_server_connections_total", rs) == expected

        wait_for(f"rs{rs + 1} to show {expected} connections", arrived)
        assert scraped("ipvs_real_server_weight", rs) == [3, 2, 1][rs]
        assert (scraped("ipvs_real_server_bytes_out_total", rs) or 0) > 0, "NAT replies counted"
    text = agent.get("/metrics")[1]
    service = sample(
        text, "ipvs_virtual_service_connections_total", namespace="shop", virtualserver="web"
    )
    assert service == 60
    assert sample(text, "ipvs_agent_virtual_servers", state="Programmed") == 1
    assert (sample(text, "ipvs_agent_reconcile_duration_seconds_count") or 0) >= 1


def service_backed(topology: Topology) -> dict[str, Any]:
    """A VirtualServer whose real servers are the endpoints of Service ``web``."""
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "shop", "generation": 1, "resourceVersion": "1"},
        "spec": {
            "address": topology.vip,
            "ports": [{"port": topology.port}],
            "scheduler": {"name": "rr"},
            "drainTimeoutSeconds": 4,
            "backends": {"service": {"name": "web"}},
        },
        "status": {"address": topology.vip},
    }


def web_slice(topology: Topology, indices: list[int], version: int) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "resourceVersion": str(version),
            "labels": {SERVICE_NAME_LABEL: "web"},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [topology.real_servers[i].rip], "conditions": {"ready": True}}
            for i in indices
        ],
        "ports": [{"port": topology.port, "protocol": "TCP"}],
    }


def test_an_endpoint_removed_by_a_change_pass_drains_its_open_connection(lab: Lab) -> None:
    """The change pass (only the changed Service's kernel service read and written) keeps
    graceful drain: the removed real server's open connection lives on at weight 0, new
    connections go elsewhere, and the drain checks delete it after its drain timeout."""
    topology = build_nat(lab, family=4, real_servers=3)
    names = {rs.rip: rs.name for rs in topology.real_servers}
    kernel = IPVSKernel(netns=topology.director.name)
    slices = JournalMirror("endpointslices", [web_slice(topology, [0, 1, 2], 1)], service_of)
    agent = Agent(
        Settings("director", resync_seconds=3600, settle_seconds=0, drain_check_seconds=0.5),
        kernel,
        FakeHost(),
        [JournalMirror("virtualservers", [service_backed(topology)]), slices,
         JournalMirror("node", [])],
        threading.Event(),
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    agent.changed.set()  # what the mirrors' first lists do

    def weights() -> dict[str, int]:
        table = kernel.dump()
        found = [s for k, s in table.items() if k.address == topology.vip]
        return {names[d.dest.key.address]: d.dest.weight for s in found for d in s.dests.values()}

    def passes(kind: str) -> float:
        return float(agent.metrics.passes.labels(kind=kind)._value.get())

    try:
        wait_for("three real servers", lambda: len(weights()) == 3)
        gone = topology.real_servers[0].name
        client = topology.clients[0]
        with held_tcp(client, topology.vip, topology.port, 3) as held:
            assert held.counts()[gone] == 1, held.identities
            slices.put(web_slice(topology, [1, 2], 2))
            agent.changed.set()
            wait_for(f"{gone} drained", lambda: weights().get(gone) == 0)
            # Only the change pass could have done it: drain checks start once it drains.
            assert passes("change") >= 1
            sock = held.sockets[held.identities.index(gone)]
            sock.sendall(b"ping\n")
            assert sock.recv(256).decode().strip() == gone, "the open connection lives on"
            fresh = [tcp_identity(client, topology.vip, topology.port) for _ in range(12)]
            assert gone not in fresh and len(set(fresh)) == 2, fresh
        wait_for(f"{gone} deleted after its drain", lambda: gone not in weights(), 30)
        assert sorted(weights().values()) == [1, 1]
        assert passes("full") == 1, "the drain checks are change passes, not full ones"
    finally:
        stop.set()
        agent.changed.set()
        thread.join(10)
        kernel.close()
