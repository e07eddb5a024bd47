"""Real-server host state rendered from what DR and TUN services need (pure parts)."""

from __future__ import annotations

import ipaddress

import pytest

from ipvs_agent.host.realserver import (
    Decap,
    FouPort,
    RealServerSpec,
    fou_record,
    parse_fou_record,
    parse_fou_show,
    render,
    tunnel_device,
)
from ipvs_agent.model import TunnelType

VIP4 = ipaddress.ip_address("203.0.113.10")
VIP6 = ipaddress.ip_address("2001:db8:f::10")
RIP4 = ipaddress.ip_address("192.0.2.11")
RIP6 = ipaddress.ip_address("2001:db8:5e::11")


def kinds(spec: RealServerSpec) -> list[tuple[str, str, int]]:
    return sorted((d.kind, d.local, d.proto) for d in render(spec).tunnels)


def sysctl_names(spec: RealServerSpec) -> list[str]:
    return [s.name for s in render(spec).sysctls]


def test_dr_needs_only_the_silent_vip() -> None:
    setup = render(RealServerSpec(vips=frozenset({VIP4})))
    assert setup.vips == {VIP4}
    assert setup.tunnels == frozenset()
    assert setup.fou == frozenset()
    assert [str(s) for s in setup.sysctls] == [
        "net.ipv4.conf.all.arp_ignore=1",
        "net.ipv4.conf.all.arp_announce=2",
        "net.ipv4.conf.ipvs-rs0.arp_ignore=1",
        "net.ipv4.conf.ipvs-rs0.arp_announce=2",
    ]


def test_ipv6_only_dr_needs_no_arp_settings() -> None:
    assert sysctl_names(RealServerSpec(vips=frozenset({VIP6}))) == []


@pytest.mark.parametrize(
    ("tunnel", "local", "vips", "expected"),
    [
        (TunnelType.IPIP, RIP4, {VIP4}, [("ipip", "192.0.2.11", 4)]),
        (TunnelType.IPIP, RIP4, {VIP6}, [("sit", "192.0.2.11", 41)]),
        (TunnelType.IPIP, RIP4, {VIP4, VIP6},
         [("ipip", "192.0.2.11", 4), ("sit", "192.0.2.11", 41)]),
        (TunnelType.IPIP, RIP6, {VIP4, VIP6}, [("ip6tnl", "2001:db8:5e::11", 0)]),
        (TunnelType.GRE, RIP4, {VIP4, VIP6}, [("gre", "192.0.2.11", 0)]),
        (TunnelType.GRE, RIP6, {VIP6}, [("ip6gre", "2001:db8:5e::11", 0)]),
    ],
)  # fmt: skip
def test_decapsulation_device_by_tunnel_and_families(
    tunnel: TunnelType,
    local: ipaddress.IPv4Address | ipaddress.IPv6Address,
    vips: set[ipaddress.IPv4Address | ipaddress.IPv6Address],
    expected: list[tuple[str, str, int]],
) -> None:
    spec = RealServerSpec(frozenset(vips), frozenset({Decap(tunnel, local)}))
    assert kinds(spec) == expected


def test_gue_uses_ip_in_ip_devices_and_a_fou_port_per_outer_family() -> None:
    spec = RealServerSpec(
        frozenset({VIP4}),
        frozenset({Decap(TunnelType.GUE, RIP4, 6080), Decap(TunnelType.GUE, RIP6, 6080)}),
    )
    setup = render(spec)
    assert setup.fou == {FouPort(6080, 4), FouPort(6080, 6)}
    assert kinds(spec) == [("ip6tnl", "2001:db8:5e::11", 0), ("ipip", "192.0.2.11", 4)]


def test_ip_in_ip_and_gre_devices_hold_the_ipv4_vips() -> None:
    both = frozenset({VIP4, VIP6})
    spec = RealServerSpec(
        both, frozenset({Decap(TunnelType.IPIP, RIP4), Decap(TunnelType.GRE, RIP4)})
    )
    held = {d.kind: d.addresses for d in render(spec).tunnels}
    assert held == {"ipip": {VIP4}, "sit": frozenset(), "gre": {VIP4}}


def test_tunnels_relax_reverse_path_filtering() -> None:
    spec = RealServerSpec(frozenset({VIP4}), frozenset({Decap(TunnelType.IPIP, RIP4)}))
    (device,) = render(spec).tunnels
    by_name = {s.name: s for s in render(spec).sysctls}
    relaxed = by_name["net.ipv4.conf.all.rp_filter"]
    assert relaxed.value == "2"
    assert relaxed.satisfied_by("0") and relaxed.satisfied_by("2")
    assert not relaxed.satisfied_by("1")
    assert by_name[f"net.ipv4.conf.{device.name}.rp_filter"].value == "0"


def test_an_empty_spec_renders_nothing() -> None:
    setup = render(RealServerSpec())
    assert setup.empty
    assert setup.sysctls == ()


def test_device_names_are_stable_short_and_distinct() -> None:
    names = {
        tunnel_device(kind, local).name
        for kind, local in [
            ("ipip", RIP4),
            ("sit", RIP4),
            ("gre", RIP4),
            ("ip6tnl", RIP6),
            ("ip6gre", RIP6),
            ("ipip", ipaddress.ip_address("192.0.2.12")),
        ]
    }
    assert len(names) == 6
    assert all(len(name) <= 15 and name.startswith("ipvs") for name in names)
    assert tunnel_device("ipip", RIP4).name == tunnel_device("ipip", RIP4).name


def test_decap_validates_the_gue_port() -> None:
    with pytest.raises(ValueError, match="fou port"):
        Decap(TunnelType.GUE, RIP4)
    with pytest.raises(ValueError, match="no port"):
        Decap(TunnelType.IPIP, RIP4, 6080)


def test_parse_fou_show() -> None:
    text = "port 6080 gue\nport 6081 gue -6\nport 5555 ipproto 4 local 192.0.2.11\n\n"
    assert parse_fou_show(text) == {FouPort(6080, 4), FouPort(6081, 6), FouPort(5555, 4)}


def test_the_fou_record_round_trips() -> None:
    ports = {FouPort(6081, 6), FouPort(6080, 4)}
    record = fou_record(ports)
    assert record == "ipvs-operator real-server fou=6080/4,6081/6"
    assert parse_fou_record(record) == ports
    assert parse_fou_record(fou_record([])) == set()
    assert parse_fou_record("someone's alias") == set()
