"""The agent's VIP interface in a director netns: the VIP it holds is served, and only that.

A NAT service is programmed with ipvsadm; the VIP becomes local only through
``VipInterface.sync``, so connections from the client netns prove that the address the agent
put on its dummy device is what IPVS serves, and that removing it stops the service.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections import Counter

import pytest

from ipvs_agent.host._netns import HostError
from ipvs_agent.host.addresses import VipInterface
from tests.kernel.ipvsctl import ipvsadm
from tests.kernel.topology import Lab, Netns, build_nat

VIP = ipaddress.ip_address("203.0.113.10")
VIP6 = ipaddress.ip_address("2001:db8:f::10")
FOREIGN = "203.0.113.99"


def connect_fails(ns: Netns, addr: str, port: int, timeout: float = 2.0) -> bool:
    """One bounded connection attempt from ``ns``: True if it did not get through."""
    with ns.entered():
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except OSError:
            return True
    return False


def link(ns: Netns, name: str) -> dict[str, object]:
    (found,) = json.loads(ns.run("ip", "-j", "addr", "show", "dev", name).stdout)
    assert isinstance(found, dict)
    return found


def addresses(ns: Netns, name: str) -> set[str]:
    info = link(ns, name)["addr_info"]
    assert isinstance(info, list)
    return {f"{a['local']}/{a['prefixlen']}" for a in info if a.get("scope") != "link"}


def test_vip_sync_serves_the_vip_and_removal_stops_it(lab: Lab) -> None:
    topology = build_nat(lab, family=4, real_servers=2)
    director = topology.director
    # The topology's own dummy keeps a foreign address: a device the agent must not touch.
    director.ip(f"addr del {VIP}/32 dev vip0", f"addr add {FOREIGN}/32 dev vip0")
    ipvsadm(director, "-A", "-t", f"{VIP}:80", "-s", "rr")
    for rs in topology.real_servers:
        ipvsadm(director, "-a", "-t", f"{VIP}:80", "-r", f"{rs.rip}:80", "-m")
    assert connect_fails(topology.client.ns, str(VIP), 80)

    with VipInterface(netns=director.name) as vips:
        added, removed = vips.sync({VIP, VIP6})
        assert added == {VIP, VIP6}
        assert removed == set()
        flags = link(director, "ipvs0")["flags"]
        assert isinstance(flags, list)
        assert {"UP", "NOARP"} <= set(flags)
        assert addresses(director, "ipvs0") == {f"{VIP}/32", f"{VIP6}/128"}
        assert vips.tentative() == set()  # nodad: usable at once

        counts = topology.client.tcp_identities(str(VIP), 80, 4)
        assert counts == Counter(rs1=2, rs2=2)

        assert not vips.sync({VIP, VIP6}).changed  # idempotent
        assert not vips.ensure()

        # A stray prefix on the agent's own device is corrected to a host address.
        director.ip(f"addr del {VIP}/32 dev ipvs0", f"addr add {VIP}/24 dev ipvs0")
        assert vips.sync({VIP, VIP6}).added == {VIP}
        assert addresses(director, "ipvs0") == {f"{VIP}/32", f"{VIP6}/128"}

        added, removed = vips.sync({VIP6})
        assert added == set()
        assert removed == {VIP}
        assert connect_fails(topology.client.ns, str(VIP), 80)
        assert vips.addresses() == {VIP6}

        # Other devices and addresses are untouched.
        assert addresses(director, "vip0") == {f"{FOREIGN}/32"}
        assert "UP" in link(director, "vip0")["flags"]  # type: ignore[operator]
        assert any(a.startswith("192.0.2.1/") for a in addresses(director, "eth1"))

        assert vips.delete()
        assert not vips.delete()
        assert vips.addresses() == set()
        assert addresses(director, "vip0") == {f"{FOREIGN}/32"}


def test_vip_interface_refuses_a_device_it_does_not_own(lab: Lab) -> None:
    (ns,) = lab.netns("owner")
    ns.ip("link add ipvs0 type bridge")
    with VipInterface(netns=f"/run/netns/{ns.name}") as vips:
        with pytest.raises(HostError, match="not the agent's dummy"):
            vips.sync({VIP})
        with pytest.raises(HostError, match="not a dummy"):
            vips.delete()
    assert link(ns, "ipvs0")["addr_info"] == []


def test_the_raw_address_dump_reads_what_iproute2_shows(lab: Lab) -> None:
    """host.rtnl decodes RTM_GETADDR itself (pyroute2's parser was most of a large pass): it
    must read every device's addresses, prefixes and tentative flag as ``ip -j addr`` does,
    also past one 32-KiB dump chunk, and filter by device."""
    (ns,) = lab.netns("dump")
    ns.ip("link add ipvs0 type dummy", "link set ipvs0 up")
    ns.ip("link add other0 type veth peer name other1", "link set other1 up")
    many = [ipaddress.ip_address("198.18.0.1") + i for i in range(600)]
    with VipInterface(netns=f"/run/netns/{ns.name}") as vips:
        vips.sync({*many, VIP6})
        # DAD on other0 (a veth: a dummy is NOARP, which skips DAD) sends 100 probes a second
        # apart: its address stays tentative.
        ns.sysctl("net/ipv6/conf/other0/accept_dad", 1)  # the lab turns DAD off
        ns.sysctl("net/ipv6/conf/other0/dad_transmits", 100)
        ns.ip("link set other0 up")
        ns.ip("addr add 192.0.2.7/24 dev other0", "addr add 2001:db8:9::7/64 dev other0")
        shown = json.loads(ns.run("ip", "-j", "addr", "show").stdout)
        expected = {
            (entry["ifindex"], a["local"], a["prefixlen"], bool(a.get("tentative")))
            for entry in shown
            for a in entry["addr_info"]
        }
        records = vips.reader.dump()
        got = {(r.ifindex, str(r.address), r.prefixlen, bool(r.flags & 0x40)) for r in records}
        assert got == expected
        assert any(tentative for *_, tentative in got)
        assert len(records) == len(expected) > 600
        index = ns.index("ipvs0")
        assert {r.address for r in vips.reader.dump(index)} == {*many, VIP6} | {
            r.address for r in records if r.ifindex == index and r.address.is_link_local
        }
        assert vips.addresses() == {*many, VIP6}
