"""Real servers prepared by realserver.py answer DR and TUN (ipip, gue, gre) connections.

The topology's own real-server preparation is undone first (no VIP, no tunnel device, ARP
and reverse-path filtering at strict distribution-like values), so only
``RealServerHost.sync`` can make the real server answer. One real server serves four VIPs,
one per forwarding method, so a single director exercises every method at once.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from collections import Counter

import pytest

from ipvs_agent.host._netns import HostError
from ipvs_agent.host.realserver import (
    IPPROTO_IPIP,
    Decap,
    RealServerHost,
    RealServerSpec,
    tunnel_device,
)
from ipvs_agent.model import TunnelType
from tests.kernel.ipvsctl import ipvsadm_list
from tests.kernel.topology import GUE_PORT, Lab, Netns, build_tun

METHODS: dict[str, list[str]] = {
    "dr": ["-g"],
    "ipip": ["-i", "--tun-type", "ipip"],
    "gue": ["-i", "--tun-type", "gue", "--tun-port", str(GUE_PORT)],
    "gre": ["-i", "--tun-type", "gre"],
}


VIP_6IN4 = "2001:db8:f::20"


def vip_of(family: int, index: int) -> str:
    return f"203.0.113.{10 + index}" if family == 4 else f"2001:db8:f::{10 + index}"


def bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def ipvsadm_restore(director: Netns, rules: list[str]) -> None:
    """Program several services with one ipvsadm process (each exec is slow under TCG)."""
    with director.entered():
        proc = subprocess.run(
            ["ipvsadm", "-R"], input="\n".join(rules) + "\n", capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


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
    links = json.loads(ns.run("ip", "-j", "link", "show").stdout)
    return {link["ifname"] for link in links if link["ifname"].startswith("ipvs")}


def strip_topology_preparation(ns: Netns) -> None:
    """Undo what build_tun did for the real server, and make reverse-path checks strict."""
    ns.ip("link del tun0")
    for scope in ("all", "default", "eth0"):
        ns.sysctl(f"net.ipv4.conf.{scope}.arp_ignore", 0)
        ns.sysctl(f"net.ipv4.conf.{scope}.arp_announce", 0)
    for scope in ("all", "default"):
        ns.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 1)


@pytest.mark.parametrize("family", [4, 6])
def test_prepared_real_server_answers_dr_and_every_tunnel_type(lab: Lab, family: int) -> None:
    topology = build_tun(lab, family, "ipip", real_servers=1)
    director, client = topology.director, topology.client
    (rs,) = topology.real_servers
    strip_topology_preparation(rs.ns)
    plen = 32 if family == 4 else 128
    vips = {method: vip_of(family, index) for index, method in enumerate(METHODS)}
    extra = [vip for vip in vips.values() if vip != topology.vip]
    director.ip(*(f"addr add {vip}/{plen} dev vip0" for vip in extra))
    client.ns.ip(*(f"route add {vip}/{plen} via {topology.director_addr}" for vip in extra))
    rules = []
    for method, vip in vips.items():
        service = f"{bracket(vip)}:{topology.port}"
        rules.append(f"-A -t {service} -s rr")
        rules.append(f"-a -t {service} -r {bracket(rs.rip)}:80 {' '.join(METHODS[method])}")
    if family == 4:
        # An IPv6 VIP over IPv4 tunnels (TUN may cross families): the sit device decapsulates.
        vips["ipip-6in4"] = VIP_6IN4
        director.ip("addr add 2001:db8:5e::1/64 dev eth0", f"addr add {VIP_6IN4}/128 dev vip0")
        client.ns.ip(
            "addr add 2001:db8:5e::101/64 dev eth0", f"route add {VIP_6IN4}/128 via 2001:db8:5e::1"
        )
        rs.ns.ip("addr add 2001:db8:5e::11/64 dev eth0")
        rules.append(f"-A -t [{VIP_6IN4}]:80 -s rr")
        rules.append(f"-a -t [{VIP_6IN4}]:80 -r {rs.rip}:80 -i --tun-type ipip")
    ipvsadm_restore(director, rules)
    assert connect_fails(client.ns, vips["dr"], topology.port)

    rip = ipaddress.ip_address(rs.rip)
    spec = RealServerSpec(
        vips=frozenset(ipaddress.ip_address(v) for v in vips.values()),
        decap=frozenset(
            {
                Decap(TunnelType.IPIP, rip),
                Decap(TunnelType.GUE, rip, GUE_PORT),
                Decap(TunnelType.GRE, rip),
            }
        ),
    )
    with RealServerHost(netns=rs.ns.name) as host:
        changes = host.sync(spec)
        assert changes.addresses.added == spec.vips
        # ipip (+ sit for the IPv6 VIP) and gre; or ip6tnl and ip6gre
        assert len(changes.tunnels_added) == (3 if family == 4 else 2)
        assert [str(p) for p in changes.fou_added] == [f"{GUE_PORT}/{family}"]

        table = ipvsadm_list(director)
        for method, vip in vips.items():
            counts = client.tcp_identities(vip, topology.port, 1, timeout=10)
            assert counts == Counter(rs1=1), f"{method} via {vip}\n{table}"

        assert not host.sync(spec).changed  # idempotent
        assert rs.ns.read_sysctl("net.ipv4.conf.all.rp_filter") == "2"
        if family == 4:
            assert rs.ns.read_sysctl("net.ipv4.conf.all.arp_ignore") == "1"
            assert rs.ns.read_sysctl("net.ipv4.conf.all.arp_announce") == "2"

        # No longer a real server of anything: everything the agent made goes away.
        undone = host.sync(RealServerSpec())
        assert undone.interface_removed
        assert sorted(undone.tunnels_removed) == sorted(changes.tunnels_added)
        assert undone.fou_removed == changes.fou_added
    assert agent_links(rs.ns) == set()
    assert rs.ns.run("ip", "fou", "show").stdout.strip() == ""


def test_real_server_setup_leaves_foreign_devices_and_fou_ports_alone(lab: Lab) -> None:
    (ns,) = lab.netns("rs")
    ns.run("modprobe", "-a", "fou", "ipip")  # tunl0 appears with ipip
    ns.ip(
        "link add eth0 type dummy",
        "addr add 192.0.2.11/24 dev eth0",
        "link set eth0 up",
        "link add foreign0 type dummy",
        "addr add 203.0.113.10/32 dev foreign0",
        "fou add port 5555 gue",
        "link set tunl0 up",
    )
    rip = ipaddress.ip_address("192.0.2.11")
    spec = RealServerSpec(
        frozenset({ipaddress.ip_address("203.0.113.10")}),
        frozenset({Decap(TunnelType.GUE, rip, 5555), Decap(TunnelType.GUE, rip, 6080)}),
    )
    # The agent's own device name, taken by a device of another kind: foreign, refused.
    name = tunnel_device("ipip", rip, IPPROTO_IPIP).name
    ns.ip(f"link add {name} type dummy")
    with RealServerHost(netns=f"/run/netns/{ns.name}") as host:
        with pytest.raises(HostError, match="not the agent's"):
            host.sync(spec)
        # The right kind without the alias (a crash right after creation): adopted.
        ns.ip(f"link del {name}", f"link add {name} type ipip local {rip}")
        changes = host.sync(spec)
        assert changes.tunnels_added == ()
        # 5555 already existed: used, but not recorded as the agent's, so never removed.
        assert [str(p) for p in changes.fou_added] == ["6080/4"]
        undone = host.clear()
        assert [str(p) for p in undone.fou_removed] == ["6080/4"]
    assert ns.run("ip", "fou", "show").stdout.split() == ["port", "5555", "gue"]
    links = {link["ifname"]: link for link in json.loads(ns.run("ip", "-j", "addr").stdout)}
    assert "UP" in links["tunl0"]["flags"]
    assert [a["local"] for a in links["foreign0"]["addr_info"]] == ["203.0.113.10"]
    assert agent_links(ns) == set()
