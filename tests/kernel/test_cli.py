"""``ipvs-agent plan``, ``apply`` and ``status`` as a user runs them on a director (in the VM).

Each command is a separate ``python -m ipvs_agent`` process in the director's network
namespace with the real host layer: the virtual address goes on the agent's dummy interface
(the topology's own ``vip0`` is removed first), ownership in its nftables table.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kernel.ipvsctl import ipvsadm
from tests.kernel.topology import Lab, Netns, Topology, build_nat

CONNECTIONS = 1000  # the bar for a hitless restart
RESTARTS = 3
TRAFFIC_SECONDS = 300.0  # bound on the steady traffic, whatever the VM's speed


def manifest(topology: Topology, weights: list[int]) -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "lab"},
        "spec": {
            "address": topology.vip,
            "ports": [{"port": topology.port, "protocol": "TCP"}],
            "scheduler": {"name": "wrr"},
            "backends": {
                "static": [
                    {"address": rs.rip, "weight": w}
                    for rs, w in zip(topology.real_servers, weights, strict=True)
                ]
            },
        },
    }


def agent(director: Netns, *args: str) -> subprocess.CompletedProcess[str]:
    """One ``ipvs-agent`` process in the director's netns (fresh memory, fresh sockets)."""
    return director.run(
        sys.executable, "-m", "ipvs_agent", *args, "--node-name", "director",
        check=False, timeout=120,
    )  # fmt: skip


@pytest.fixture
def director(lab: Lab, tmp_path: Path) -> tuple[Topology, Path]:
    topology = build_nat(lab, family=4, real_servers=3)
    topology.director.ip("link del vip0")  # the agent must bring the VIP itself
    path = tmp_path / "web.yaml"
    path.write_text(yaml.safe_dump(manifest(topology, [3, 2, 1])))
    return topology, path


def test_plan_shows_the_changes_and_makes_none(director: tuple[Topology, Path]) -> None:
    topology, path = director
    out = agent(topology.director, "plan", "-f", str(path))
    assert out.returncode == 0, out.stderr
    assert "# VirtualServer lab/web: Programmed" in out.stdout
    assert f"-A -t {topology.vip}:{topology.port} -s wrr" in out.stdout, out.stdout
    for rs, w in zip(topology.real_servers, [3, 2, 1], strict=True):
        assert f"-r {rs.rip}:{topology.port} -m -w {w}" in out.stdout, out.stdout
    assert "# 4 operation(s)" in out.stdout
    assert ipvsadm(topology.director, "-S", "-n").stdout == "", "plan changed the kernel"


def test_apply_balances_traffic_and_status_names_the_service(
    director: tuple[Topology, Path],
) -> None:
    topology, path = director
    applied = agent(topology.director, "apply", "-f", str(path))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "# 4 applied, 0 failed" in applied.stdout
    counts = topology.client.tcp_identities(topology.vip, topology.port, 30)
    assert counts == Counter(rs1=15, rs2=10, rs3=5)

    status = agent(topology.director, "status", "-f", str(path))
    assert status.returncode == 0, status.stderr
    assert "lab/web" in status.stdout and topology.vip in status.stdout, status.stdout
    for rs in topology.real_servers:
        assert rs.rip in status.stdout

    again = agent(topology.director, "plan", "-f", str(path))
    assert "# 0 operation(s): the kernel matches" in again.stdout, again.stdout


@dataclass
class SteadyTraffic:
    """Back-to-back TCP connections from one client until told to stop or the count is met."""

    ns: Netns
    vip: str
    port: int
    done: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + TRAFFIC_SECONDS
        with self.ns.entered():  # setns is per thread: this thread stays in the client netns
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    with socket.create_connection((self.vip, self.port), timeout=5) as sock:
                        if not sock.recv(64).startswith(b"rs"):
                            raise ConnectionError("no identity in the answer")
                except OSError as e:
                    self.failures.append(f"connection {self.done + 1}: {e!r}")
                self.done += 1


def test_restarting_the_agent_under_steady_traffic_fails_no_connection(
    director: tuple[Topology, Path],
) -> None:
    topology, path = director
    assert agent(topology.director, "apply", "-f", str(path)).returncode == 0
    traffic = SteadyTraffic(topology.client.ns, topology.vip, topology.port)
    thread = threading.Thread(target=traffic.run)
    thread.start()
    restarts: list[str] = []
    try:
        # Each apply is a new agent process adopting the live table: the restart as the
        # kernel sees it (same pass, same host layer; only the source of objects differs).
        while (traffic.done < CONNECTIONS or len(restarts) < RESTARTS) and thread.is_alive():
            out = agent(topology.director, "apply", "-f", str(path))
            assert out.returncode == 0, out.stdout + out.stderr
            restarts.append(out.stdout.strip().splitlines()[-1])
    finally:
        traffic.stop.set()
        thread.join(30)
    assert traffic.done >= CONNECTIONS, f"only {traffic.done} connections in {TRAFFIC_SECONDS}s"
    assert traffic.failures == [], traffic.failures[:5]
    assert len(restarts) >= RESTARTS and set(restarts) == {"# 0 applied, 0 failed"}, restarts
