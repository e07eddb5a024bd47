"""``rules`` reads IPv4 in C (``parse_ip``) and judges it on integers (``is_global_unicast``);
both must say exactly what ``ipaddress`` says, which the contract tests hold to the API
server's CEL."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from ipvs_api.rules import is_global_unicast, parse_ip

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


def by_ipaddress(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``parse_ip`` as it was, on ``ipaddress`` alone."""
    if "%" in text:
        return None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return None
    return addr


OCTETS = st.one_of(
    st.integers(0, 255).map(str),
    st.sampled_from(["00", "01", "010", "0x1", "256", "999", "1234", "", " 1", "1 ", "+1", "٣"]),
)
DOTTED = st.lists(OCTETS, min_size=1, max_size=6).map(".".join)


@given(st.one_of(DOTTED, st.text(alphabet="0123456789.x: %", max_size=20)))
def test_parse_ip_reads_what_ipaddress_reads(text: str) -> None:
    assert parse_ip(text) == by_ipaddress(text)


def test_parse_ip_on_the_spellings_inet_pton_and_ipaddress_may_differ_on() -> None:
    for text in (
        "1.2.3.4",
        "0.0.0.0",
        "255.255.255.255",
        "01.2.3.4",
        "1.2.3",
        "1.2.3.4.",
        "1.2.3.04",
        "0x7f.0.0.1",
        "127.1",
        "::ffff:1.2.3.4",
        "2001:db8::1",
    ):
        assert parse_ip(text) == by_ipaddress(text), text
