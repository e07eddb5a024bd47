"""VirtualServer features, programmed by the agent and proven with real connections (in the VM).

Forwarding methods (NAT, DR, TUN with ipip/gue/gre, IPv4 and IPv6), scheduler port flags,
persistence (timeout and netmask), one-packet UDP scheduling, firewall-mark services, upper and
lower connection thresholds, and the IPVS timeouts the agent sets (``ipvs-agent run
--timeouts``). Each test writes VirtualServer manifests and runs the agent's reconcile pass
against the director's netns (tests/kernel/agent_harness.py); the topology prepares the real
servers (VIP on lo or a decapsulating tunnel, ARP suppression) as an administrator would.
"""

from __future__ import annotations

from collections import Counter

import pytest

from ipvs_agent.__main__ import _timeouts as parse_timeouts_option
from ipvs_agent.desired import State
from ipvs_agent.model import DestKey, ForwardingMethod, ServiceFlag, Timeouts, TunnelType
from tests.kernel.agent_harness import Agent, manifest
from tests.kernel.hashing import sh_pick, sh_table
from tests.kernel.ipvsctl import ipvsadm, ipvsadm_list
from tests.kernel.topology import TOPOLOGIES, Lab, TunType, build, build_dr, build_nat
from tests.kernel.traffic import (
    REFUSED,
    add_client_addresses,
    client_addresses,
    connection_entries,
    datagram_replies,
    datagrams_from_one_socket,
    held_tcp,
    reset,
    tcp_identities_from,
    tcp_identity,
    udp_identity,
    wait_for,
)

TCP_AND_UDP = [{"port": 80, "protocol": "TCP"}, {"port": 80, "protocol": "UDP"}]

# ---------------------------------------------------------------- forwarding methods

KERNEL_METHOD = {
    "nat": ForwardingMethod.MASQ,
    "dr": ForwardingMethod.ROUTE,
    "tun": ForwardingMethod.TUNNEL,
}
IPVSADM_METHOD = {"nat": "Masq", "dr": "Route", "tun": "Tunnel"}


@pytest.mark.parametrize(("method", "family", "tun_type"), TOPOLOGIES)
def test_every_forwarding_method_carries_tcp_and_udp_from_a_virtual_server(
    lab: Lab, method: str, family: int, tun_type: TunType | None
) -> None:
    topology = build(lab, method, family, tun_type)  # type: ignore[arg-type]
    agent = Agent(topology)
    agent.programmed(manifest(topology, scheduler="rr", ports=TCP_AND_UDP))
    table = ipvsadm_list(topology.director)
    client, vip, port = topology.client, topology.vip, topology.port
    assert client.tcp_identities(vip, port, 2) == Counter(rs1=1, rs2=1), table
    assert client.udp_identities(vip, port, 2) == Counter(rs1=1, rs2=1), table
    for protocol in (6, 17):
        for observed in agent.service(protocol=protocol).dests.values():
            dest = observed.dest
            assert dest.forwarding is KERNEL_METHOD[method], table
            if tun_type is not None:
                assert dest.tunnel_type is TunnelType[tun_type.upper()], table
                assert dest.tunnel_port == topology.tun_port, table
    forwards = [line.split()[2] for line in table.splitlines() if line.lstrip().startswith("-> ")]
    assert forwards[1:] == [IPVSADM_METHOD[method]] * 4, table  # [0] is the column header


# ---------------------------------------------------------------- scheduler flags


def test_port_flags_spread_one_client_address_over_servers_by_source_port(lab: Lab) -> None:
    """sh-port and mh-port hash the source port too: one address, many ports, many servers."""
    topology = build_nat(lab, family=4, real_servers=3)
    agent = Agent(topology)
    (address,) = add_client_addresses(topology, client_addresses(1))
    agent.programmed(
        manifest(topology, "sh", "sh", flags=["sh-port"]),
        manifest(
            topology, "mh", "mh", flags=["mh-port"],
            ports=[{"port": 8001, "protocol": "TCP", "targetPort": 80}],
        ),
    )  # fmt: skip
    for port in (80, 8001):
        assert agent.service(port).service.flags & ServiceFlag.SCHED2, "sh-port/mh-port bit"
    source_ports = range(31001, 31010)
    client, vip = topology.client, topology.vip
    sh = {p: tcp_identity(client, vip, 80, address, p) for p in source_ports}
    table = sh_table(agent.kernel_order(), {"rs1": 1, "rs2": 1, "rs3": 1})
    assert sh == {p: sh_pick(table, {"rs1", "rs2", "rs3"}, address, p) for p in source_ports}
    assert len(set(sh.values())) >= 2
    mh = Counter(tcp_identity(client, vip, 8001, address, p + 100) for p in source_ports)
    assert REFUSED not in mh and len(mh) >= 2, mh


# ---------------------------------------------------------------- persistence


def test_persistence_keeps_a_prefix_on_one_server_until_the_timeout(lab: Lab) -> None:
    """``persistence: {timeoutSeconds: 3, ipv4PrefixLength: 24}`` with rr on TCP and UDP.

    TCP: clients of one /24 share a real server, each /24 gets the next one in turn.
    UDP: once the client's connection and the affinity template have expired (the agent's UDP
    timeout is set to 1 s so that happens within the test), the same client is scheduled anew.
    """
    topology = build_nat(lab, family=4, real_servers=3)
    agent = Agent(topology)
    with agent.kernel() as kernel:
        kernel.set_timeouts(Timeouts(udp=1))
    subnets = [client_addresses(2, third_octet=n) for n in range(3)]
    interleaved = [subnet[i] for i in range(2) for subnet in subnets]  # .0.1 .1.1 .2.1 .0.2 …
    add_client_addresses(topology, interleaved)
    persistence = {"timeoutSeconds": 3, "ipv4PrefixLength": 24}
    agent.programmed(
        manifest(topology, scheduler="rr", ports=TCP_AND_UDP, spec={"persistence": persistence})
    )
    listing = ipvsadm_list(topology.director)
    assert listing.count("persistent 3 mask 255.255.255.0") == 2, listing
    order = agent.kernel_order()

    seen = tcp_identities_from(topology.client, topology.vip, 80, interleaved)
    assert seen == {c: [order[n]] for n, subnet in enumerate(subnets) for c in subnet}

    client, vip = topology.client, topology.vip
    first, neighbour = subnets[0]
    assert udp_identity(client, vip, 80, first) == order[0]
    assert udp_identity(client, vip, 80, neighbour) == order[0], "the /24 sticks"
    templates = [e for e in connection_entries(topology) if e.protocol == "UDP"]
    assert templates and all(e.expires <= 3 for e in templates), templates
    wait_for(
        lambda: not [e for e in connection_entries(topology) if e.protocol == "UDP"],
        "UDP connections and the persistence template expire",
        timeout=20,
    )
    assert udp_identity(client, vip, 80, neighbour) == order[1], "a new turn after the timeout"


def test_ipv6_persistence_groups_clients_by_prefix_length(lab: Lab) -> None:
    """``ipv6PrefixLength: 120``: 2001:db8:c1::1xx share a real server, ::2xx get the next."""
    topology = build_nat(lab, family=6, real_servers=3)
    agent = Agent(topology)
    clients = ["2001:db8:c1::111", "2001:db8:c1::211", "2001:db8:c1::112", "2001:db8:c1::212"]
    for address in clients:  # on the client LAN's /64: the director reaches them on-link
        topology.client.ns.add_address("eth0", address, 128)
    persistence = {"timeoutSeconds": 60, "ipv6PrefixLength": 120}
    agent.programmed(manifest(topology, scheduler="rr", spec={"persistence": persistence}))
    order = agent.kernel_order()
    seen = tcp_identities_from(topology.client, topology.vip, 80, clients)
    assert [ids[0] for ids in seen.values()] == [order[0], order[1], order[0], order[1]]


# ---------------------------------------------------------------- one-packet scheduling


def test_one_packet_scheduling_spreads_the_datagrams_of_one_socket(lab: Lab) -> None:
    topology = build_dr(lab, family=4, real_servers=3)
    agent = Agent(topology)
    udp = [{"port": 80, "protocol": "UDP"}]
    client, vip = topology.client, topology.vip
    agent.programmed(manifest(topology, scheduler="rr", ports=udp))
    plain = datagrams_from_one_socket(client, vip, 80, 6)
    assert len(set(plain)) == 1, f"one socket is one connection without OPS: {plain}"

    agent.programmed(
        manifest(topology, scheduler="rr", ports=udp, spec={"onePacketScheduling": True})
    )
    assert agent.service(80, protocol=17).service.flags & ServiceFlag.ONEPACKET
    spread = datagrams_from_one_socket(client, vip, 80, 6)
    assert Counter(spread) == Counter(rs1=2, rs2=2, rs3=2), spread


def test_one_packet_scheduling_with_nat_is_refused_as_replies_skip_translation(
    lab: Lab,
) -> None:
    """NAT with onePacketScheduling is refused (CEL at apply; the agent's loader for objects
    that never passed the API server); the same service made by hand shows why: the kernel
    keeps no entry for one-packet datagrams, so replies leave with the real server's address
    and a client (any connected socket, any DNS resolver) never accepts them."""
    topology = build_nat(lab, family=4, real_servers=2)
    agent = Agent(topology)
    udp = [{"port": 80, "protocol": "UDP"}]
    vs = manifest(topology, scheduler="rr", ports=udp, spec={"onePacketScheduling": True})
    result = agent.reconcile(vs)
    outcome = result.outcomes["lab/web"]
    assert (outcome.state, outcome.reason) == (State.FAILED, "InvalidSpec"), outcome
    assert "onePacketScheduling needs DR or TUN" in outcome.message
    assert result.ops == [] and agent.dump() == {}

    director, vip = topology.director, topology.vip
    ipvsadm(director, "-A", "-u", f"{vip}:80", "-s", "rr", "-o")
    for rs in topology.real_servers:
        ipvsadm(director, "-a", "-u", f"{vip}:80", "-r", f"{rs.rip}:80", "-m")
    replies = datagram_replies(topology.client, vip, 80, 2)
    assert sorted(replies) == sorted((rs.name, rs.rip) for rs in topology.real_servers)


# ---------------------------------------------------------------- firewall marks

MARK = 7


def mark_rules(vip: str) -> str:
    """nft rules for the director: TCP 80 and 8080 and UDP 80 to the VIP carry MARK."""
    ip = "ip6" if ":" in vip else "ip"
    return (
        "add table inet lab; "
        "add chain inet lab pre { type filter hook prerouting priority mangle; }; "
        f"add rule inet lab pre {ip} daddr {vip} tcp dport {{ 80, 8080 }} meta mark set {MARK}; "
        f"add rule inet lab pre {ip} daddr {vip} udp dport 80 meta mark set {MARK}"
    )


@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
def test_a_firewall_mark_service_balances_every_marked_port_and_protocol(
    lab: Lab, family: int
) -> None:
    topology = build_nat(lab, family=family, real_servers=2)
    for rs in topology.real_servers:  # a second port on every real server
        lab.start_server(rs.ns, rs.name, tcp_ports=(8080,), udp_ports=())
    topology.director.run("nft", mark_rules(topology.vip))
    agent = Agent(topology)
    ip_family = f"IPv{family}"
    agent.programmed(
        manifest(topology, scheduler="rr", spec={"fwmark": MARK, "ipFamily": ip_family})
    )
    (key,) = agent.dump()
    assert (key.fwmark, key.port, key.af) == (MARK, 0, 2 if family == 4 else 10), key
    client, vip = topology.client, topology.vip
    assert client.tcp_identities(vip, 80, 2) == Counter(rs1=1, rs2=1)
    assert client.tcp_identities(vip, 8080, 2) == Counter(rs1=1, rs2=1)
    assert client.udp_identities(vip, 80, 2) == Counter(rs1=1, rs2=1)
    assert tcp_identity(client, vip, 81) == REFUSED, "an unmarked port is not balanced"


# ---------------------------------------------------------------- thresholds


def test_upper_threshold_excludes_a_server_until_it_falls_below_the_lower(lab: Lab) -> None:
    """fo always picks the heaviest available server, so the picks show who is excluded.

    rs1 (weight 10): upper 3, lower 1; rs2 (weight 5): upper 3, lower 3; rs3 (weight 1).
    Connections count while they are in the kernel's table, open or not; a reset one leaves
    it 10 s after the reset (the CLOSE state's timeout).
    """
    topology = build_nat(lab, family=4, real_servers=3)
    agent = Agent(topology)
    thresholds = {
        0: {"upperThreshold": 3, "lowerThreshold": 1},
        1: {"upperThreshold": 3, "lowerThreshold": 3},
    }
    agent.programmed(
        manifest(topology, scheduler="fo", weights=[10, 5, 1], real_server_fields=thresholds)
    )
    client, vip, port = topology.client, topology.vip, topology.port
    with held_tcp(client, vip, port, 7) as held:
        assert held.identities == ["rs1"] * 3 + ["rs2"] * 3 + ["rs3"], "upper reached: excluded"
        for index in (0, 1, 3, 4):  # two of rs1's, two of rs2's
            reset(held.sockets[index])

        def totals() -> tuple[int, int]:
            dests = agent.service().dests
            stats = [dests[DestKey(rs.rip, port)].stats for rs in topology.real_servers[:2]]
            return (
                stats[0].active_connections + stats[0].inactive_connections,
                stats[1].active_connections + stats[1].inactive_connections,
            )

        wait_for(lambda: totals() == (1, 1), "the reset connections leave the table")
        # rs2 fell below its lower threshold (1 < 3) and is back; rs1 did not (1 is not < 1).
        assert tcp_identity(client, vip, port) == "rs2"


# ---------------------------------------------------------------- timeouts


def test_the_agents_timeouts_setting_bounds_idle_connections(lab: Lab) -> None:
    """``ipvs-agent run --timeouts 9,6,3`` (TCP, TCP FIN_WAIT, UDP seconds) on the director.

    Each kind of entry is created and expires within its timeout; the kernel defaults
    (900, 120, 300 s) would keep all three for minutes.
    """
    topology = build_nat(lab, family=4, real_servers=2)
    agent = Agent(topology)
    timeouts = Timeouts(*parse_timeouts_option("9,6,3"))
    with agent.kernel() as kernel:
        assert kernel.get_timeouts() == Timeouts(900, 120, 300)
        kernel.set_timeouts(timeouts)  # what `ipvs-agent run` does with the option
        assert kernel.get_timeouts() == timeouts
    shown = ipvsadm(topology.director, "-L", "--timeout").stdout
    assert "Timeout (tcp tcpfin udp): 9 6 3" in shown, shown
    agent.programmed(manifest(topology, scheduler="rr", ports=TCP_AND_UDP))
    client, vip = topology.client, topology.vip

    def states() -> dict[str, int]:
        return {e.state: e.expires for e in connection_entries(topology)}

    with held_tcp(client, vip, 80, 2) as held:
        held.sockets[1].sendall(b"close\n")  # the server closes first: FIN_WAIT at the director
        wait_for(lambda: "FIN_WAIT" in states(), "the server's FIN reaches the director")
        udp_identity(client, vip, 80)
        expiry = states()
        assert set(expiry) == {"ESTABLISHED", "FIN_WAIT", "UDP"}, expiry
        assert expiry["ESTABLISHED"] <= 9 and expiry["FIN_WAIT"] <= 6 and expiry["UDP"] <= 3
        wait_for(lambda: not states(), "every idle entry expires", timeout=30)
