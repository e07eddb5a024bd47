"""Smoke tests of the kernel test bed: real IPVS balancing real connections.

A service is programmed with pyroute2 in the director's netns and clients count
which real server answered each connection.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.kernel.ipvsctl import add_service, ipvs_socket, ipvsadm_list
from tests.kernel.topology import TOPOLOGIES, Lab, build, build_nat


def loaded_modules() -> set[str]:
    with open("/proc/modules") as handle:
        return {line.split()[0] for line in handle}


def test_kernel_modules_autoload_inside_the_test_root(lab: Lab) -> None:
    """Creating a gre tunnel, an nftables nat chain or an sh service needs no modprobe."""
    (ns,) = lab.netns("autoload")
    ns.ip("link add gre9 type gre local 192.0.2.1 remote 192.0.2.2")
    ns.run("nft", "add table ip t")
    ns.run("nft", "add chain ip t post { type nat hook postrouting priority 100 ; }")
    with ipvs_socket(ns) as ipvs:
        from tests.kernel.ipvsctl import service

        ipvs.service("add", service=service("203.0.113.10", 80, scheduler="sh"))
    assert {"ip_gre", "nft_chain_nat", "ip_vs_sh"} <= loaded_modules()


def test_nat_rr_spreads_sixty_connections_evenly_over_three_servers(lab: Lab) -> None:
    topology = build_nat(lab, family=4, real_servers=3)
    with ipvs_socket(topology.director) as ipvs:
        add_service(ipvs, topology, scheduler="rr")
    counts = topology.client.tcp_identities(topology.vip, topology.port, 60)
    assert counts == Counter(rs1=20, rs2=20, rs3=20)


def test_nat_wrr_follows_weights_three_two_one(lab: Lab) -> None:
    topology = build_nat(lab, family=4, real_servers=3)
    with ipvs_socket(topology.director) as ipvs:
        add_service(ipvs, topology, scheduler="wrr", weights=[3, 2, 1])
    counts = topology.client.tcp_identities(topology.vip, topology.port, 60)
    assert counts == Counter(rs1=30, rs2=20, rs3=10)


@pytest.mark.parametrize(("method", "family", "tun_type"), TOPOLOGIES)
def test_topology_forwards_tcp_and_udp_round_robin(
    lab: Lab, method: str, family: int, tun_type: str | None
) -> None:
    topology = build(lab, method, family, tun_type)  # type: ignore[arg-type]
    with ipvs_socket(topology.director) as ipvs:
        add_service(ipvs, topology, "tcp", "rr")
        add_service(ipvs, topology, "udp", "rr")
    table = ipvsadm_list(topology.director)
    tcp = topology.client.tcp_identities(topology.vip, topology.port, 20)
    assert tcp == Counter(rs1=10, rs2=10), table
    udp = topology.client.udp_identities(topology.vip, topology.port, 20)
    assert udp == Counter(rs1=10, rs2=10), table
