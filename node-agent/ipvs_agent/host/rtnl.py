"""The namespace's interface addresses, by one raw ``RTM_GETADDR`` dump.

A node holds every virtual address on the agent's dummy device, so the address list grows
with the services: pyroute2's generic message parser cost about 7 ms per address under
emulation (14 s of a 2000-service pass, bench/bench_host_pass.py). Reading an address needs
four fixed fields and one attribute, so this module frames and decodes the dump itself, with
kernel.netlink's helpers, and leaves changes (``addr add``/``del``) to pyroute2.

With ``NETLINK_GET_STRICT_CHK`` (Linux 4.20+) the kernel sends one device's addresses only;
the filter is applied here as well, so older kernels give the same answer.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import Final, NamedTuple

from ipvs_agent.host._netns import HostError, entered
from ipvs_agent.kernel import netlink as nl
from ipvs_agent.model import IPAddress

NETLINK_ROUTE: Final = 0
SOL_NETLINK: Final = 270
NETLINK_GET_STRICT_CHK: Final = 12
RTM_NEWADDR: Final = 20
RTM_GETADDR: Final = 22
NLM_F_DUMP_INTR: Final = 0x10
IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2
IFA_FLAGS: Final = 8
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RECV_BUFFER: Final = 1 << 16  # netlink caps a dump chunk at 32 KiB
RETRIES: Final = 3  # dumps interrupted by a concurrent change (NLM_F_DUMP_INTR)
_U32 = struct.Struct("=I")


class AddressRecord(NamedTuple):
    """One address of an interface, as ``ip -o addr`` would show it."""

    ifindex: int
    address: IPAddress
    prefixlen: int
    #: IFA_FLAGS when the kernel sends it (all 32 bits), else the header's 8.
    flags: int
    scope: int


def request(seq: int, index: int = 0) -> bytes:
    """An RTM_GETADDR dump request (all families; ``index`` 0: every device)."""
    body = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, index)
    flags = nl.NLM_F_REQUEST | nl.NLM_F_DUMP
    return nl.NLMSG_HDR.pack(nl.NLMSG_HDR.size + len(body), RTM_GETADDR, flags, seq, 0) + body


def decode(buf: nl.Buffer, header: nl.Header) -> AddressRecord | None:
    """One RTM_NEWADDR message (None: one without an address, or of another family)."""
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(buf, header.start)
    size = 4 if family == socket.AF_INET else 16 if family == socket.AF_INET6 else 0
    if not size:
        return None
    found = nl.attrs(buf, header.start + IFADDRMSG.size, header.end)
    at = found.get(IFA_LOCAL, found.get(IFA_ADDRESS))
    if at is None:
        return None
    address = ipaddress.ip_address(bytes(buf[at : at + size]))
    if IFA_FLAGS in found:
        flags = _U32.unpack_from(buf, found[IFA_FLAGS])[0]
    return AddressRecord(index, address, prefixlen, flags, scope)


class AddressReader:
    """Reads a network namespace's addresses (``netns``: a name or path; None: our own)."""

    def __init__(self, netns: str | None = None, *, timeout: float = 30.0) -> None:
        self.netns = netns
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._strict = False
        self._seq = 0
        self._buf = bytearray(RECV_BUFFER)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            with entered(self.netns):
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            sock.settimeout(self.timeout)
            sock.bind((0, 0))
            try:
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
                self._strict = True
            except OSError:
                self._strict = False  # an older kernel: the filter below does it all
            self._sock = sock
        return self._sock

    def dump(self, index: int | None = None) -> list[AddressRecord]:
        """Every address of the namespace, or of device ``index`` only.

        A dump that fails half-way (a timeout, an error) closes the socket: the kernel keeps
        an unfinished dump open on it, and would refuse the next one (EBUSY).
        """
        for _ in range(RETRIES):
            try:
                records, whole = self._dump_once(index)
            except HostError:
                self.close()
                raise
            if whole:
                return records
        raise HostError(f"address dump interrupted by changes {RETRIES} times in a row")

    def _dump_once(self, index: int | None) -> tuple[list[AddressRecord], bool]:
        sock = self._socket()
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        wanted = index if index is not None and self._strict else 0
        try:
            sock.send(request(seq, wanted))
        except OSError as error:
            raise HostError(f"rtnetlink send: {error}") from error
        records: list[AddressRecord] = []
        whole = True
        buf = self._buf
        while True:
            for header in self._messages(sock, buf):
                if header.seq != seq:
                    continue  # left over from a dump that timed out
                if header.flags & NLM_F_DUMP_INTR:
                    whole = False
                if header.type == nl.NLMSG_DONE:
                    return records, whole
                if header.type == nl.NLMSG_ERROR:
                    code, text = nl.decode_error(buf, header)
                    name = errno.errorcode.get(code, str(code))
                    raise HostError(f"address dump refused: {name} {text}".rstrip())
                if header.type != RTM_NEWADDR:
                    continue
                record = decode(buf, header)
                if record is not None and (index is None or record.ifindex == index):
                    records.append(record)

    def _messages(self, sock: socket.socket, buf: bytearray) -> Iterator[nl.Header]:
        try:
            size = sock.recv_into(buf, 0, socket.MSG_TRUNC)
        except TimeoutError:
            raise HostError("the kernel did not answer the address dump in time") from None
        except OSError as error:
            raise HostError(f"rtnetlink receive: {error}") from error
        if size > len(buf):
            raise HostError("rtnetlink reply larger than the receive buffer")
        try:
            yield from nl.messages(buf, size)
        except nl.CodecError as error:
            raise HostError(f"malformed address dump: {error}") from error

    def __enter__(self) -> AddressReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
