"""The agent's pipeline in the VM: VirtualServer manifests → snapshot → plan → reconcile → kernel.

Kernel tests that prove a feature *through the agent* build a topology (tests/kernel/topology.py),
write a VirtualServer for it with :func:`manifest` and run the reconcile pass with :class:`Agent`
exactly as ``ipvs-agent apply`` and the in-cluster agent do. The host side (addresses, nftables)
is an in-memory double: the topology already holds the VIP on the director, and the real host
layer is proven on its own in tests/kernel/test_host_*.py.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ipvs_agent.desired import Node
from ipvs_agent.host.podnetns import PodNamespaces
from ipvs_agent.kernel.ipvs import IPVSKernel
from ipvs_agent.model import KernelInfo, ObservedService, ObservedTable
from ipvs_agent.reconciler import Memory, PassResult, reconcile
from ipvs_agent.snapshot import node_from, take
from ipvs_agent.system import LinuxHost
from tests.kernel.topology import Netns, Topology
from tests.unit.agent_helpers import FakeHost

NAMESPACE = "lab"


def forwarding(topology: Topology) -> dict[str, Any]:
    """The VirtualServer ``forwarding`` block for the topology's forwarding method."""
    if topology.method == "nat":
        return {"method": "NAT"}
    if topology.method == "dr":
        return {"method": "DR"}
    tunnel: dict[str, Any] = {"type": topology.tun_type or "ipip"}
    if topology.tun_port:
        tunnel["port"] = topology.tun_port
    return {"method": "TUN", "tunnel": tunnel}


def manifest(
    topology: Topology,
    name: str = "web",
    scheduler: str = "wrr",
    weights: Sequence[int] | None = None,
    drain: int = 300,
    servers: Sequence[int] | None = None,
    *,
    flags: Sequence[str] = (),
    ports: Sequence[Mapping[str, Any]] | None = None,
    real_server_fields: Mapping[int, Mapping[str, Any]] | None = None,
    spec: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A VirtualServer for the topology's VIP with static real servers (by index).

    ``weights`` are per real server of the topology (index = position), ``servers`` picks which
    are listed, ``real_server_fields`` adds fields (thresholds) to some of them, ``ports``
    replaces the single TCP port, and ``spec`` overrides any other spec field (a ``fwmark``
    there drops ``address`` and ``ports``, as the API requires).
    """
    picked = range(len(topology.real_servers)) if servers is None else servers
    extra = real_server_fields or {}
    static = [
        {
            "address": topology.real_servers[i].rip,
            "weight": (weights[i] if weights else 1),
            **extra.get(i, {}),
        }
        for i in picked
    ]
    scheduler_block: dict[str, Any] = {"name": scheduler}
    if flags:
        scheduler_block["flags"] = list(flags)
    default_ports = [{"port": topology.port, "protocol": "TCP"}]
    body: dict[str, Any] = {
        "address": topology.vip,
        "ports": [dict(p) for p in ports] if ports else default_ports,
        "scheduler": scheduler_block,
        "forwarding": forwarding(topology),
        "drainTimeoutSeconds": drain,
        "backends": {"static": static},
    }
    body.update(spec or {})
    if "fwmark" in body:
        body.pop("address")
        body.pop("ports")
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "generation": 1,
            "creationTimestamp": "2026-11-26T00:00:00Z",
        },
        "spec": body,
    }


class Agent:
    """The pass as the agent runs it: the same host record and memory between passes."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.host = FakeHost()
        self.memory = Memory()
        self._info: KernelInfo | None = None

    def kernel(self) -> IPVSKernel:
        return IPVSKernel(netns=self.topology.director.name)

    def info(self) -> KernelInfo:
        """What the kernel offers, read once as the in-cluster agent does."""
        if self._info is None:
            with self.kernel() as kernel:
                self._info = kernel.info()
        return self._info

    def forget_kernel_info(self) -> None:
        """Read the kernel's offer anew at the next pass (a module was loaded meanwhile)."""
        self._info = None

    def reconcile(self, *objects: dict[str, Any]) -> PassResult:
        info = self.info()
        with self.kernel() as kernel:
            snap = take(objects, [], Node("director", {}, info))
            return reconcile(snap, kernel, self.host, self.memory, time.monotonic())

    def programmed(self, *objects: dict[str, Any]) -> PassResult:
        """Reconcile and insist that every object was programmed without a kernel error, and
        that the kernel now reads back as desired: a second pass has nothing to do."""
        result = self.reconcile(*objects)
        assert result.failures == [], [f"{r.op}: {r.message}" for r in result.failures]
        states = {key: (str(o.state), o.reason, o.message) for key, o in result.outcomes.items()}
        assert all(s == "Programmed" for s, _, _ in states.values()), states
        again = self.reconcile(*objects)
        assert again.ops == [], f"not converged: {[str(op) for op in again.ops]}"
        return result

    def dump(self) -> ObservedTable:
        with self.kernel() as kernel:
            return kernel.dump()

    def service(
        self, port: int | None = None, protocol: int = 6, table: ObservedTable | None = None
    ) -> ObservedService:
        """The live kernel service at the topology's VIP (and ``port``), as the agent reads it."""
        table = self.dump() if table is None else table
        want = self.topology.port if port is None else port
        for key, observed in table.items():
            if (key.address, key.port, key.protocol) == (self.topology.vip, want, protocol):
                return observed
        raise AssertionError(f"no service at {self.topology.vip}:{want}/{protocol}: {table}")

    def kernel_order(self, port: int | None = None) -> list[str]:
        """Real servers' names in the kernel's list order of a service (newest first).

        Several schedulers break ties by this order, so exact expectations depend on it.
        """
        observed = self.service(port)
        names = {rs.rip: rs.name for rs in self.topology.real_servers}
        return [names[d.address] for d in observed.dests]


class NodeAgent:
    """One node's agent pipeline, in-process, bound to the node's network namespace."""

    def __init__(
        self,
        ns: Netns,
        name: str,
        addresses: Sequence[str],
        labels: dict[str, str] | None = None,
        pod_dir: Path | None = None,
        sysctl_root: str = "/proc/sys",
        state_dir: Path | None = None,
        protected_ports: frozenset[int] = frozenset(),
        active_active: bool = False,
        connection_sync: bool = False,
    ) -> None:
        self.ns = ns
        self.active_active = active_active
        self.connection_sync = connection_sync
        self.node = {
            "metadata": {"name": name, "labels": labels or {}},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]},
        }
        self.name = name
        pods = PodNamespaces([str(pod_dir)] if pod_dir else [], None, own=ns.path)
        self.host = LinuxHost(
            netns=ns.name,
            pods=pods,
            sysctl_root=sysctl_root,
            state_dir=str(state_dir) if state_dir else None,
        )
        self.memory = Memory()
        self.protected_ports = protected_ports

    def reconcile(
        self,
        vss: Sequence[dict[str, Any]],
        slices: Sequence[dict[str, Any]] = (),
        *,
        kernel: IPVSKernel | None = None,
        check: bool = True,
    ) -> PassResult:
        """One pass; ``kernel`` replaces the node's own (a wrapper), ``check`` insists that
        the kernel refused nothing."""
        with kernel or IPVSKernel(netns=self.ns.name) as k:
            node = node_from(self.node, self.name, k.info(), protected_ports=self.protected_ports)
            node = replace(
                node, active_active=self.active_active, connection_sync=self.connection_sync
            )
            snap = take(vss, slices, node)
            result = reconcile(snap, k, self.host, self.memory, time.monotonic())
        if check:
            assert result.failures == [], [str(r.op) for r in result.failures]
        return result

    def close(self) -> None:
        self.host.close()


__all__ = ["NAMESPACE", "Agent", "NodeAgent", "forwarding", "manifest"]
