"""The IPVS netlink codec without a kernel: requests, replies, and the batching around them.

GOLDEN holds messages captured from Debian's 6.1 kernel (tests/kernel runs the same against the
live kernel): the table was programmed with ``ipvsadm -R`` (not by this codec) from

    -A -t 203.0.113.10:80 -s sh -b sh-fallback,sh-port -p 600 -M 255.255.255.0
    -a -t 203.0.113.10:80 -r 198.51.100.11:8080 -m -w 3 -x 100 -y 50
    -a -t 203.0.113.10:80 -r 198.51.100.12:80 -i --tun-type gue --tun-port 6080 --tun-remcsum -w 2
    -a -t 203.0.113.10:80 -r [2001:db8:5e::13]:80 -i --tun-type gre --tun-csum -w 0
    -A -u [2001:db8:f::10]:5060 -s mh -b mh-port -p 120 -M 64 -o --pe sip
    -a -u [2001:db8:f::10]:5060 -r [2001:db8:5e::11]:5060 -g -w 5
    -A -f 7 -6 -s lc -p 60
    -A --sctp-service 203.0.113.10:3868 -s rr
    -A -u 198.51.100.200:53 -s rr
    -a -u 198.51.100.200:53 -r 198.51.100.11:53 -m -w 1

then three 100-byte UDP datagrams went to 198.51.100.200:53 (`ipvsadm -Ln --stats`: 1 conn,
3 packets, 384 bytes in), and the replies of GET_SERVICE / GET_DEST dumps, GET_INFO, GET_CONFIG
and two failed ops (DEL_SERVICE of a missing service, NEW_DEST of an existing dest) were kept.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs_agent.kernel import KernelError, OpResult, describe_error
from ipvs_agent.kernel import ipvs as ipvs_module
from ipvs_agent.kernel import netlink as nl
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.kernel.ipvs import IPVSKernel, probe_modules
from ipvs_agent.model import (
    MANAGED_FLAGS,
    AddressFamily,
    DesiredService,
    Dest,
    DestKey,
    DestStats,
    ForwardingMethod,
    ObservedDest,
    Protocol,
    Service,
    ServiceFlag,
    ServiceKey,
    ServiceStats,
    SyncDaemon,
    SyncState,
    Timeouts,
    TunnelFlags,
    TunnelType,
)
from ipvs_agent.ops import Op, OpKind

V4, V6 = AddressFamily.INET, AddressFamily.INET6
FAMILY = 0x20  # the id the kernel gave the IPVS family when GOLDEN was captured

GOLDEN_HEX: dict[str, str] = {
    "service SCTP 203.0.113.10:3868": (
        "40010000200002000100000081000005010100002c0101000600010002000000060002008400000014000300"
        "cb00710a000000000000000000000000060004000f1c000007000600727200000c00070002000000ffffffff"
        "080008000000000008000900ffffffff5c000a00080001000000000008000200000000000800030000000000"
        "0c00040000000000000000000c00050000000000000000000800060000000000080007000000000008000800"
        "00000000080009000000000008000a00000000007c000c000c00010000000000000000000c00020000000000"
        "000000000c00030000000000000000000c00040000000000000000000c00050000000000000000000c000600"
        "00000000000000000c00070000000000000000000c00080000000000000000000c0009000000000000000000"
        "0c000a000000000000000000"
    ),
    "service UDP 198.51.100.200:53": (
        "40010000200002000100000081000005010100002c0101000600010002000000060002001100000014000300"
        "c63364c8000000000000000000000000060004000035000007000600727200000c00070002000000ffffffff"
        "080008000000000008000900ffffffff5c000a00080001000100000008000200030000000800030000000000"
        "0c00040080010000000000000c00050000000000000000000800060000000000080007000000000008000800"
        "00000000080009001400000008000a00000000007c000c000c00010001000000000000000c00020003000000"
        "000000000c00030000000000000000000c00040080010000000000000c00050000000000000000000c000600"
        "00000000000000000c00070000000000000000000c00080000000000000000000c0009001400000000000000"
        "0c000a000000000000000000"
    ),
    "service UDP [2001:db8:f::10]:5060": (
        "480100002000020001000000810000050101000034010100060001000a000000060002001100000014000300"
        "20010db8000f000000000000000000100600040013c40000070006006d68000008000b00736970000c000700"
        "17000000ffffffff080008007800000008000900400000005c000a0008000100000000000800020000000000"
        "08000300000000000c00040000000000000000000c0005000000000000000000080006000000000008000700"
        "000000000800080000000000080009000000000008000a00000000007c000c000c0001000000000000000000"
        "0c00020000000000000000000c00030000000000000000000c00040000000000000000000c00050000000000"
        "000000000c00060000000000000000000c00070000000000000000000c00080000000000000000000c000900"
        "00000000000000000c000a000000000000000000"
    ),
    "service TCP 203.0.113.10:80": (
        "40010000200002000100000081000005010100002c0101000600010002000000060002000600000014000300"
        "cb00710a000000000000000000000000060004000050000007000600736800000c0007001b000000ffffffff"
        "080008005802000008000900ffffff005c000a00080001000000000008000200000000000800030000000000"
        "0c00040000000000000000000c00050000000000000000000800060000000000080007000000000008000800"
        "00000000080009000000000008000a00000000007c000c000c00010000000000000000000c00020000000000"
        "000000000c00030000000000000000000c00040000000000000000000c00050000000000000000000c000600"
        "00000000000000000c00070000000000000000000c00080000000000000000000c0009000000000000000000"
        "0c000a000000000000000000"
    ),
    "service FWM 7 IPv6": (
        "240100002000020001000000810000050101000010010100060001000a000000080005000700000007000600"
        "6c6300000c00070003000000ffffffff080008003c00000008000900800000005c000a000800010000000000"
        "080002000000000008000300000000000c00040000000000000000000c000500000000000000000008000600"
        "0000000008000700000000000800080000000000080009000000000008000a00000000007c000c000c000100"
        "00000000000000000c00020000000000000000000c00030000000000000000000c0004000000000000000000"
        "0c00050000000000000000000c00060000000000000000000c00070000000000000000000c00080000000000"
        "000000000c00090000000000000000000c000a000000000000000000"
    ),
    "dest 198.51.100.11:53": (
        "64010000200002000300000081000005050100005001020014000100c633640b000000000000000000000000"
        "06000200003500000800030000000000080004000100000005000d000000000006000e000000000006000f00"
        "0000000008000500000000000800060000000000080007000000000008000800010000000800090000000000"
        "06000b00020000005c000a000800010001000000080002000300000008000300000000000c00040080010000"
        "000000000c000500000000000000000008000600000000000800070000000000080008000000000008000900"
        "1400000008000a00000000007c000c000c00010001000000000000000c00020003000000000000000c000300"
        "00000000000000000c00040080010000000000000c00050000000000000000000c0006000000000000000000"
        "0c00070000000000000000000c00080000000000000000000c00090014000000000000000c000a0000000000"
        "00000000"
    ),
    "dest [2001:db8:5e::11]:5060": (
        "6401000020000200040000008100000505010000500102001400010020010db8005e00000000000000000011"
        "0600020013c400000800030003000000080004000500000005000d000000000006000e000000000006000f00"
        "0000000008000500000000000800060000000000080007000000000008000800000000000800090000000000"
        "06000b000a0000005c000a000800010000000000080002000000000008000300000000000c00040000000000"
        "000000000c000500000000000000000008000600000000000800070000000000080008000000000008000900"
        "0000000008000a00000000007c000c000c00010000000000000000000c00020000000000000000000c000300"
        "00000000000000000c00040000000000000000000c00050000000000000000000c0006000000000000000000"
        "0c00070000000000000000000c00080000000000000000000c00090000000000000000000c000a0000000000"
        "00000000"
    ),
    "dest [2001:db8:5e::13]:80": (
        "6401000020000200050000008100000505010000500102001400010020010db8005e00000000000000000013"
        "06000200005000000800030002000000080004000000000005000d000200000006000e000000000006000f00"
        "0100000008000500000000000800060000000000080007000000000008000800000000000800090000000000"
        "06000b000a0000005c000a000800010000000000080002000000000008000300000000000c00040000000000"
        "000000000c000500000000000000000008000600000000000800070000000000080008000000000008000900"
        "0000000008000a00000000007c000c000c00010000000000000000000c00020000000000000000000c000300"
        "00000000000000000c00040000000000000000000c00050000000000000000000c0006000000000000000000"
        "0c00070000000000000000000c00080000000000000000000c00090000000000000000000c000a0000000000"
        "00000000"
    ),
    "dest 198.51.100.12:80": (
        "64010000200002000500000081000005050100005001020014000100c633640c000000000000000000000000"
        "06000200005000000800030002000000080004000200000005000d000100000006000e0017c0000006000f00"
        "0200000008000500000000000800060000000000080007000000000008000800000000000800090000000000"
        "06000b00020000005c000a000800010000000000080002000000000008000300000000000c00040000000000"
        "000000000c000500000000000000000008000600000000000800070000000000080008000000000008000900"
        "0000000008000a00000000007c000c000c00010000000000000000000c00020000000000000000000c000300"
        "00000000000000000c00040000000000000000000c00050000000000000000000c0006000000000000000000"
        "0c00070000000000000000000c00080000000000000000000c00090000000000000000000c000a0000000000"
        "00000000"
    ),
    "dest 198.51.100.11:8080": (
        "64010000200002000500000081000005050100005001020014000100c633640b000000000000000000000000"
        "060002001f9000000800030000000000080004000300000005000d000000000006000e000000000006000f00"
        "0000000008000500640000000800060032000000080007000000000008000800000000000800090000000000"
        "06000b00020000005c000a000800010000000000080002000000000008000300000000000c00040000000000"
        "000000000c000500000000000000000008000600000000000800070000000000080008000000000008000900"
        "0000000008000a00000000007c000c000c00010000000000000000000c00020000000000000000000c000300"
        "00000000000000000c00040000000000000000000c00050000000000000000000c0006000000000000000000"
        "0c00070000000000000000000c00080000000000000000000c00090000000000000000000c000a0000000000"
        "00000000"
    ),
    "info": ("240000002000000007000000810000050e01000008000100010201000800020000100000"),
    "config": (
        "2c0000002000000008000000810000050c01000008000400840300000800050078000000080006002c010000"
    ),
    "error 3": ("24000000020000010900000081000005fdffffff44000000200001000900000000000000"),
    "error 17": ("24000000020000010a00000081000005efffffffa4000000200005000a00000000000000"),
}
GOLDEN = {name: bytes.fromhex(text) for name, text in GOLDEN_HEX.items()}


# --- what ipvsadm programmed, as model values ---------------------------------------------


def key(af: AddressFamily, proto: Protocol, address: str, port: int) -> ServiceKey:
    return ServiceKey(af, int(proto), address, port)


TCP80 = key(V4, Protocol.TCP, "203.0.113.10", 80)
SIP = key(V6, Protocol.UDP, "2001:db8:f::10", 5060)
FWM7 = ServiceKey.for_fwmark(V6, 7)
SCTP = key(V4, Protocol.SCTP, "203.0.113.10", 3868)
DNS = key(V4, Protocol.UDP, "198.51.100.200", 53)
PERSISTENT, ONEPACKET = ServiceFlag.PERSISTENT, ServiceFlag.ONEPACKET
SCHED1, SCHED2 = ServiceFlag.SCHED1, ServiceFlag.SCHED2

SERVICES: dict[str, tuple[Service, ServiceStats]] = {
    "service TCP 203.0.113.10:80": (
        Service(TCP80, "sh", PERSISTENT | SCHED1 | SCHED2, 600, 0xFFFFFF00),
        ServiceStats(),
    ),
    "service UDP [2001:db8:f::10]:5060": (
        Service(SIP, "mh", PERSISTENT | ONEPACKET | SCHED2, 120, 64, "sip"),
        ServiceStats(),
    ),
    "service FWM 7 IPv6": (Service(FWM7, "lc", PERSISTENT, 60, 128), ServiceStats()),
    "service SCTP 203.0.113.10:3868": (Service(SCTP, "rr"), ServiceStats()),
    "service UDP 198.51.100.200:53": (
        Service(DNS, "rr"),
        ServiceStats(connections=1, packets_in=3, bytes_in=384),
    ),
}
#: golden dest name -> (its service, what it decodes to)
DESTS: dict[str, tuple[ServiceKey, ObservedDest]] = {
    "dest 198.51.100.11:8080": (
        TCP80,
        ObservedDest(Dest(DestKey("198.51.100.11", 8080), ForwardingMethod.MASQ, 3, 100, 50)),
    ),
    "dest 198.51.100.12:80": (
        TCP80,
        ObservedDest(
            Dest(
                DestKey("198.51.100.12", 80),
                ForwardingMethod.TUNNEL,
                2,
                tunnel_type=TunnelType.GUE,
                tunnel_port=6080,
                tunnel_flags=TunnelFlags.REMCSUM,
            )
        ),
    ),
    "dest [2001:db8:5e::13]:80": (
        TCP80,
        ObservedDest(
            Dest(
                DestKey("2001:db8:5e::13", 80),
                ForwardingMethod.TUNNEL,
                0,
                tunnel_type=TunnelType.GRE,
                tunnel_flags=TunnelFlags.CSUM,
                af=V6,
            )
        ),
    ),
    "dest [2001:db8:5e::11]:5060": (
        SIP,
        ObservedDest(Dest(DestKey("2001:db8:5e::11", 5060), ForwardingMethod.ROUTE, 5)),
    ),
    "dest 198.51.100.11:53": (
        DNS,
        ObservedDest(
            Dest(DestKey("198.51.100.11", 53), ForwardingMethod.MASQ, 1),
            DestStats(inactive_connections=1, connections=1, packets_in=3, bytes_in=384),
        ),
    ),
}


def header_of(data: bytes) -> nl.Header:
    return next(nl.messages(data))


# --- kernel replies ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_services_decode_to_what_ipvsadm_programmed(name: str) -> None:
    data = GOLDEN[name]
    assert nl.decode_service_message(data, header_of(data)) == SERVICES[name]
    decoder = nl.DumpDecoder()
    for _ in range(2):  # the second time through the learned layout, where there is one
        assert decoder.service(data, header_of(data)) == SERVICES[name]
    plain = SERVICES[name][0].key.fwmark == 0 and not SERVICES[name][0].pe_name
    assert decoder.services.hits == (2 if plain else 0)


@pytest.mark.parametrize("name", DESTS)
def test_dests_decode_to_what_ipvsadm_programmed(name: str) -> None:
    service, expected = DESTS[name]
    data = GOLDEN[name]
    assert nl.decode_dest_message(data, header_of(data), service.af) == expected
    decoder = nl.DumpDecoder()
    assert decoder.dest(data, header_of(data), service.af) == expected
    assert decoder.dest(data, header_of(data), service.af) == expected
    assert decoder.dests.hits == 2


def _dest_attrs(data: bytes) -> list[bytes]:
    """The raw attributes (header + padded payload) nested in a dest message."""
    header = header_of(data)
    start, end = nl.nested_payload(data, header, nl.CmdAttr.DEST) or (0, 0)
    found, off = [], start
    while off < end:
        length = struct.unpack_from("=H", data, off)[0]
        found.append(data[off : off + ((length + 3) & ~3)])
        off += (length + 3) & ~3
    return found


def _dest_message(parts: list[bytes]) -> bytes:
    payload = b"".join(parts)
    body = struct.pack("=BBH", nl.Cmd.NEW_DEST, 1, 0) + nl.attr(nl.CmdAttr.DEST, payload)
    return struct.pack("=IHHII", 16 + len(body), FAMILY, nl.NLM_F_MULTI, 1, 0) + body


def test_a_learned_layout_is_not_applied_to_a_message_shaped_differently() -> None:
    """Same length, WEIGHT and U_THRESH swapped: the header check must send it the slow way."""
    parts = _dest_attrs(GOLDEN["dest 198.51.100.11:8080"])
    kinds = [struct.unpack_from("=H", p, 2)[0] for p in parts]
    weight, upper = kinds.index(nl.DestAttr.WEIGHT), kinds.index(nl.DestAttr.U_THRESH)
    parts[weight], parts[upper] = parts[upper], parts[weight]
    swapped = _dest_message(parts)
    assert len(swapped) == len(GOLDEN["dest 198.51.100.11:8080"])
    decoder = nl.DumpDecoder()
    original = GOLDEN["dest 198.51.100.11:8080"]
    decoder.dest(original, header_of(original), V4)
    got = decoder.dest(swapped, header_of(swapped), V4)
    assert got.dest.weight == 3 and got.dest.upper_threshold == 100
    assert decoder.dests.hits == 1  # the original only


def test_a_kernel_without_tunnel_attributes_decodes_with_tunnel_defaults() -> None:
    """Kernels before 5.2 send no TUN_* attributes: no fast path, same values."""
    tunnel_kinds = {nl.DestAttr.TUN_TYPE, nl.DestAttr.TUN_PORT, nl.DestAttr.TUN_FLAGS}
    parts = [
        p
        for p in _dest_attrs(GOLDEN["dest 198.51.100.11:8080"])
        if struct.unpack_from("=H", p, 2)[0] not in tunnel_kinds
    ]
    old = _dest_message(parts)
    decoder = nl.DumpDecoder()
    assert decoder.dest(old, header_of(old), V4) == DESTS["dest 198.51.100.11:8080"][1]
    assert decoder.dests.hits == 0


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        (nl.DestAttr.TUN_FLAGS, 3, TunnelFlags.REMCSUM),  # the kernel takes any bits
        (nl.DestAttr.TUN_TYPE, 9, TunnelType.IPIP),  # ip_vs_xmit's fallback
        (nl.DestAttr.FWD_METHOD, 5, ForwardingMethod.LOCALNODE),  # never planned: rewritten
    ],
)
def test_values_outside_the_model_do_not_break_a_dump(
    kind: int, value: int, expected: object
) -> None:
    parts = _dest_attrs(GOLDEN["dest 198.51.100.11:8080"])
    for index, part in enumerate(parts):
        if struct.unpack_from("=H", part, 2)[0] == kind:
            size = struct.unpack_from("=H", part)[0] - 4
            raw = value.to_bytes(size, "little")
            parts[index] = part[:4] + raw + part[4 + size :]
    data = _dest_message(parts)
    dest = nl.decode_dest_message(data, header_of(data), V4).dest
    assert expected in (dest.tunnel_flags, dest.tunnel_type, dest.forwarding)


def test_info_config_and_error_replies() -> None:
    info = GOLDEN["info"]
    assert nl.decode_info(info, header_of(info)) == ("1.2.1", 4096)
    config = GOLDEN["config"]
    assert nl.decode_timeouts(config, header_of(config)) == Timeouts(900, 120, 300)
    for name, code in (("error 3", errno.ESRCH), ("error 17", errno.EEXIST)):
        data = GOLDEN[name]
        assert nl.decode_error(data, header_of(data)) == (code, "")


def _ack(seq: int, code: int, echo: bytes = b"", text: str = "") -> bytes:
    """An NLMSG_ERROR as netlink_ack() writes it."""
    flags = 0 if echo else nl.NLM_F_CAPPED
    original = echo or struct.pack("=IHHII", 20, FAMILY, nl.NLM_F_REQUEST, seq, 0)
    tlvs = b""
    if text:
        flags |= nl.NLM_F_ACK_TLVS
        tlvs = nl.attr(nl.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
    body = struct.pack("=i", -code) + original + b"\0" * (-len(original) % 4) + tlvs
    return struct.pack("=IHHII", 16 + len(body), nl.NLMSG_ERROR, flags, seq, 0) + body


def test_error_acks_carry_the_kernels_message_whether_or_not_the_request_is_echoed() -> None:
    request = nl.encode_op(Op(OpKind.DEL_SERVICE, Service(TCP80)), FAMILY, 9)
    for echo in (b"", request):
        data = _ack(9, errno.EINVAL, echo, "Attribute failed policy validation")
        assert nl.decode_error(data, header_of(data)) == (
            errno.EINVAL,
            "Attribute failed policy validation",
        )
    assert nl.decode_error(_ack(9, 0), header_of(_ack(9, 0))) == (0, "")


# --- requests -----------------------------------------------------------------------------------


def _top_attrs(payload: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    off = 0
    while off < len(payload):
        length, kind = struct.unpack_from("=HH", payload, off)
        found[kind & nl.NLA_TYPE_MASK] = payload[off + 4 : off + length]
        off += (length + 3) & ~3
    return found


def test_service_attributes_are_laid_out_as_the_kernel_itself_writes_them() -> None:
    """Our key attributes equal the kernel's own in the dump of the same service."""
    for name, (service, _) in SERVICES.items():
        kernel = _top_attrs(
            GOLDEN[name][nl.HEADERS_LEN + 4 :]  # skip headers and the SERVICE nest header
        )
        ours = _top_attrs(nl.encode_service(service))
        for kind in (nl.SvcAttr.AF, nl.SvcAttr.PROTOCOL, nl.SvcAttr.ADDR, nl.SvcAttr.PORT,
                     nl.SvcAttr.FWMARK, nl.SvcAttr.SCHED_NAME, nl.SvcAttr.TIMEOUT,
                     nl.SvcAttr.NETMASK, nl.SvcAttr.PE_NAME):  # fmt: skip
            assert ours.get(kind) == kernel.get(kind), (name, nl.SvcAttr(kind).name)
        value, mask = struct.unpack("=II", ours[nl.SvcAttr.FLAGS])
        assert (value, mask) == (service.flags, MANAGED_FLAGS)


def test_dest_attributes_are_laid_out_as_the_kernel_itself_writes_them() -> None:
    for name, (service, observed) in DESTS.items():
        kernel = _top_attrs(b"".join(_dest_attrs(GOLDEN[name])))
        dest = replace(observed.dest, af=None) if observed.dest.af == service.af else observed.dest
        ours = _top_attrs(nl.encode_dest(dest, full=True))
        assert set(ours) <= set(kernel)
        for kind, raw in ours.items():
            assert raw == kernel[kind], (name, nl.DestAttr(kind).name)


def test_pyroute2_reads_our_requests_except_the_tunnel_port_it_gets_wrong() -> None:
    """pyroute2's own parser as a second witness; it declares TUN_PORT host-order."""
    from pyroute2.netlink.generic.ipvs import ipvsmsg

    dest = DESTS["dest 198.51.100.12:80"][1].dest
    message = ipvsmsg(
        nl.encode_op(
            Op(OpKind.ADD_DEST, SERVICES["service TCP 203.0.113.10:80"][0], dest), FAMILY, 7
        )
    )
    message.decode()
    svc = message.get_attr("IPVS_CMD_ATTR_SERVICE")
    got = message.get_attr("IPVS_CMD_ATTR_DEST")
    assert (svc.get_attr("IPVS_SVC_ATTR_ADDR"), svc.get_attr("IPVS_SVC_ATTR_PORT")) == (
        "203.0.113.10",
        80,
    )
    assert got.get_attr("IPVS_DEST_ATTR_ADDR") == "198.51.100.12"
    assert got.get_attr("IPVS_DEST_ATTR_PORT") == 80
    assert got.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == ForwardingMethod.TUNNEL
    assert got.get_attr("IPVS_DEST_ATTR_TUN_TYPE") == TunnelType.GUE
    assert got.get_attr("IPVS_DEST_ATTR_TUN_FLAGS") == TunnelFlags.REMCSUM
    assert (
        got.get_attr("IPVS_DEST_ATTR_TUN_PORT") == struct.unpack("=H", struct.pack(">H", 6080))[0]
    )


def test_a_fwmark_service_is_named_by_family_and_mark_only() -> None:
    attrs = _top_attrs(nl.encode_service_key(FWM7))
    assert set(attrs) == {nl.SvcAttr.AF, nl.SvcAttr.FWMARK}
    assert struct.unpack("=HI", attrs[nl.SvcAttr.AF][:2] + attrs[nl.SvcAttr.FWMARK]) == (V6, 7)


def test_netmask_bytes_ipv4_network_order_ipv6_host_order_prefix() -> None:
    assert nl.encode_netmask(V4, 0xFFFFFF00) == b"\xff\xff\xff\x00"
    assert nl.encode_netmask(V6, 64) == struct.pack("=I", 64)


def test_delete_of_a_dest_names_its_family() -> None:
    """The kernel looks dests up by family: DEL of a cross-family TUN dest needs it."""
    attrs = _top_attrs(nl.encode_dest(Dest(DestKey("2001:db8::1", 80)), full=False))
    assert set(attrs) == {nl.DestAttr.ADDR, nl.DestAttr.PORT, nl.DestAttr.ADDR_FAMILY}
    assert struct.unpack("=H", attrs[nl.DestAttr.ADDR_FAMILY])[0] == V6


def _services() -> Iterator[Service]:
    yield Service(TCP80, "wlc")
    yield Service(key(V4, Protocol.UDP, "10.0.0.1", 53), "sh", SCHED1 | SCHED2, 0, 0xFFFFFFFF)
    yield Service(key(V6, Protocol.TCP, "2001:db8::1", 443), "rr", PERSISTENT, 300, 48)
    yield Service(key(V4, Protocol.SCTP, "10.0.0.2", 3868), "mh", SCHED1, 0, 0xFFFFFFFF)
    yield Service(SIP, "wrr", PERSISTENT | ONEPACKET, 60, 128, "sip")
    yield Service(ServiceKey.for_fwmark(V4, 1), "lc", PERSISTENT, 10, 0xFFFF0000)
    yield Service(ServiceKey.for_fwmark(V6, 0xFFFFFFFF), "fo", 0, 0, 128)


def _dests() -> Iterator[Dest]:
    yield Dest(DestKey("10.1.0.1", 8080))
    yield Dest(DestKey("10.1.0.2", 0), ForwardingMethod.ROUTE, 0)
    yield Dest(DestKey("10.1.0.3", 80), ForwardingMethod.MASQ, 7, 1000, 900)
    for kind, port, flags in (
        (TunnelType.IPIP, 0, TunnelFlags.NOCSUM),
        (TunnelType.GUE, 6080, TunnelFlags.REMCSUM),
        (TunnelType.GRE, 0, TunnelFlags.CSUM),
    ):
        yield Dest(DestKey("10.1.0.4", 80), ForwardingMethod.TUNNEL, 2, 0, 0, kind, port, flags)
    yield Dest(DestKey("2001:db8::9", 80), ForwardingMethod.TUNNEL, 1, af=V6)
    yield Dest(DestKey("2001:db8::a", 443), ForwardingMethod.MASQ, 65535)


def _ops() -> Iterator[Op]:
    for service in _services():
        yield Op(OpKind.ADD_SERVICE, service)
        yield Op(OpKind.EDIT_SERVICE, service)
        yield Op(OpKind.DEL_SERVICE, service)
    for dest in _dests():
        service = Service(TCP80) if ":" not in dest.key.address or dest.af else Service(SIP)
        yield Op(OpKind.ADD_DEST, service, dest)
        yield Op(OpKind.EDIT_DEST, service, dest)
        yield Op(OpKind.DEL_DEST, service, dest)


_U32S = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([-1, 2**32]))
_U16S = st.one_of(st.integers(0, 2**16 - 1), st.sampled_from([-1, 2**16]))


@settings(max_examples=400, deadline=None)
@given(
    address=st.one_of(
        st.ip_addresses().map(str), st.sampled_from(["10.0.0.300", "2001:db8::zz", ""])
    ),
    port=_U16S,
    method=st.sampled_from(list(ForwardingMethod)),
    weight=_U32S,
    upper=_U32S,
    lower=_U32S,
    tunnel=st.sampled_from(list(TunnelType)),
    tunnel_port=_U16S,
    flags=st.sampled_from(list(TunnelFlags)),
    af=st.sampled_from([None, V4, V6]),
    kind=st.sampled_from([OpKind.ADD_DEST, OpKind.EDIT_DEST, OpKind.DEL_DEST]),
)
def test_a_dest_op_encodes_as_its_attributes_one_by_one(
    address: str,
    port: int,
    method: ForwardingMethod,
    weight: int,
    upper: int,
    lower: int,
    tunnel: TunnelType,
    tunnel_port: int,
    flags: TunnelFlags,
    af: AddressFamily | None,
    kind: OpKind,
) -> None:
    """The one-struct build of a dest op (``_full_dest_nest``, the service's nest remembered)
    is byte for byte the attribute-by-attribute one, and refuses alike what is out of range."""
    dest = Dest(
        DestKey(address, port), method, weight, upper, lower, tunnel, tunnel_port, flags, af
    )
    op = Op(kind, Service(TCP80), dest)
    try:
        general: Any = nl.nested(nl.CmdAttr.SERVICE, nl.encode_service_key(TCP80)) + nl.nested(
            nl.CmdAttr.DEST, nl.encode_dest(dest, kind is not OpKind.DEL_DEST)
        )
    except nl.CodecError as error:
        general = ("refused", error.errno)
    try:
        got: Any = nl.encode_op_payload(op)[1]
    except nl.CodecError as error:
        got = ("refused", error.errno)
    assert got == general


@pytest.mark.parametrize("op", list(_ops()), ids=str)
def test_every_op_round_trips_through_the_wire(op: Op) -> None:
    data = nl.encode_op(op, FAMILY, seq=41)
    header = header_of(data)
    assert (header.type, header.seq, header.flags) == (FAMILY, 41, nl.NLM_F_REQUEST | nl.NLM_F_ACK)
    seen = nl.decode_op(data)
    assert seen.kind is op.kind
    if op.kind in (OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE):
        assert seen.service == op.service
    else:
        assert seen.service.key == op.service.key
    if op.kind in (OpKind.ADD_DEST, OpKind.EDIT_DEST):
        assert seen.dest == op.dest
    elif op.dest is not None:
        assert seen.dest is not None and seen.dest.key == op.dest.key


def test_flags_outside_our_mask_never_reach_the_kernel() -> None:
    service = Service(TCP80, "rr", flags=ServiceFlag.HASHED | 0x40 | PERSISTENT, timeout=9)
    assert nl.decode_op(nl.encode_op(Op(OpKind.ADD_SERVICE, service), FAMILY, 1)).service.flags == (
        PERSISTENT
    )


def test_timeouts_request() -> None:
    data = nl.encode_set_timeouts(FAMILY, 5, Timeouts(tcp=900, tcp_fin=0, udp=30))
    header = header_of(data)
    assert data[header.start] == nl.Cmd.SET_CONFIG
    attrs = _top_attrs(data[nl.HEADERS_LEN :])
    assert {k: struct.unpack("=I", v)[0] for k, v in attrs.items()} == {
        nl.CmdAttr.TIMEOUT_TCP: 900,
        nl.CmdAttr.TIMEOUT_TCP_FIN: 0,
        nl.CmdAttr.TIMEOUT_UDP: 30,
    }


def _daemon_reply(seq: int, *attributes: bytes) -> bytes:
    """A GET_DAEMON dump message as ip_vs_genl_fill_daemon writes it (cmd NEW_DAEMON)."""
    return nl.message(FAMILY, nl.Cmd.NEW_DAEMON, nl.NLM_F_MULTI, seq,
                      nl.nested(nl.CmdAttr.DAEMON, b"".join(attributes)))  # fmt: skip


def test_sync_daemon_requests_carry_what_ipvsadm_sends() -> None:
    daemon = SyncDaemon(SyncState.BACKUP, "eth1", sync_id=7, max_len=1400,
                        group="239.1.2.3", port=9000, ttl=2)  # fmt: skip
    data = nl.encode_new_daemon(FAMILY, 3, daemon)
    header = header_of(data)
    assert data[header.start] == nl.Cmd.NEW_DAEMON and header.flags & nl.NLM_F_ACK
    top = _top_attrs(data[nl.HEADERS_LEN :])
    inner = _top_attrs(top[nl.CmdAttr.DAEMON])
    assert inner == {
        nl.DaemonAttr.STATE: struct.pack("=I", 2),
        nl.DaemonAttr.MCAST_IFN: b"eth1\0",
        nl.DaemonAttr.SYNC_ID: struct.pack("=I", 7),
        nl.DaemonAttr.SYNC_MAXLEN: struct.pack("=H", 1400),
        nl.DaemonAttr.MCAST_GROUP: bytes([239, 1, 2, 3]),  # network order
        nl.DaemonAttr.MCAST_PORT: struct.pack("=H", 9000),  # host order, unlike other ports
        nl.DaemonAttr.MCAST_TTL: b"\x02",
    }

    # Defaults are left to the kernel: nothing but state, interface and sync id.
    def sent(d: SyncDaemon) -> dict[int, bytes]:
        top = _top_attrs(nl.encode_new_daemon(FAMILY, 4, d)[nl.HEADERS_LEN :])
        return _top_attrs(top[nl.CmdAttr.DAEMON])

    plain = sent(SyncDaemon(SyncState.MASTER, "eth0"))
    assert set(plain) == {nl.DaemonAttr.STATE, nl.DaemonAttr.MCAST_IFN, nl.DaemonAttr.SYNC_ID}
    six = sent(SyncDaemon(SyncState.MASTER, "eth0", group="ff02::81"))
    assert six[nl.DaemonAttr.MCAST_GROUP6] == bytes.fromhex("ff02" + "00" * 12 + "0081")
    stop = nl.encode_del_daemon(FAMILY, 6, SyncState.MASTER)
    assert stop[header_of(stop).start] == nl.Cmd.DEL_DAEMON
    assert _top_attrs(_top_attrs(stop[nl.HEADERS_LEN :])[nl.CmdAttr.DAEMON]) == {
        nl.DaemonAttr.STATE: struct.pack("=I", 1)
    }


@pytest.mark.parametrize(
    "daemon",
    [
        SyncDaemon(SyncState.MASTER, ""),
        SyncDaemon(SyncState.MASTER, "an-interface-name-too-long"),
        SyncDaemon(SyncState.MASTER, "eth0", group="192.0.2.1"),  # not multicast
        SyncDaemon(SyncState.MASTER, "eth0", group="no-address"),
        SyncDaemon(SyncState.MASTER, "eth0", port=70000),
        SyncDaemon(SyncState.MASTER, "eth0", ttl=256),
    ],
    ids=["no-interface", "long-interface", "unicast-group", "bad-group", "port", "ttl"],
)
def test_sync_daemons_that_cannot_be_encoded_say_why(daemon: SyncDaemon) -> None:
    with pytest.raises(nl.CodecError) as caught:
        nl.encode_new_daemon(FAMILY, 1, daemon)
    assert str(caught.value)


def test_sync_daemon_dumps_decode_with_the_kernels_defaults() -> None:
    u16, u32 = (lambda v: struct.pack("=H", v)), (lambda v: struct.pack("=I", v))
    master = _daemon_reply(
        9,
        nl.attr(nl.DaemonAttr.STATE, u32(1)),
        nl.attr(nl.DaemonAttr.MCAST_IFN, b"eth0\0"),
        nl.attr(nl.DaemonAttr.SYNC_ID, u32(5)),
        nl.attr(nl.DaemonAttr.SYNC_MAXLEN, u16(1472)),
        nl.attr(nl.DaemonAttr.MCAST_PORT, u16(8848)),
        nl.attr(nl.DaemonAttr.MCAST_TTL, b"\x01"),
        nl.attr(nl.DaemonAttr.MCAST_GROUP, bytes([224, 0, 0, 81])),
    )
    backup = _daemon_reply(
        9,
        nl.attr(nl.DaemonAttr.STATE, u32(2)),
        nl.attr(nl.DaemonAttr.MCAST_IFN, b"eth0\0"),
        nl.attr(nl.DaemonAttr.SYNC_ID, u32(5)),
        nl.attr(nl.DaemonAttr.MCAST_GROUP6, bytes.fromhex("ff02" + "00" * 12 + "0081")),
    )
    got = [nl.decode_daemon(m, h) for m in (master, backup) for h in nl.messages(m)]
    assert got == [
        SyncDaemon(SyncState.MASTER, "eth0", 5, 1472, "224.0.0.81", 8848, 1),
        SyncDaemon(SyncState.BACKUP, "eth0", 5, 0, "ff02::81", 0, 0),
    ]
    wanted = SyncDaemon(SyncState.MASTER, "eth0", sync_id=5)
    assert got[0] is not None and wanted.matches(got[0])
    assert not replace(wanted, sync_id=6).matches(got[0])
    assert not replace(wanted, port=9000).matches(got[0])
    assert not replace(wanted, state=SyncState.BACKUP).matches(got[0])


def test_fake_kernel_runs_one_daemon_per_state() -> None:
    fake = FakeKernel()
    master = SyncDaemon(SyncState.MASTER, "eth0", sync_id=3)
    fake.start_daemon(master)
    fake.start_daemon(replace(master, state=SyncState.BACKUP))
    assert [d.state for d in fake.daemons()] == [SyncState.MASTER, SyncState.BACKUP]
    assert all(replace(master, state=d.state).matches(d) for d in fake.daemons())
    with pytest.raises(KernelError) as caught:
        fake.start_daemon(master)
    assert caught.value.errno == errno.EEXIST
    fake.stop_daemon(SyncState.MASTER)
    with pytest.raises(KernelError) as caught:
        fake.stop_daemon(SyncState.MASTER)
    assert caught.value.errno == errno.ESRCH
    fake.interfaces = {"eth0"}
    with pytest.raises(KernelError) as caught:
        fake.start_daemon(replace(master, interface="eth9"))
    assert caught.value.errno == errno.ENODEV


@pytest.mark.parametrize(
    ("op", "code"),
    [
        (Op(OpKind.ADD_SERVICE, Service(key(V4, Protocol.TCP, "10.0.0.300", 80))), errno.EINVAL),
        (Op(OpKind.ADD_SERVICE, Service(key(V4, Protocol.TCP, "2001:db8::1", 80))), errno.EINVAL),
        (Op(OpKind.ADD_SERVICE, Service(key(V4, Protocol.TCP, "10.0.0.1", 65536))), errno.ERANGE),
        (Op(OpKind.ADD_SERVICE, Service(TCP80, "a-scheduler-name-too-long")), errno.EINVAL),
        (Op(OpKind.ADD_SERVICE, Service(TCP80, "")), errno.EINVAL),
        (Op(OpKind.ADD_SERVICE, Service(TCP80, pe_name="sïp")), errno.EINVAL),
        (Op(OpKind.ADD_SERVICE, Service(SIP)), errno.EINVAL),  # v6 netmask 0xffffffff
        (Op(OpKind.ADD_SERVICE, Service(SIP, netmask=0)), errno.EINVAL),
        (Op(OpKind.ADD_SERVICE, Service(SIP, netmask=129)), errno.EINVAL),
        (Op(OpKind.ADD_DEST, Service(TCP80)), errno.EINVAL),  # no dest
        (
            Op(OpKind.ADD_DEST, Service(TCP80), Dest(DestKey("10.0.0.1", 80), weight=-1)),
            errno.ERANGE,
        ),
        (Op(OpKind.ADD_DEST, Service(TCP80), Dest(DestKey("10.0.0.1", 80), af=V6)), errno.EINVAL),
        (
            Op(OpKind.ADD_DEST, Service(TCP80), Dest(DestKey("10.0.0.1", 80), tunnel_port=70000)),
            errno.ERANGE,
        ),
    ],
    ids=lambda value: str(value) if isinstance(value, int) else value.kind.value,
)
def test_ops_that_cannot_be_encoded_say_why(op: Op, code: int) -> None:
    with pytest.raises(nl.CodecError) as caught:
        nl.encode_op(op, FAMILY, 1)
    assert caught.value.errno == code and str(caught.value)


def test_error_messages_speak_lvs() -> None:
    add = Op(OpKind.ADD_DEST, Service(TCP80), Dest(DestKey("10.0.0.1", 80)))
    assert describe_error(add, 0) == ""
    assert describe_error(add, errno.ESRCH).startswith("virtual service not found")
    assert describe_error(add, errno.EEXIST).startswith("real server already exists")
    text = describe_error(Op(OpKind.ADD_SERVICE, Service(TCP80)), errno.ENOENT, "ip_vs_foo")
    assert text.startswith("scheduler or persistence engine not found; ip_vs_foo; ENOENT")


# --- IPVSKernel over a stand-in socket --------------------------------------------------------

OP_CMDS = {int(c) for c in (nl.Cmd.NEW_SERVICE, nl.Cmd.SET_SERVICE, nl.Cmd.DEL_SERVICE,
                             nl.Cmd.NEW_DEST, nl.Cmd.SET_DEST, nl.Cmd.DEL_DEST)}  # fmt: skip


def _with_seq(message: bytes, seq: int) -> bytes:
    out = bytearray(message)
    struct.pack_into("=I", out, 8, seq)
    return bytes(out)


def _done(seq: int) -> bytes:
    return struct.pack("=IHHIIi", 20, nl.NLMSG_DONE, nl.NLM_F_MULTI, seq, 0, 0)


class KernelSocket:
    """What IPVSKernel's socket sees from the kernel: ops go to a FakeKernel under netlink's
    ack rules (an error ack for every failure, an ack only when asked), dumps and gets are
    answered with GOLDEN, one datagram per kernel skb."""

    def __init__(self) -> None:
        self.golden = dict(GOLDEN)  # tests may change what the "kernel" reports
        self.fake = FakeKernel()
        self.queue: list[bytes] = []
        self.sends: list[list[tuple[int, int]]] = []  # per send: (cmd, flags) of each message
        self.recv_error: OSError | None = None
        self.config: list[dict[int, bytes]] = []

    def settimeout(self, timeout: float) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def send(self, data: bytes) -> int:
        batch = []
        for header in nl.messages(data):
            message = data[header.start - 16 : header.end]
            cmd = data[header.start]
            batch.append((cmd, header.flags))
            if cmd in OP_CMDS:
                result = self.fake.apply([nl.decode_op(message)])[0]
                if result.error or header.flags & nl.NLM_F_ACK:
                    self.queue.append(_ack(header.seq, result.error))
            elif cmd == nl.Cmd.GET_SERVICE:
                names = [n for n in GOLDEN if n.startswith("service ")]
                self.queue.append(b"".join(_with_seq(self.golden[n], header.seq) for n in names))
                self.queue.append(_done(header.seq))
            elif cmd == nl.Cmd.GET_DEST:
                span = nl.nested_payload(data, header, nl.CmdAttr.SERVICE)
                assert span is not None
                wanted = nl.decode_service_attrs(data, *span)[0].key
                names = [n for n, (svc, _) in DESTS.items() if svc == wanted]
                if names:
                    self.queue.append(
                        b"".join(_with_seq(self.golden[n], header.seq) for n in names)
                    )
                self.queue.append(_done(header.seq))
            elif cmd == nl.Cmd.GET_INFO:
                self.queue.append(_with_seq(GOLDEN["info"], header.seq))
            elif cmd == nl.Cmd.GET_CONFIG:
                self.queue.append(_with_seq(GOLDEN["config"], header.seq))
            elif cmd == nl.Cmd.SET_CONFIG:
                self.config.append(_top_attrs(data[header.start + 4 : header.end]))
                self.queue.append(_ack(header.seq, 0))
        self.sends.append(batch)
        return len(data)

    def recv_into(self, buffer: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if self.recv_error is not None:
            raise self.recv_error
        if not self.queue:
            raise TimeoutError("nothing queued")
        data = self.queue.pop(0)
        buffer[: len(data)] = data
        return len(data)  # the whole datagram's size, as with MSG_TRUNC


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> KernelSocket:
    sock = KernelSocket()
    monkeypatch.setattr(ipvs_module, "_open", lambda netns: (FAMILY, sock))
    return sock


def _svc(n: int) -> Service:
    return Service(key(V4, Protocol.TCP, f"10.0.{n}.1", 80), "rr")


def _dest(n: int) -> Dest:
    return Dest(DestKey(f"10.1.0.{n}", 80))


def test_one_failed_op_is_reported_and_the_others_still_run(wire: KernelSocket) -> None:
    ops = [
        Op(OpKind.ADD_SERVICE, _svc(1)),
        Op(OpKind.ADD_DEST, _svc(1), _dest(1)),
        Op(OpKind.ADD_SERVICE, _svc(1)),  # EEXIST
        Op(OpKind.ADD_DEST, _svc(1), _dest(2)),
        Op(OpKind.DEL_SERVICE, _svc(9)),  # ESRCH
        Op(OpKind.ADD_DEST, _svc(1), Dest(DestKey("10.1.0.3", 80), tunnel_port=70000)),  # codec
        Op(OpKind.EDIT_DEST, _svc(1), replace(_dest(1), weight=5)),
    ]
    with IPVSKernel() as kernel:
        results = kernel.apply(ops)
    assert [r.op for r in results] == ops
    assert [r.error for r in results] == [0, 0, errno.EEXIST, 0, errno.ESRCH, errno.ERANGE, 0]
    assert results[4].message.startswith("virtual service not found")
    dests = wire.fake.dump()[_svc(1).key].dests
    assert {k.address: d.dest.weight for k, d in dests.items()} == {"10.1.0.1": 5, "10.1.0.2": 1}
    # Two rounds: the ADD_SERVICEs (and the ops of other services) first, then the ops of the
    # services this call added, once their adds are confirmed; the unencodable op never left.
    assert [len(batch) for batch in wire.sends] == [3, 3]


def test_ops_go_in_batches_and_only_the_last_of_each_asks_for_an_ack(wire: KernelSocket) -> None:
    ops = [Op(OpKind.ADD_SERVICE, _svc(n)) for n in range(10)]
    with IPVSKernel(batch_size=4) as kernel:
        assert all(r.ok for r in kernel.apply(ops))
    assert [len(batch) for batch in wire.sends] == [4, 4, 2]
    for batch in wire.sends:
        assert [bool(flags & nl.NLM_F_ACK) for _, flags in batch] == [False] * (len(batch) - 1) + [
            True
        ]
    assert len(wire.fake.dump()) == 10


def test_when_acks_are_lost_the_outcome_is_reported_unknown(wire: KernelSocket) -> None:
    wire.recv_error = OSError(errno.ENOBUFS, "No buffer space available")
    with IPVSKernel() as kernel:
        results = kernel.apply([Op(OpKind.ADD_SERVICE, _svc(1)), Op(OpKind.ADD_SERVICE, _svc(2))])
    assert [r.error for r in results] == [errno.ENOBUFS, errno.ENOBUFS]
    assert "state unknown" in results[0].message


def test_dump_reads_services_dests_and_counters(wire: KernelSocket) -> None:
    with IPVSKernel() as kernel:
        table = kernel.dump()
        decoder = kernel.decoder
    assert {k: (o.service, o.stats) for k, o in table.items()} == {
        service.key: (service, stats) for service, stats in SERVICES.values()
    }
    for name, (service, observed) in DESTS.items():
        assert table[service].dests[observed.dest.key] == observed, name
    assert sum(len(o.dests) for o in table.values()) == len(DESTS)
    assert decoder.dests.hits == len(DESTS)


def _patched(message: bytes, kind: int, value: int) -> bytes:
    """``message`` with the u32 dest attribute ``kind`` set to ``value``."""
    parts = _dest_attrs(message)
    for index, part in enumerate(parts):
        if struct.unpack_from("=H", part, 2)[0] == kind:
            parts[index] = part[:4] + struct.pack("=I", value)
    return _with_seq(_dest_message(parts), 0)


def test_repeated_dumps_share_what_did_not_change(wire: KernelSocket) -> None:
    """Unchanged entries are the previous dump's own objects; changed ones are new."""
    with IPVSKernel() as kernel:
        first = kernel.dump()
        again = kernel.dump()
        assert all(again[k] is first[k] for k in first)
        gue = "dest 198.51.100.12:80"
        wire.golden[gue] = _patched(GOLDEN[gue], nl.DestAttr.WEIGHT, 7)
        busy = "dest [2001:db8:5e::11]:5060"
        wire.golden[busy] = _patched(GOLDEN[busy], nl.DestAttr.ACTIVE_CONNS, 4)
        third = kernel.dump()
    assert third[TCP80] is not first[TCP80]
    for dest_key, observed in third[TCP80].dests.items():
        changed = dest_key.address == "198.51.100.12"
        assert (observed is first[TCP80].dests[dest_key]) is not changed
    assert third[TCP80].dests[DestKey("198.51.100.12", 80)].dest.weight == 7
    busy_key = DestKey("2001:db8:5e::11", 5060)
    assert third[SIP].dests[busy_key].stats.active_connections == 4
    assert third[SIP].dests[busy_key].dest is first[SIP].dests[busy_key].dest
    assert third[DNS] is first[DNS]


def test_a_dump_lends_the_expected_tables_equal_dests_instead_of_copies(
    wire: KernelSocket,
) -> None:
    """The planner's desired table and the dump hold one Dest object per real server, not
    two equal ones (at 10 000 x 10 a copy is tens of MB); a dest that differs is read as is."""
    with IPVSKernel() as reference:
        read = reference.dump()
    expected = {
        key: DesiredService(o.service, {k: replace(d.dest) for k, d in o.dests.items()})
        for key, o in read.items()
    }
    gue = DestKey("198.51.100.12", 80)
    expected[TCP80] = DesiredService(
        expected[TCP80].service,
        {**expected[TCP80].dests, gue: replace(expected[TCP80].dests[gue], weight=9)},
    )
    with IPVSKernel() as kernel:
        first = kernel.dump(expected)
        assert first == read  # lending never changes what is read
        for key, observed in first.items():
            for dest_key, dest in observed.dests.items():
                assert (dest.dest is expected[key].dests[dest_key]) is (dest_key != gue)
        # an unchanged reply is the last dump's objects, which already share
        assert kernel.dump(expected)[TCP80] is first[TCP80]
        # counters moved: the reply is decoded again and its Dests are still the expected ones
        busy = "dest 198.51.100.12:80"
        wire.golden[busy] = _patched(GOLDEN[busy], nl.DestAttr.ACTIVE_CONNS, 4)
        again = kernel.dump(expected)
    assert again[TCP80].dests[gue].stats.active_connections == 4
    assert all(
        d.dest is expected[TCP80].dests[k] for k, d in again[TCP80].dests.items() if k != gue
    )


def test_info_and_timeouts(wire: KernelSocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipvs_module, "probe_modules", lambda release: (("rr", "mh"), ("ipip",)))
    with IPVSKernel() as kernel:
        info = kernel.info()
        assert kernel.get_timeouts() == Timeouts(900, 120, 300)
        kernel.set_timeouts(Timeouts(tcp=60))
    assert (info.version, info.connection_table_size) == ("1.2.1", 4096)
    assert (info.schedulers, info.tunnel_types) == (("rr", "mh"), ("ipip",))
    assert struct.unpack("=I", wire.config[0][nl.CmdAttr.TIMEOUT_TCP]) == (60,)


def test_a_silent_kernel_is_an_error_not_a_hang(wire: KernelSocket) -> None:
    wire.queue.clear()
    wire.send = lambda data: len(data)  # type: ignore[method-assign]
    with IPVSKernel() as kernel, pytest.raises(KernelError) as caught:
        kernel.get_timeouts()
    assert caught.value.errno == errno.ETIMEDOUT


# --- module probing ---------------------------------------------------------------------------


def test_schedulers_and_tunnels_come_from_loaded_builtin_and_installed_modules(
    tmp_path: Path,
) -> None:
    release = "6.1.0-test"
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/modules").write_text("ip_vs_rr 16384 0 - Live 0x0\nip_vs 184320 1 ip_vs_rr\n")
    (tmp_path / "sys/module/ip_vs_wrr").mkdir(parents=True)
    tree = tmp_path / "lib/modules" / release
    tree.mkdir(parents=True)
    (tree / "modules.dep").write_text(
        "kernel/net/netfilter/ipvs/ip_vs_mh.ko.xz: kernel/net/netfilter/ipvs/ip_vs.ko.xz\n"
        "kernel/net/netfilter/ipvs/ip_vs_twos.ko.zst:\n"
        "kernel/net/netfilter/ipvs/ip_vs_ftp.ko:\n"
        "kernel/net/netfilter/ipvs/ip_vs_pe_sip.ko:\n"
        "kernel/net/netfilter/ipvs/ip_vs_new-one.ko:\n"
        "kernel/net/ipv4/fou.ko:\n"
    )
    (tree / "modules.builtin").write_text("kernel/net/ipv4/ipip.ko\n")
    schedulers, tunnels = probe_modules(release, tmp_path)
    assert schedulers == ("rr", "wrr", "mh", "twos", "new_one")
    assert tunnels == ("ipip", "gue")


def test_a_bare_container_reports_nothing_rather_than_failing(tmp_path: Path) -> None:
    assert probe_modules("6.1.0", tmp_path) == ((), ())


# --- FakeKernel: the kernel's rules in memory -------------------------------------------------


def _errors(results: list[OpResult]) -> list[int]:
    return [r.error for r in results]


def test_fake_kernel_answers_like_the_kernel() -> None:
    fake = FakeKernel()
    s, d = _svc(1), _dest(1)
    other = Dest(DestKey("2001:db8::1", 80))
    assert _errors(
        fake.apply([
            Op(OpKind.EDIT_SERVICE, s),  # ESRCH: the service check comes first
            Op(OpKind.ADD_DEST, s, d),  # ESRCH
            Op(OpKind.ADD_SERVICE, s),
            Op(OpKind.ADD_SERVICE, s),  # EEXIST
            Op(OpKind.ADD_SERVICE, Service(_svc(2).key, "twos")),  # ENOENT: not in 6.1
            Op(OpKind.ADD_SERVICE, Service(_svc(3).key, pe_name="http")),  # ENOENT
            Op(OpKind.ADD_DEST, s, d),
            Op(OpKind.ADD_DEST, s, d),  # EEXIST
            Op(OpKind.EDIT_DEST, s, _dest(2)),  # ENOENT
            Op(OpKind.DEL_DEST, s, _dest(2)),  # ENOENT
            Op(OpKind.ADD_DEST, s, replace(_dest(3), lower_threshold=1)),  # ERANGE (upper 0)
            Op(OpKind.ADD_DEST, s, replace(_dest(4), tunnel_type=TunnelType.GUE)),  # EINVAL
            Op(OpKind.ADD_DEST, s, other),  # EINVAL: MASQ across families
            Op(OpKind.ADD_DEST, s, replace(other, forwarding=ForwardingMethod.TUNNEL)),
        ])
    ) == [
        errno.ESRCH, errno.ESRCH, 0, errno.EEXIST, errno.ENOENT, errno.ENOENT, 0,
        errno.EEXIST, errno.ENOENT, errno.ENOENT, errno.ERANGE, errno.EINVAL, errno.EINVAL, 0,
    ]  # fmt: skip
    dests = fake.dump()[s.key].dests
    assert list(dests) == [other.key, d.key]  # newest first, as the kernel lists them
    assert dests[other.key].dest.af == V6


def test_fake_kernel_edits_in_place_and_deletes_dests_with_their_service() -> None:
    fake = FakeKernel()
    s = _svc(1)
    fake.apply([Op(OpKind.ADD_SERVICE, s), Op(OpKind.ADD_DEST, s, _dest(1))])
    fake.set_stats(s.key, ServiceStats(connections=7))
    fake.set_dest_stats(s.key, _dest(1).key, DestStats(active_connections=2))
    edited = replace(s, scheduler="wrr", flags=PERSISTENT, timeout=300)
    fake.apply(
        [Op(OpKind.EDIT_SERVICE, edited), Op(OpKind.EDIT_DEST, s, replace(_dest(1), weight=0))]
    )
    observed = fake.dump()[s.key]
    assert observed.service == edited and observed.stats.connections == 7
    assert observed.dests[_dest(1).key].stats.active_connections == 2
    assert observed.dests[_dest(1).key].dest.weight == 0
    assert _errors(fake.apply([Op(OpKind.DEL_SERVICE, s), Op(OpKind.DEL_DEST, s, _dest(1))])) == [
        0,
        errno.ESRCH,
    ]
    assert fake.dump() == {}
    assert [op.kind for op in fake.applied] == [
        OpKind.ADD_SERVICE, OpKind.ADD_DEST, OpKind.EDIT_SERVICE, OpKind.EDIT_DEST,
        OpKind.DEL_SERVICE,
    ]  # fmt: skip


def test_fake_kernel_rejects_what_cannot_be_encoded_and_injected_failures() -> None:
    fake = FakeKernel()
    fake.fail(lambda op: op.kind is OpKind.ADD_DEST, errno.ENOMEM, "injected")
    results = fake.apply(
        [
            Op(OpKind.ADD_SERVICE, Service(SIP)),  # IPv6 with the IPv4 default netmask
            Op(OpKind.ADD_SERVICE, _svc(1)),
            Op(OpKind.ADD_DEST, _svc(1), _dest(1)),
        ]
    )
    assert _errors(results) == [errno.EINVAL, 0, errno.ENOMEM]
    assert "prefix length" in results[0].message and "injected" in results[2].message
    fake.clear_failures()
    assert _errors(fake.apply([Op(OpKind.ADD_DEST, _svc(1), _dest(1))])) == [0]


def test_fake_kernel_timeouts_and_close() -> None:
    fake = FakeKernel()
    fake.set_timeouts(Timeouts(tcp=60, udp=5))
    assert fake.get_timeouts() == Timeouts(60, 120, 5)
    with pytest.raises(KernelError):
        fake.set_timeouts(Timeouts(tcp=2**31))
    with fake:
        pass
    with pytest.raises(KernelError):
        fake.dump()
