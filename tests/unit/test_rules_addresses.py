"""``rules.is_global_unicast`` computes IPv4 on integers; it must say what the ipaddress
properties (and Go's ``netip.Addr.IsGlobalUnicast``, which CEL uses) say."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from ipvs_api.rules import is_global_unicast

EDGES = [
    0, 1, 0xFFFFFFFF, 0xFFFFFFFE,  # unspecified, broadcast and their neighbours
    0x7EFFFFFF, 0x7F000000, 0x7FFFFFFF, 0x80000000,  # around 127.0.0.0/8
    0xDFFFFFFF, 0xE0000000, 0xEFFFFFFF, 0xF0000000,  # around 224.0.0.0/4
    0xA9FDFFFF, 0xA9FE0000, 0xA9FEFFFF, 0xA9FF0000,  # around 169.254.0.0/16
]  # fmt: skip


def by_properties(addr: ipaddress.IPv4Address) -> bool:
    return addr != ipaddress.IPv4Address("255.255.255.255") and not (
        addr.is_unspecified or addr.is_loopback or addr.is_multicast or addr.is_link_local
    )


@given(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from(EDGES)))
def test_ipv4_on_integers_agrees_with_the_address_properties(n: int) -> None:
    addr = ipaddress.IPv4Address(n)
    assert is_global_unicast(addr) is by_properties(addr)


def test_the_edges_themselves() -> None:
    refused = {"0.0.0.0", "255.255.255.255", "127.0.0.1", "224.0.0.1", "239.255.255.255"}
    refused |= {"169.254.169.254"}
    for text in refused:
        assert not is_global_unicast(ipaddress.IPv4Address(text)), text
    for text in ("192.0.2.1", "198.51.100.255", "126.255.255.255", "240.0.0.1", "10.0.0.1"):
        assert is_global_unicast(ipaddress.IPv4Address(text)), text
    assert not is_global_unicast(ipaddress.IPv6Address("fe80::1"))
    assert is_global_unicast(ipaddress.IPv6Address("2001:db8::1"))
