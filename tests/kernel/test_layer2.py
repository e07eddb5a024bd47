"""The layer-2 responder on a real kernel: real clients resolve the VIP through it, and its
gratuitous announcements move a neighbour entry that pointed elsewhere.

A director namespace runs the agent's pass (real kernel, real host layer: the VIP on ``ipvs0``
and the nftables ``arp`` table that keeps the kernel from answering) and the responder on its
``eth0``; a client on the same LAN reaches the VIP only if the responder's ARP replies and
neighbour advertisements are right. The election and the Leases are proven in the multi-node
lab (tests/e2e/test_layer2.py).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipvs_agent.announce.responder import Responder
from tests.kernel.agent_harness import NodeAgent
from tests.kernel.topology import Lab, Netns, Topology, build_dr
from tests.kernel.traffic import wait_for

VIP4, VIP6 = "192.0.2.50", "2001:db8:5e::50"  # on the LAN's own subnets: answered on eth0


@pytest.fixture
def answering(lab: Lab, tmp_path: Path) -> Iterator[tuple[Topology, NodeAgent, Responder]]:
    topology = build_dr(lab, family=4, real_servers=2)
    director = topology.director
    director.ip(f"addr del {topology.vip}/32 dev vip0")
    director.ip("addr add 2001:db8:5e::1/64 dev eth0 nodad")
    client = topology.client.ns
    client.ip("addr add 2001:db8:5e::101/64 dev eth0 nodad")
    for rs in topology.real_servers:
        rs.ns.ip(f"addr add {VIP4}/32 dev lo")
    agent = NodeAgent(director, "director", [topology.director_addr], state_dir=tmp_path / "s")
    responder = Responder(netns=director.path)
    stop = threading.Event()
    thread = threading.Thread(target=responder.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield topology, agent, responder
    finally:
        stop.set()
        thread.join(10)
        agent.close()


def served(ns: Netns, vip: str, count: int = 3) -> bool:
    """Whether ``count`` connections to vip:80 from ``ns`` reach a real server (on-link)."""
    from tests.kernel.topology import Client

    try:
        return sum(Client(ns, "").tcp_identities(vip, 80, count, timeout=5).values()) == count
    except (OSError, TimeoutError, ConnectionError):
        return False


def neighbour(ns: Netns, address: str) -> str:
    out = ns.run("ip", "neigh", "show", address).stdout.split()
    return out[out.index("lladdr") + 1] if "lladdr" in out else ""


def virtual_server(address: str, rips: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": f"web{ipaddress.ip_address(address).version}", "namespace": "lab"},
        "spec": {
            "address": address,
            "ports": [{"port": 80}],
            "scheduler": {"name": "rr"},
            "forwarding": {"method": "DR"},
            "backends": {"static": [{"address": rip} for rip in rips]},
        },
    }


def test_clients_resolve_the_vip_only_through_the_responder(
    answering: tuple[Topology, NodeAgent, Responder],
) -> None:
    topology, agent, responder = answering
    client = topology.client.ns
    for rs in topology.real_servers:  # DR real servers on the LAN, holding the VIPs
        rs.ns.ip(f"addr add {VIP6}/128 dev lo")
    rips4 = [rs.rip for rs in topology.real_servers]
    agent.reconcile([virtual_server(VIP4, rips4)])
    # The VIP is local to the director, but nothing answers for it yet: not the kernel.
    assert not served(client, VIP4, 1)
    responder.set({ipaddress.ip_address(VIP4): ("eth0",)})
    assert served(client, VIP4)
    assert neighbour(client, VIP4) == director_mac(topology.director)
    responder.set({})
    client.run("ip", "neigh", "flush", "dev", "eth0")
    assert not served(client, VIP4, 1), "given up: nobody answers any more"


def director_mac(ns: Netns) -> str:
    link = ns.ipr.link("get", index=ns.index("eth0"))[0]
    return str(link.get_attr("IFLA_ADDRESS"))


def test_gratuitous_announcements_move_a_neighbour_entry_at_once(
    answering: tuple[Topology, NodeAgent, Responder],
) -> None:
    topology, _, responder = answering
    client = topology.client.ns
    stale = "02:00:5e:00:53:ff"  # where the client thinks the VIPs are (another node)
    for vip in (VIP4, VIP6):
        client.run("ip", "neigh", "replace", vip, "lladdr", stale, "dev", "eth0", "nud", "stale")
    assert neighbour(client, VIP4) == stale
    responder.set({ipaddress.ip_address(VIP4): ("eth0",), ipaddress.ip_address(VIP6): ("eth0",)})
    mac = director_mac(topology.director)
    wait_for(lambda: neighbour(client, VIP4) == mac, "the ARP entry moved", timeout=10)
    wait_for(lambda: neighbour(client, VIP6) == mac, "the IPv6 neighbour moved", timeout=10)
    wait_for(lambda: responder.announcements >= 4, "announcements repeated", timeout=10)


def test_ipv6_solicitations_and_unicast_probes_are_answered(
    answering: tuple[Topology, NodeAgent, Responder],
) -> None:
    topology, agent, responder = answering
    client = topology.client.ns
    for rs in topology.real_servers:
        rs.ns.ip(f"addr add {VIP6}/128 dev lo")
    rips6 = [f"2001:db8:5e::{11 + i}" for i in range(len(topology.real_servers))]
    for rs, rip in zip(topology.real_servers, rips6, strict=True):
        rs.ns.ip(f"addr add {rip}/64 dev eth0 nodad")
    agent.reconcile([virtual_server(VIP6, rips6)])
    assert not served(client, VIP6, 1)
    client.run("ip", "-6", "neigh", "flush", "dev", "eth0")
    responder.set({ipaddress.ip_address(VIP6): ("eth0",)})
    assert served(client, VIP6)
    mac = director_mac(topology.director)
    assert neighbour(client, VIP6) == mac
    # Unicast neighbour unreachability detection (what a router does to a cached entry):
    # force the entry to be re-verified; it must stay reachable through the responder.
    client.run("ip", "-6", "neigh", "change", VIP6, "lladdr", mac, "dev", "eth0", "nud", "probe")
    wait_for(lambda: "REACHABLE" in client.run("ip", "-6", "neigh", "show", VIP6).stdout,
             "the unicast probe answered", timeout=10)  # fmt: skip


def test_another_hosts_announcement_shows_as_a_claim(
    answering: tuple[Topology, NodeAgent, Responder],
) -> None:
    """A node cut off from the API server keeps its VIPs until another host claims them: the
    claim is the other node's gratuitous ARP and unsolicited advertisement, read here through
    the kernel's packet sockets and the neighbour-discovery filter."""
    topology, _, responder = answering
    vips = {ipaddress.ip_address(VIP4): ("eth0",), ipaddress.ip_address(VIP6): ("eth0",)}
    responder.set(vips)
    wait_for(lambda: responder.announcements >= 4, "own announcements sent", timeout=10)
    assert responder.claims() == {}, "its own frames are no claim"
    other = Responder(netns=topology.client.ns.path, burst=(0.0, 0.5))
    stop = threading.Event()
    thread = threading.Thread(target=other.run, args=(stop,), daemon=True)
    thread.start()
    try:
        other.set(vips)
        wait_for(lambda: set(responder.claims()) == set(vips), "both VIPs claimed", timeout=10)
    finally:
        stop.set()
        thread.join(10)
