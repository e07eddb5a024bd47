"""host.rtnl's RTM_GETADDR codec, on bytes laid out as the kernel sends them."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from ipvs_agent.host import rtnl
from ipvs_agent.host._netns import HostError
from ipvs_agent.kernel import netlink as nl


def attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def newaddr(seq: int, family: int, prefixlen: int, index: int, *attrs: bytes) -> bytes:
    body = rtnl.IFADDRMSG.pack(family, prefixlen, 0x80, 0, index) + b"".join(attrs)
    return nl.NLMSG_HDR.pack(16 + len(body), rtnl.RTM_NEWADDR, nl.NLM_F_MULTI, seq, 0) + body


def test_a_request_asks_for_a_dump_of_one_device() -> None:
    raw = rtnl.request(7, index=3)
    length, kind, flags, seq, _ = nl.NLMSG_HDR.unpack_from(raw)
    assert (length, kind, seq) == (len(raw), rtnl.RTM_GETADDR, 7)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_DUMP
    assert rtnl.IFADDRMSG.unpack_from(raw, 16) == (socket.AF_UNSPEC, 0, 0, 0, 3)


def test_decode_prefers_the_local_address_and_the_32_bit_flags() -> None:
    v4 = newaddr(
        1,
        socket.AF_INET,
        32,
        5,
        attr(rtnl.IFA_ADDRESS, bytes([198, 51, 100, 1])),  # a peer address on a p2p link
        attr(rtnl.IFA_LOCAL, bytes([192, 0, 2, 9])),
        attr(rtnl.IFA_FLAGS, struct.pack("=I", 0x240)),
    )
    v6 = newaddr(
        1,
        socket.AF_INET6,
        128,
        6,
        attr(rtnl.IFA_ADDRESS, ipaddress.ip_address("2001:db8::9").packed),
    )
    buf = v4 + v6
    got = [rtnl.decode(buf, header) for header in nl.messages(buf)]
    assert got == [
        rtnl.AddressRecord(5, ipaddress.ip_address("192.0.2.9"), 32, 0x240, 0),
        rtnl.AddressRecord(6, ipaddress.ip_address("2001:db8::9"), 128, 0x80, 0),
    ]


def test_decode_skips_messages_without_an_address_or_of_another_family() -> None:
    bare = newaddr(1, socket.AF_INET, 24, 2)
    other = newaddr(1, socket.AF_PACKET, 0, 2, attr(rtnl.IFA_ADDRESS, b"\1\2\3\4\5\6"))
    for raw in (bare, other):
        (header,) = nl.messages(raw)
        assert rtnl.decode(raw, header) is None


def test_a_malformed_attribute_is_a_codec_error() -> None:
    raw = bytearray(newaddr(1, socket.AF_INET, 32, 2, attr(rtnl.IFA_LOCAL, bytes(4))))
    struct.pack_into("=H", raw, 24, 200)  # the attribute claims more than the message has
    (header,) = nl.messages(raw)
    with pytest.raises(nl.CodecError):
        rtnl.decode(raw, header)


class _Silent:
    """A socket that takes the request and never answers."""

    def __init__(self) -> None:
        self.closed = False

    def send(self, data: bytes) -> int:
        return len(data)

    def recv_into(self, buf: bytearray, size: int, flags: int) -> int:
        raise TimeoutError

    def close(self) -> None:
        self.closed = True


def test_a_dump_that_fails_half_way_leaves_a_fresh_socket_for_the_next() -> None:
    reader = rtnl.AddressReader()
    silent = _Silent()
    reader._sock = silent  # type: ignore[assignment]
    with pytest.raises(HostError, match="in time"):
        reader.dump()
    assert silent.closed and reader._sock is None


def test_an_address_change_logs_counts_and_names_only_a_few() -> None:
    """A node taking 2000 VIPs at once writes one short line, not 2000 addresses."""
    import ipaddress

    from ipvs_agent.host.addresses import AddressChanges

    added = frozenset(ipaddress.ip_address(f"198.18.{i // 250}.{i % 250 + 1}") for i in range(2000))
    removed = frozenset({ipaddress.ip_address("2001:db8::1")})
    line = str(AddressChanges(added, removed))
    assert line.startswith("added 2000 (198.18.0.1, 198.18.0.2, 198.18.0.3, 198.18.0.4, ")
    assert line.endswith(" and 1995 more); removed 1 (2001:db8::1)")
    assert len(line) < 200
    assert str(AddressChanges(frozenset(), frozenset())) == "unchanged"
