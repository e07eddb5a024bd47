"""The agent prepares the real servers of DR and TUN services, proven with real connections.

Every "node" is a network namespace with its own agent pipeline — the reconcile pass with the
real kernel (``IPVSKernel``) and the real host layer (``LinuxHost``: routes, VIPs, nftables,
real-server setup). The director is selected by ``nodeSelector``; the other nodes only serve.
Topologies are built with ``prepare=False``: no VIP, no tunnel device, no ARP or reverse-path
settings on the real servers, so only the agent's pipeline can make them answer.

A "pod" is a network namespace too. Each node agent looks for its pods in a directory of its
own (a symlink per pod, as containerd pins pod namespaces under /run/netns), so agents of
different nodes in one VM never see each other's pods; finding namespaces through
``/proc/*/ns/net`` is proven on its own.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ipvs_agent.desired import NODE_NETNS, NOT_ON_LINK, RealServerNetns, Role, State
from ipvs_agent.host.podnetns import PodNamespaces, ident_of
from ipvs_agent.host.realserver import RS_INTERFACE
from ipvs_agent.status import entry
from tests.kernel.agent_harness import NodeAgent
from tests.kernel.ipvsctl import ipvsadm, ipvsadm_list
from tests.kernel.topology import (
    GUE_PORT,
    Lab,
    Netns,
    Topology,
    TunType,
    build_dr,
    build_tun,
)

DIRECTOR_LABELS = {"ipvs.io/director": "true"}
MS_BIND = 4096
MNT_DETACH = 2


@pytest.fixture
def node_proc_sys(tmp_path: Path) -> Iterator[str]:
    """The node's /proc/sys/net bind-mounted elsewhere, as the chart mounts it for the agent."""
    libc = ctypes.CDLL(None, use_errno=True)
    root = tmp_path / "host-proc-sys"
    (root / "net").mkdir(parents=True)
    target = str(root / "net").encode()
    if libc.mount(b"/proc/sys/net", target, None, MS_BIND, None) != 0:
        raise OSError(ctypes.get_errno(), "bind mount of /proc/sys/net")
    try:
        yield str(root)
    finally:
        libc.umount2(target, MNT_DETACH)


@pytest.fixture
def agents() -> Iterator[list[NodeAgent]]:
    made: list[NodeAgent] = []
    yield made
    for agent in made:
        agent.close()


def virtual_server(
    topology: Topology, method: str, backends: dict[str, Any], **spec: Any
) -> dict[str, Any]:
    forwarding: dict[str, Any] = {"method": method}
    if topology.tun_type is not None:
        forwarding["tunnel"] = {"type": topology.tun_type}
        if topology.tun_type == "gue":
            forwarding["tunnel"]["port"] = GUE_PORT
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "lab", "generation": 1},
        "spec": {
            "address": topology.vip,
            "ports": [{"port": topology.port, "protocol": "TCP"}],
            "scheduler": {"name": "rr"},
            "forwarding": forwarding,
            "nodeSelector": {"matchLabels": DIRECTOR_LABELS},
            "backends": backends,
            **spec,
        },
    }


def endpoint_slice(family: int, endpoints: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """An EndpointSlice of Service ``web``: (address, nodeName) endpoints, port 80."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-1",
            "namespace": "lab",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": f"IPv{family}",
        "endpoints": [
            {"addresses": [a], "nodeName": n, "conditions": {"ready": True}} for a, n in endpoints
        ],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }


def connect_fails(ns: Netns, addr: str, port: int, timeout: float = 2.0) -> bool:
    with ns.entered():
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except OSError:
            return True
    return False


def agent_links(ns: Netns) -> set[str]:
    """The agent's real-server devices (ipvs-rs0, ipvs<kind>-<hash>); not the director's ipvs0."""
    links = json.loads(ns.run("ip", "-j", "link", "show").stdout)
    names = {link["ifname"] for link in links}
    return {n for n in names if n.startswith("ipvs") and n != "ipvs0"}


def strict_reverse_path(ns: Netns) -> None:
    """Distribution-like strict reverse-path filtering (a new netns starts with 0)."""
    for scope in ("all", "default"):
        ns.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 1)


@pytest.mark.parametrize("family", [4, 6])
def test_dr_real_servers_are_prepared_by_their_node_agents(
    lab: Lab, agents: list[NodeAgent], family: int
) -> None:
    topology = build_dr(lab, family, real_servers=2, prepare=False)
    director = NodeAgent(topology.director, "director", [topology.director_addr], DIRECTOR_LABELS)
    nodes = [NodeAgent(rs.ns, f"node-{rs.name}", [rs.rip]) for rs in topology.real_servers]
    agents.extend([director, *nodes])
    vs = virtual_server(
        topology, "DR", {"static": [{"address": rs.rip} for rs in topology.real_servers]}
    )

    result = director.reconcile([vs])
    outcome = result.outcomes["lab/web"]
    assert (outcome.state, outcome.roles, outcome.real_servers) == (
        State.PROGRAMMED, frozenset({Role.DIRECTOR}), 2,
    )  # fmt: skip
    assert result.plan.real_servers == {}, "the director itself serves nothing"
    assert connect_fails(topology.client.ns, topology.vip, topology.port), (
        "bare real servers drop packets to the VIP"
    )

    for node, rs in zip(nodes, topology.real_servers, strict=True):
        served = node.reconcile([vs])
        outcome = served.outcomes["lab/web"]
        assert (outcome.state, outcome.roles) == (State.PROGRAMMED, frozenset({Role.REAL_SERVER}))
        assert list(served.plan.real_servers) == [NODE_NETNS]
        assert served.plan.table == {}, "not selected as a director: no IPVS service here"
        assert RS_INTERFACE in agent_links(rs.ns)
        if family == 4:
            assert rs.ns.read_sysctl("net.ipv4.conf.all.arp_ignore") == "1"
            assert rs.ns.read_sysctl("net.ipv4.conf.all.arp_announce") == "2"
        assert node.reconcile([vs]).ops == [], "a second pass changes nothing"

    counts = topology.client.tcp_identities(topology.vip, topology.port, 4, timeout=20)
    assert counts == Counter(rs1=2, rs2=2), ipvsadm_list(topology.director)

    # The VirtualServer goes: each node undoes its setup, the director its service.
    for node, rs in zip(nodes, topology.real_servers, strict=True):
        gone = node.reconcile([])
        assert gone.outcomes == {} and gone.plan.real_servers == {}
        assert agent_links(rs.ns) == set()
    director.reconcile([])
    assert topology.vip not in ipvsadm(topology.director, "-S", "-n").stdout


@pytest.mark.parametrize(
    ("family", "tun_type"),
    [(4, "ipip"), (6, "gue"), (4, "gre")],
    ids=["ipip-v4", "gue-v6", "gre-v4"],
)
def test_tun_to_a_pod_the_agent_finds_by_its_address(
    lab: Lab,
    agents: list[NodeAgent],
    tmp_path: Path,
    node_proc_sys: str,
    family: int,
    tun_type: TunType,
) -> None:
    topology = build_tun(lab, family, tun_type, real_servers=1, prepare=False)
    (pod,) = topology.real_servers  # the "pod": its own netns with the pod IP on eth0
    strict_reverse_path(pod.ns)
    node_ns, other = lab.netns("node1", "other")
    strict_reverse_path(node_ns)
    node_address = "192.0.2.50" if family == 4 else "2001:db8:5e::50"
    other_address = "192.0.2.99/24" if family == 4 else "2001:db8:5e::99/64"
    other.ip("link add eth0 type dummy", f"addr add {other_address} dev eth0")
    pod_dir = tmp_path / "netns"  # the node's /run/netns: its pods' namespaces
    pod_dir.mkdir()
    os.symlink(pod.ns.path, pod_dir / "cni-0f3a")
    os.symlink(other.path, pod_dir / "cni-77c1")
    director = NodeAgent(topology.director, "director", [topology.director_addr], DIRECTOR_LABELS)
    # Sysctls through the mount, as in the unprivileged DaemonSet (its own /proc/sys is
    # read-only): they land in the pod's namespace all the same.
    node = NodeAgent(node_ns, "node1", [node_address], pod_dir=pod_dir, sysctl_root=node_proc_sys)
    agents.extend([director, node])
    vs = virtual_server(topology, "TUN", {"service": {"name": "web"}})
    slices = [endpoint_slice(family, [(pod.rip, "node1")])]

    programmed = director.reconcile([vs], slices).outcomes["lab/web"]
    assert (programmed.state, programmed.real_servers) == (State.PROGRAMMED, 1)
    assert connect_fails(topology.client.ns, topology.vip, topology.port)

    served = node.reconcile([vs], slices)
    outcome = served.outcomes["lab/web"]
    assert (outcome.state, outcome.roles) == (State.PROGRAMMED, frozenset({Role.REAL_SERVER})), (
        outcome
    )
    assert list(served.plan.real_servers) == [RealServerNetns(ipaddress.ip_address(pod.rip))]
    assert agent_links(pod.ns) >= {RS_INTERFACE}
    assert agent_links(other) == set(), "only the pod holding the address is touched"
    assert agent_links(node_ns) == set(), "the node's own namespace serves nothing"
    assert pod.ns.read_sysctl("net.ipv4.conf.all.rp_filter") == "2", "was strict (1)"
    assert node_ns.read_sysctl("net.ipv4.conf.all.rp_filter") == "1", "the node's untouched"
    counts = topology.client.tcp_identities(topology.vip, topology.port, 3, timeout=20)
    assert counts == Counter(rs1=3), ipvsadm_list(topology.director)
    assert node.reconcile([vs], slices).ops == []

    # The agent restarts, and meanwhile the VirtualServer went away: the new process finds
    # the pod it prepared before and undoes everything there.
    node.close()
    restarted = NodeAgent(node_ns, "node1", [node_address], pod_dir=pod_dir)
    agents.append(restarted)
    gone = restarted.reconcile([], slices)
    assert gone.outcomes == {}
    assert agent_links(pod.ns) == set()
    assert pod.ns.run("ip", "fou", "show", check=False).stdout.strip() == ""  # none, or no fou
    director.reconcile([], slices)
    assert connect_fails(topology.client.ns, topology.vip, topology.port)


def test_a_pod_namespace_is_found_through_proc(lab: Lab) -> None:
    pinned_only, with_process = lab.netns("pinned", "proc")
    pinned_only.ip("link add eth0 type dummy", "addr add 192.0.2.61/24 dev eth0")
    with_process.ip("link add eth0 type dummy", "addr add 192.0.2.62/24 dev eth0")
    lab.start_server(with_process, "p", tcp_ports=(8080,), udp_ports=())
    index = PodNamespaces([], "/proc")  # processes only: a pod seen through its processes
    index.refresh()
    a, b = ipaddress.ip_address("192.0.2.61"), ipaddress.ip_address("192.0.2.62")
    assert index.locate([a, b]) == {b: [ident_of(with_process.path)]}


def test_dr_to_a_pod_behind_a_router_is_refused_with_the_reason(
    lab: Lab, agents: list[NodeAgent]
) -> None:
    topology = build_dr(lab, 4, real_servers=1)
    (rs,) = topology.real_servers
    # Pods of another node are behind that node: a route via a gateway, not this segment.
    topology.director.ip("route add 198.51.100.0/24 via 192.0.2.254")
    director = NodeAgent(topology.director, "director", [topology.director_addr], DIRECTOR_LABELS)
    agents.append(director)
    vs = virtual_server(topology, "DR", {"service": {"name": "web"}})
    both = [endpoint_slice(4, [(rs.rip, "node-rs1"), ("198.51.100.20", "node-b")])]

    result = director.reconcile([vs], both)
    outcome = result.outcomes["lab/web"]
    assert (outcome.state, outcome.reason, outcome.real_servers) == (
        State.PROGRAMMED, NOT_ON_LINK, 1,
    )  # fmt: skip
    assert "198.51.100.20 (via 192.0.2.254 dev eth0)" in outcome.message, outcome.message
    assert entry("lab/web", outcome)["reason"] == NOT_ON_LINK  # as the IPVSNode reports it
    table = ipvsadm_list(topology.director)
    assert rs.rip in table and "198.51.100.20" not in table
    counts = topology.client.tcp_identities(topology.vip, topology.port, 3, timeout=20)
    assert counts == Counter(rs1=3)

    only_remote = [endpoint_slice(4, [("198.51.100.20", "node-b")])]
    refused = director.reconcile([vs], only_remote).outcomes["lab/web"]
    assert (refused.state, refused.reason) == (State.FAILED, NOT_ON_LINK)
    assert "no real server remains" in refused.message
    assert topology.vip not in ipvsadm(topology.director, "-S", "-n").stdout


def test_ipvs_agent_apply_prepares_a_static_real_server_host(
    lab: Lab, agents: list[NodeAgent], tmp_path: Path
) -> None:
    """``ipvs-agent apply`` on a real server outside the cluster: no Node manifest, so the
    host's own addresses say it is the real server; the nodeSelector leaves it no director."""
    topology = build_dr(lab, 4, real_servers=1, prepare=False)
    (rs,) = topology.real_servers
    director = NodeAgent(topology.director, "director", [topology.director_addr], DIRECTOR_LABELS)
    agents.append(director)
    vs = virtual_server(topology, "DR", {"static": [{"address": rs.rip}]})
    director.reconcile([vs])
    manifest, empty = tmp_path / "vs.yaml", tmp_path / "none.yaml"
    manifest.write_text(json.dumps(vs))  # JSON is YAML
    empty.write_text("")

    def apply(path: Path) -> str:
        proc = rs.ns.run(
            sys.executable, "-m", "ipvs_agent", "apply", "-f", str(path), "--node-name", "rs1",
            check=False, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = apply(manifest)
    assert "# VirtualServer lab/web: Programmed [RealServer]" in out, out
    assert f"# real server in node: VIPs {topology.vip}" in out, out
    counts = topology.client.tcp_identities(topology.vip, topology.port, 2, timeout=20)
    assert counts == Counter(rs1=2)
    assert rs.ns.run("ipvsadm", "-S", "-n").stdout.strip() == "", "not a director"

    apply(empty)
    assert agent_links(rs.ns) == set()
    assert connect_fails(topology.client.ns, topology.vip, topology.port)
