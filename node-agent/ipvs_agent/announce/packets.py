"""ARP and IPv6 neighbour-discovery frames, built and read by hand: pure, golden-tested.

Written here rather than taken from a library: Python has no standard ARP/NDP package, and the
general packet libraries (scapy) cost seconds of import and milliseconds per packet for four
fixed layouts of a few dozen bytes each (RFC 826 ARP, RFC 4861 neighbour solicitation and
advertisement, RFC 5227 gratuitous ARP). Ethernet only; IPv6 without extension headers, which
neighbour discovery never carries.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

ETH_P_ARP: Final = 0x0806
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
BROADCAST: Final = b"\xff" * 6
ZERO_MAC: Final = b"\x00" * 6
ALL_NODES: Final = ipaddress.IPv6Address("ff02::1")
ICMPV6: Final = 58
NS, NA = 135, 136
ARP_REQUEST, ARP_REPLY = 1, 2
#: Neighbour advertisement flags (RFC 4861 4.4).
ROUTER, SOLICITED, OVERRIDE = 0x80000000, 0x40000000, 0x20000000

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def multicast_mac(address: ipaddress.IPv6Address) -> bytes:
    """The Ethernet address of an IPv6 multicast group (33:33 + its last 32 bits)."""
    return b"\x33\x33" + address.packed[-4:]


def solicited_node(address: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    """The solicited-node multicast group of ``address`` (ff02::1:ffXX:XXXX)."""
    return ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + address.packed[-3:])


# ---------------------------------------------------------------- ARP


@dataclass(frozen=True)
class Arp:
    """An ARP packet for IPv4 over Ethernet, as read from a frame."""

    op: int
    sender_mac: bytes
    sender_ip: ipaddress.IPv4Address
    target_mac: bytes
    target_ip: ipaddress.IPv4Address
    source_mac: bytes  # the Ethernet source


def arp_frame(
    op: int,
    sender_mac: bytes,
    sender_ip: ipaddress.IPv4Address,
    target_mac: bytes,
    target_ip: ipaddress.IPv4Address,
    destination: bytes,
) -> bytes:
    return _ETH.pack(destination, sender_mac, ETH_P_ARP) + _ARP.pack(
        1, ETH_P_IP, 6, 4, op, sender_mac, sender_ip.packed, target_mac, target_ip.packed
    )


def parse_arp(frame: bytes) -> Arp | None:
    """The ARP packet in an Ethernet frame, or None for anything else."""
    if len(frame) < _ETH.size + _ARP.size:
        return None
    _, source, kind = _ETH.unpack_from(frame)
    if kind != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(frame, _ETH.size)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        return None
    return Arp(op, sha, ipaddress.IPv4Address(spa), tha, ipaddress.IPv4Address(tpa), source)


def arp_reply(request: Arp, mac: bytes) -> bytes:
    """Our answer to ``request``: its target address is at ``mac``."""
    return arp_frame(
        ARP_REPLY, mac, request.target_ip, request.sender_mac, request.sender_ip, request.sender_mac
    )


def gratuitous_arp(vip: ipaddress.IPv4Address, mac: bytes) -> list[bytes]:
    """A gratuitous ARP both as a request and as a reply (RFC 5227 3): devices that update
    their caches from only one of the two forms all learn the new owner."""
    return [
        arp_frame(ARP_REQUEST, mac, vip, ZERO_MAC, vip, BROADCAST),
        arp_frame(ARP_REPLY, mac, vip, BROADCAST, vip, BROADCAST),
    ]


# ---------------------------------------------------------------- neighbour discovery


@dataclass(frozen=True)
class Solicitation:
    """A neighbour solicitation, as read from a frame."""

    source: ipaddress.IPv6Address  # :: for duplicate address detection
    destination: ipaddress.IPv6Address  # the solicited-node group, or the target (NUD)
    target: ipaddress.IPv6Address
    source_mac: bytes  # the Ethernet source
    link_layer: bytes | None  # the source link-layer address option


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _icmpv6(
    source: ipaddress.IPv6Address, destination: ipaddress.IPv6Address, body: bytes
) -> bytes:
    pseudo = source.packed + destination.packed + struct.pack("!I3xB", len(body), ICMPV6)
    checksum = _checksum(pseudo + body)
    return body[:2] + struct.pack("!H", checksum) + body[4:]


def parse_solicitation(frame: bytes) -> Solicitation | None:
    """The neighbour solicitation in an Ethernet frame, or None for anything else."""
    if len(frame) < _ETH.size + _IPV6.size + 24:
        return None
    _, source_mac, kind = _ETH.unpack_from(frame)
    if kind != ETH_P_IPV6:
        return None
    _, length, next_header, hop_limit, src, dst = _IPV6.unpack_from(frame, _ETH.size)
    start = _ETH.size + _IPV6.size
    icmp = frame[start : start + length]
    if next_header != ICMPV6 or hop_limit != 255 or len(icmp) < 24 or icmp[0] != NS:
        return None
    target = ipaddress.IPv6Address(icmp[8:24])
    link_layer = None
    at = 24
    while at + 8 <= len(icmp):  # options: type, length in units of 8 bytes, value
        kind_, units = icmp[at], icmp[at + 1]
        if units == 0:
            break
        if kind_ == 1 and units == 1:
            link_layer = icmp[at + 2 : at + 8]
        at += units * 8
    return Solicitation(
        ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst), target, source_mac, link_layer
    )


def advertisement(
    target: ipaddress.IPv6Address,
    mac: bytes,
    source: ipaddress.IPv6Address,
    destination: ipaddress.IPv6Address,
    destination_mac: bytes,
    solicited: bool,
) -> bytes:
    """A neighbour advertisement: ``target`` is at ``mac`` (override set)."""
    flags = OVERRIDE | (SOLICITED if solicited else 0)
    body = struct.pack("!BBHI", NA, 0, 0, flags) + target.packed + b"\x02\x01" + mac
    icmp = _icmpv6(source, destination, body)
    header = _IPV6.pack(6 << 28, len(icmp), ICMPV6, 255, source.packed, destination.packed)
    return _ETH.pack(destination_mac, mac, ETH_P_IPV6) + header + icmp


def answer(solicitation: Solicitation, mac: bytes, source: ipaddress.IPv6Address) -> bytes:
    """Our advertisement for ``solicitation``: unicast and solicited to its sender, or to all
    nodes, unsolicited, for duplicate address detection (a sender without an address)."""
    if solicitation.source.is_unspecified:
        return advertisement(
            solicitation.target, mac, source, ALL_NODES, multicast_mac(ALL_NODES), False
        )
    to_mac = solicitation.link_layer or solicitation.source_mac
    return advertisement(solicitation.target, mac, source, solicitation.source, to_mac, True)


def unsolicited_advertisement(
    vip: ipaddress.IPv6Address, mac: bytes, source: ipaddress.IPv6Address
) -> bytes:
    """The IPv6 counterpart of a gratuitous ARP: to all nodes, override set."""
    return advertisement(vip, mac, source, ALL_NODES, multicast_mac(ALL_NODES), False)


def solicitation(target: ipaddress.IPv6Address, mac: bytes, source: ipaddress.IPv6Address) -> bytes:
    """A neighbour solicitation for ``target`` to its solicited-node group (for tests and
    clients that probe who answers)."""
    group = solicited_node(target)
    body = struct.pack("!BBHI", NS, 0, 0, 0) + target.packed + b"\x01\x01" + mac
    icmp = _icmpv6(source, group, body)
    header = _IPV6.pack(6 << 28, len(icmp), ICMPV6, 255, source.packed, group.packed)
    return _ETH.pack(multicast_mac(group), mac, ETH_P_IPV6) + header + icmp


def parse_advertisement(frame: bytes) -> tuple[ipaddress.IPv6Address, bytes, int] | None:
    """(target, target link-layer address or Ethernet source, flags) of an advertisement."""
    if len(frame) < _ETH.size + _IPV6.size + 24:
        return None
    _, source_mac, kind = _ETH.unpack_from(frame)
    if kind != ETH_P_IPV6:
        return None
    _, length, next_header, _, _, _ = _IPV6.unpack_from(frame, _ETH.size)
    icmp = frame[_ETH.size + _IPV6.size : _ETH.size + _IPV6.size + length]
    if next_header != ICMPV6 or len(icmp) < 24 or icmp[0] != NA:
        return None
    flags = struct.unpack_from("!I", icmp, 4)[0]
    mac = icmp[26:32] if len(icmp) >= 32 and icmp[24:26] == b"\x02\x01" else source_mac
    return ipaddress.IPv6Address(icmp[8:24]), mac, flags


# ---------------------------------------------------------------- kernel filters


def bpf_neighbour_discovery() -> bytes:
    """A classic BPF program passing only IPv6 neighbour solicitations and advertisements
    without extension headers (ethertype 0x86dd, next header 58, ICMPv6 type 135 or 136), so a
    busy interface's other IPv6 traffic never reaches user space. Solicitations are answered;
    advertisements show another host claiming a VIP."""
    program = [
        (0x28, 0, 0, 12),  # ldh [12]        ethertype
        (0x15, 0, 6, ETH_P_IPV6),  # jeq #0x86dd   else drop
        (0x30, 0, 0, 20),  # ldb [20]        next header
        (0x15, 0, 4, ICMPV6),  # jeq #58
        (0x30, 0, 0, 54),  # ldb [54]        ICMPv6 type
        (0x15, 1, 0, NS),  # jeq #135        accept
        (0x15, 0, 1, NA),  # jeq #136        else drop
        (0x06, 0, 0, 0x40000),  # ret #262144  accept
        (0x06, 0, 0, 0),  # ret #0      drop
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in program)
