"""One node's desired IPVS table, computed from VirtualServers and endpoints."""

from __future__ import annotations

import ipaddress

import pytest

from ipvs_agent.desired import Node, Role, State, plan
from ipvs_agent.model import (
    AddressFamily,
    DestKey,
    ForwardingMethod,
    KernelInfo,
    Protocol,
    ServiceFlag,
    ServiceKey,
    TunnelFlags,
    TunnelType,
)
from ipvs_api import InvalidObject
from tests.unit.agent_helpers import endpoints, slice_, vs

NODE = Node("node-a", {"edge": "true"})
STATIC = {"static": [{"address": "198.51.100.11"}, {"address": "198.51.100.12", "weight": 3}]}


def key(addr: str, port: int, proto: Protocol = Protocol.TCP) -> ServiceKey:
    return ServiceKey.for_address(ipaddress.ip_address(addr), proto, port)


def test_nat_static_one_service_per_port_with_target_ports() -> None:
    v = vs(
        address="192.0.2.1",
        ports=[{"port": 80, "targetPort": 8080}, {"port": 443}],
        backends=STATIC,
    )
    p = plan([v], {}, NODE)
    assert set(p.table) == {key("192.0.2.1", 80), key("192.0.2.1", 443)}
    http = p.table[key("192.0.2.1", 80)]
    assert http.service.scheduler == "wlc" and http.service.flags == 0
    assert {(d.key, d.weight) for d in http.dests.values()} == {
        (DestKey("198.51.100.11", 8080), 1),
        (DestKey("198.51.100.12", 8080), 3),
    }
    assert all(d.forwarding is ForwardingMethod.MASQ for d in http.dests.values())
    assert set(p.table[key("192.0.2.1", 443)].dests) == {
        DestKey("198.51.100.11", 443),
        DestKey("198.51.100.12", 443),
    }
    assert p.addresses == {ipaddress.ip_address("192.0.2.1")}
    assert p.masquerade == set(p.table)
    assert p.outcomes["ns/web"].state is State.PROGRAMMED
    assert p.outcomes["ns/web"].roles == {Role.DIRECTOR}
    assert p.outcomes["ns/web"].real_servers == 4


def test_scheduler_flags_persistence_and_one_packet_become_kernel_flags() -> None:
    sh = vs(
        address="192.0.2.1",
        ports=[{"port": 53, "protocol": "UDP"}],
        scheduler={"name": "sh", "flags": ["sh-fallback", "sh-port"]},
        persistence={"timeoutSeconds": 60, "ipv4PrefixLength": 24},
        onePacketScheduling=True,
        forwarding={"method": "DR"},
        backends=STATIC,
    )
    svc = plan([sh], {}, NODE).table[key("192.0.2.1", 53, Protocol.UDP)].service
    assert svc.scheduler == "sh"
    assert svc.flags == (
        ServiceFlag.SCHED1 | ServiceFlag.SCHED2 | ServiceFlag.PERSISTENT | ServiceFlag.ONEPACKET
    )
    assert svc.timeout == 60 and svc.netmask == 0xFFFFFF00

    v6 = vs(
        address="2001:db8::1",
        ports=[{"port": 80}],
        persistence={"ipv6PrefixLength": 64},
        backends={"static": [{"address": "2001:db8::11"}]},
    )
    svc6 = plan([v6], {}, NODE).table[key("2001:db8::1", 80)].service
    assert svc6.key.af is AddressFamily.INET6
    assert svc6.netmask == 64 and svc6.timeout == 300


def test_no_persistence_sends_the_kernel_defaults() -> None:
    p = plan(
        [
            vs(
                address="2001:db8::1",
                ports=[{"port": 80}],
                backends={"static": [{"address": "2001:db8::11"}]},
            )
        ],
        {},
        NODE,
    )
    svc = next(iter(p.table.values())).service
    assert (svc.flags, svc.timeout, svc.netmask, svc.pe_name) == (0, 0, 128, "")


def test_fwmark_service_keeps_the_packet_port_and_holds_no_address() -> None:
    v = vs(
        fwmark=16,
        ipFamily="IPv6",
        forwarding={"method": "DR"},
        backends={"static": [{"address": "2001:db8::11"}]},
    )
    p = plan([v], {}, NODE)
    (k,) = p.table
    assert k == ServiceKey.for_fwmark(AddressFamily.INET6, 16)
    assert set(p.table[k].dests) == {DestKey("2001:db8::11", 0)}
    assert p.table[k].dests[DestKey("2001:db8::11", 0)].forwarding is ForwardingMethod.ROUTE
    assert p.addresses == frozenset() and p.masquerade == frozenset()


def test_tun_gue_attributes_and_a_real_server_of_the_other_family() -> None:
    v = vs(
        address="2001:db8::80",
        ports=[{"port": 554}],
        forwarding={
            "method": "TUN",
            "tunnel": {"type": "gue", "port": 6080, "checksum": "remcsum"},
        },
        backends={"static": [{"address": "198.51.100.11"}, {"address": "2001:db8::11"}]},
    )
    dests = plan([v], {}, NODE).table[key("2001:db8::80", 554)].dests
    v4 = dests[DestKey("198.51.100.11", 554)]
    assert v4.forwarding is ForwardingMethod.TUNNEL
    assert (v4.tunnel_type, v4.tunnel_port, v4.tunnel_flags) == (
        TunnelType.GUE,
        6080,
        TunnelFlags.REMCSUM,
    )
    assert v4.af is AddressFamily.INET
    assert dests[DestKey("2001:db8::11", 554)].af is None


def test_thresholds_default_the_lower_to_three_quarters() -> None:
    v = vs(
        address="192.0.2.1",
        ports=[{"port": 80}],
        backends={
            "static": [
                {"address": "198.51.100.11", "upperThreshold": 100},
                {"address": "198.51.100.12", "upperThreshold": 100, "lowerThreshold": 10},
            ]
        },
    )
    dests = plan([v], {}, NODE).table[key("192.0.2.1", 80)].dests
    assert dests[DestKey("198.51.100.11", 80)].lower_threshold == 75
    assert dests[DestKey("198.51.100.12", 80)].lower_threshold == 10


def test_service_backends_ready_draining_and_gone() -> None:
    eps = endpoints(
        slice_(
            [
                ("10.1.0.1", {"ready": True}, "node-a"),
                ("10.1.0.2", {"ready": False, "serving": True, "terminating": True}, "node-b"),
                ("10.1.0.3", {"ready": False, "serving": False, "terminating": True}, "node-b"),
                ("10.1.0.4", {"ready": False}, "node-a"),
            ],
            [("http", 8080, "TCP")],
        ),
        slice_([("10.1.0.5", {}, "node-b")], [("http", 9090, "TCP")]),
    )
    v = vs(
        address="192.0.2.1",
        ports=[{"port": 80, "targetPort": "http"}],
        backends={"service": {"name": "web"}, "defaultWeight": 5},
    )
    p = plan([v], {("ns", "web"): eps}, NODE)
    dests = p.table[key("192.0.2.1", 80)].dests
    assert {(d.key, d.weight) for d in dests.values()} == {
        (DestKey("10.1.0.1", 8080), 5),
        (DestKey("10.1.0.2", 8080), 0),  # terminating but serving: drains at weight 0
        (DestKey("10.1.0.5", 9090), 5),  # named port resolved per slice
    }
    assert p.outcomes["ns/web"].real_servers == 2
    assert p.outcomes["ns/web"].draining_real_servers == 1


def test_traffic_policy_local_keeps_only_this_nodes_endpoints_and_skips_masquerade() -> None:
    eps = endpoints(
        slice_([("10.1.0.1", {}, "node-a"), ("10.1.0.2", {}, "node-b")], [("", 80, "TCP")])
    )
    v = vs(
        address="192.0.2.1",
        ports=[{"port": 80}],
        trafficPolicy="Local",
        backends={"service": {"name": "web"}},
    )
    p = plan([v], {("ns", "web"): eps}, NODE)
    assert set(p.table[key("192.0.2.1", 80)].dests) == {DestKey("10.1.0.1", 80)}
    assert p.masquerade == frozenset()


def test_endpoints_of_the_other_family_are_left_out_unless_tun() -> None:
    eps = endpoints(
        slice_([("2001:db8::5", {}, "node-a")], [("", 80, "TCP")], "IPv6"),
        slice_([("10.1.0.1", {}, "node-a")], [("", 80, "TCP")]),
    )
    nat = vs(address="192.0.2.1", ports=[{"port": 80}], backends={"service": {"name": "web"}})
    assert set(plan([nat], {("ns", "web"): eps}, NODE).table[key("192.0.2.1", 80)].dests) == {
        DestKey("10.1.0.1", 80)
    }


def test_no_address_yet_is_pending_and_programs_nothing() -> None:
    p = plan([vs(addressPool="default", ports=[{"port": 80}], backends=STATIC)], {}, NODE)
    assert p.table == {}
    assert p.outcomes["ns/web"].state is State.PENDING
    allocated = vs(
        addressPool="default", status_address="192.0.2.9", ports=[{"port": 80}], backends=STATIC
    )
    assert key("192.0.2.9", 80) in plan([allocated], {}, NODE).table


def test_conflicting_virtual_servers_the_earlier_keeps_the_address() -> None:
    first = vs(
        "b-first",
        created="2026-01-01T00:00:00Z",
        address="192.0.2.1",
        ports=[{"port": 80}],
        backends=STATIC,
    )
    later = vs(
        "a-later",
        created="2026-02-01T00:00:00Z",
        address="192.0.2.1",
        ports=[{"port": 443}, {"port": 80}],
        backends=STATIC,
    )
    p = plan([later, first], {}, NODE)
    assert p.owners[key("192.0.2.1", 80)] == "ns/b-first"
    assert key("192.0.2.1", 443) not in p.table, "a conflicting object is not half-programmed"
    assert p.outcomes["ns/a-later"].state is State.FAILED
    assert p.outcomes["ns/a-later"].reason == "AddressConflict"
    assert "ns/b-first" in p.outcomes["ns/a-later"].message


def test_a_scheduler_the_kernel_lacks_is_unsupported_and_others_still_program() -> None:
    kernel = KernelInfo("1.2.1", 4096, "6.1.0", schedulers=("rr", "wlc"), tunnel_types=("ipip",))
    node = Node("node-a", {}, kernel)
    twos = vs(
        "twos",
        address="192.0.2.1",
        ports=[{"port": 80}],
        scheduler={"name": "twos"},
        backends=STATIC,
    )
    gre = vs(
        "gre",
        address="192.0.2.2",
        ports=[{"port": 80}],
        forwarding={"method": "TUN", "tunnel": {"type": "gre"}},
        backends=STATIC,
    )
    ok = vs("ok", address="192.0.2.3", ports=[{"port": 80}], backends=STATIC)
    p = plan([twos, gre, ok], {}, node)
    assert p.outcomes["ns/twos"].state is State.UNSUPPORTED
    assert "twos" in p.outcomes["ns/twos"].message
    assert p.outcomes["ns/gre"].state is State.UNSUPPORTED
    assert set(p.table) == {key("192.0.2.3", 80)}


def test_one_packet_scheduling_programs_with_dr_or_tun_and_nat_is_refused() -> None:
    """NAT would send one-packet replies from the real server's address (the kernel keeps no
    entry to translate them back): the API refuses it, and so does the agent's own loader."""
    dr, tun = (
        vs(
            method.lower(),
            address=f"192.0.2.{n}",
            ports=[{"port": 53, "protocol": "UDP"}],
            onePacketScheduling=True,
            forwarding={"method": method},
            backends=STATIC,
        )
        for n, method in enumerate(("DR", "TUN"), start=2)
    )
    p = plan([dr, tun], {}, NODE)
    assert set(p.table) == {key("192.0.2.2", 53, Protocol.UDP), key("192.0.2.3", 53, Protocol.UDP)}
    assert all(s.service.flags & ServiceFlag.ONEPACKET for s in p.table.values())
    with pytest.raises(InvalidObject, match="onePacketScheduling needs DR or TUN"):
        vs("nat", address="192.0.2.1", ports=[{"port": 53, "protocol": "UDP"}],
           onePacketScheduling=True, backends=STATIC)  # fmt: skip


def test_node_selector_chooses_the_directors() -> None:
    v = vs(
        address="192.0.2.1",
        ports=[{"port": 80}],
        backends=STATIC,
        nodeSelector={"matchExpressions": [{"key": "edge", "operator": "Exists"}]},
    )
    assert plan([v], {}, NODE).table
    assert plan([v], {}, Node("node-b", {})).table == {}
    assert plan([v], {}, Node("node-b", {})).outcomes == {}


def test_udp_services_do_not_drain() -> None:
    v = vs(
        address="192.0.2.1",
        ports=[{"port": 53, "protocol": "UDP"}, {"port": 53}],
        drainTimeoutSeconds=30,
        backends=STATIC,
    )
    p = plan([v], {}, NODE)
    assert p.drain_seconds[key("192.0.2.1", 53, Protocol.UDP)] == 0
    assert p.drain_seconds[key("192.0.2.1", 53)] == 30
