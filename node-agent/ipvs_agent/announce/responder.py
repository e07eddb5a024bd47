"""Answering for the announced VIPs on raw sockets, and announcing each new one (the shell).

The kernel must not answer for a VIP: it sits on the agent's dummy device, the agent's nftables
``arp`` table drops ARP requests for it, and IPv6 neighbour discovery answers only for addresses
of the interface asked. So the node that won a VIP's election answers from user space, like
MetalLB's speaker, on ``AF_PACKET`` sockets (``CAP_NET_RAW``): ARP requests and neighbour
solicitations — to the solicited-node group and unicast (neighbour unreachability detection,
which a switch or router sends to the VIP itself) — for exactly the VIPs it announces on each
interface. A VIP it starts announcing is announced at once and again a few times over five
seconds (gratuitous ARP as request and reply, unsolicited neighbour advertisement with the
override flag), so switches and routers move at once and a lost frame does not strand them.

When the agent dies its sockets close with it: a node whose agent is gone never answers.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import heapq
import ipaddress
import itertools
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipvs_agent.announce import packets
from ipvs_agent.host._netns import entered
from ipvs_agent.host.rtnl import AddressReader
from ipvs_agent.model import IPAddress

log = logging.getLogger(__name__)

#: Seconds after a takeover at which the VIP is announced (again).
BURST = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0)
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_DROP_MEMBERSHIP = 2
PACKET_MR_MULTICAST = 0
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26


class _Filter(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _attach(sock: socket.socket, program: bytes) -> None:
    buffer = ctypes.create_string_buffer(program)
    fprog = _Filter(len(program) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def _membership(sock: socket.socket, index: int, mac: bytes, add: bool) -> None:
    mreq = struct.pack("iHH8s", index, PACKET_MR_MULTICAST, 6, mac + b"\x00\x00")
    option = PACKET_ADD_MEMBERSHIP if add else PACKET_DROP_MEMBERSHIP
    sock.setsockopt(SOL_PACKET, option, mreq)


IFF_UP = 0x1
IFF_LOWER_UP = 0x10000


def read_nics(
    rtnl: Any, reader: AddressReader
) -> dict[str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    """The interfaces that are up and have carrier, with their addresses (pyroute2 ``rtnl``
    for the links, ``reader`` for the addresses: the agent's device may hold thousands).

    Host addresses (/32, /128) are left out: no VIP is announced by way of one
    (``speaker.interfaces_for``), and they are the thousands of VIPs on the agent's device,
    which this poll would otherwise turn into interface objects every second.
    """
    names: dict[int, str] = {}
    for link in rtnl.link("dump"):
        if link["flags"] & IFF_UP and link["flags"] & IFF_LOWER_UP:
            names[int(link["index"])] = str(link.get_attr("IFLA_IFNAME"))
    found: dict[str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]] = {
        name: [] for name in names.values()
    }
    for record in reader.dump():
        name = names.get(record.ifindex)
        if name is not None and record.prefixlen < record.address.max_prefixlen:
            found[name].append(ipaddress.ip_interface((record.address, record.prefixlen)))
    return found


def link_local(ifname: str) -> ipaddress.IPv6Address | None:
    """The interface's IPv6 link-local address (the source of our advertisements)."""
    try:
        with open("/proc/thread-self/net/if_inet6") as table:
            for line in table:
                address, _, _, scope, _, name = line.split()
                if name == ifname and int(scope, 16) == 0x20:
                    return ipaddress.IPv6Address(bytes.fromhex(address))
    except OSError:
        return None
    return None


@dataclass
class _Interface:
    """The sockets of one interface and the VIPs announced on it."""

    name: str
    arp: socket.socket
    ndp: socket.socket
    mac: bytes
    index: int
    source6: ipaddress.IPv6Address | None
    vips: set[IPAddress] = field(default_factory=set)

    def close(self) -> None:
        self.arp.close()
        self.ndp.close()


class Responder:
    """Answers for the VIPs it is given (:meth:`set`), on the interfaces given for each.

    ``netns`` selects the network namespace the sockets are opened in (None: the agent's own).
    Thread body: :meth:`run`. Counters for metrics: ``replies``, ``announcements``.
    """

    def __init__(self, netns: str | None = None, burst: tuple[float, ...] = BURST) -> None:
        self.netns = netns
        self.burst = burst
        self._lock = threading.Lock()
        self._interfaces: dict[str, _Interface] = {}
        #: Given up, closed by the thread that selects on them (closing a socket another
        #: thread is selecting on is a race: EBADF, or a reused descriptor read by mistake).
        self._retired: list[_Interface] = []
        self._pending: list[tuple[float, int, IPAddress, str]] = []
        self._order = itertools.count()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.replies = 0
        self.announcements = 0
        #: Frames from other hosts claiming a VIP this node answers for (a gratuitous ARP or
        #: ARP reply, a neighbour advertisement), per VIP; see :meth:`claims`.
        self._claims: Counter[IPAddress] = Counter()
        self._claimed_by: dict[IPAddress, bytes] = {}
        self.errors: dict[str, str] = {}

    # ---------------------------------------------------------------- what to answer for

    def announced(self) -> dict[IPAddress, tuple[str, ...]]:
        with self._lock:
            found: dict[IPAddress, list[str]] = {}
            for name, iface in self._interfaces.items():
                for vip in iface.vips:
                    found.setdefault(vip, []).append(name)
        return {vip: tuple(sorted(names)) for vip, names in found.items()}

    def claims(self) -> dict[IPAddress, int]:
        """How many frames of other hosts claimed each VIP while this node answered for it.

        Another node's takeover shows here (its gratuitous ARP or unsolicited advertisement), as
        does a host on the LAN configured with a VIP by mistake.
        """
        with self._lock:
            return dict(self._claims)

    def _claimed(self, iface: _Interface, vip: IPAddress, mac: bytes) -> None:
        if mac == iface.mac:
            return
        self._claims[vip] += 1
        if self._claimed_by.get(vip) != mac:
            self._claimed_by[vip] = mac
            log.info("%s on %s is claimed by %s too", vip, iface.name, packets.mac_text(mac))

    def set(self, wanted: Mapping[IPAddress, tuple[str, ...]], now: float | None = None) -> None:
        """Answer for exactly these VIPs, each on its interfaces; announce the new ones."""
        now = time.monotonic() if now is None else now
        by_interface: dict[str, set[IPAddress]] = {}
        for vip, names in wanted.items():
            for name in names:
                by_interface.setdefault(name, set()).add(vip)
        with self._lock:
            for name in sorted(set(self._interfaces) - set(by_interface)):
                gone = self._interfaces.pop(name)
                self._retired.append(gone)
                for vip in sorted(gone.vips, key=str):
                    log.info("no longer announcing %s on %s", vip, name)
            for name, vips in sorted(by_interface.items()):
                iface = self._interfaces.get(name)
                if iface is None:
                    try:
                        iface = self._open(name)
                    except OSError as error:
                        self.errors[name] = str(error)
                        log.warning("cannot answer on %s: %s", name, error)
                        continue
                    self.errors.pop(name, None)
                    self._interfaces[name] = iface
                for vip in sorted(iface.vips - vips, key=str):
                    if isinstance(vip, ipaddress.IPv6Address):
                        self._join(iface, vip, False)
                    log.info("no longer announcing %s on %s", vip, name)
                for vip in sorted(vips - iface.vips, key=str):
                    if isinstance(vip, ipaddress.IPv6Address):
                        self._join(iface, vip, True)
                    log.info("announcing %s on %s", vip, name)
                    for delay in self.burst:
                        heapq.heappush(self._pending, (now + delay, next(self._order), vip, name))
                iface.vips = set(vips)
        os.write(self._wake_w, b"x")

    def _open(self, name: str) -> _Interface:
        with entered(self.netns):
            arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(packets.ETH_P_ARP))
            ndp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(packets.ETH_P_IPV6))
            source6 = link_local(name)
            index = socket.if_nametoindex(name)
        try:
            _attach(ndp, packets.bpf_neighbour_discovery())
            arp.bind((name, packets.ETH_P_ARP))
            ndp.bind((name, packets.ETH_P_IPV6))
        except OSError:
            arp.close()
            ndp.close()
            raise
        for sock in (arp, ndp):
            sock.setblocking(False)
        mac = arp.getsockname()[4]
        return _Interface(name, arp, ndp, mac, index, source6)

    def _join(self, iface: _Interface, vip: ipaddress.IPv6Address, add: bool) -> None:
        group = packets.multicast_mac(packets.solicited_node(vip))
        try:
            _membership(iface.ndp, iface.index, group, add)
        except OSError as error:
            if add or error.errno != errno.EADDRNOTAVAIL:
                log.warning("solicited-node group of %s on %s: %s", vip, iface.name, error)

    # ---------------------------------------------------------------- answering

    def _send(self, iface: _Interface, frame: bytes) -> None:
        try:
            (iface.arp if frame[12:14] == b"\x08\x06" else iface.ndp).send(frame)
        except OSError as error:
            log.warning("sending on %s: %s", iface.name, error)

    def _announce(self, vip: IPAddress, name: str) -> None:
        iface = self._interfaces.get(name)
        if iface is None or vip not in iface.vips:
            return  # given up meanwhile
        if isinstance(vip, ipaddress.IPv4Address):
            frames = packets.gratuitous_arp(vip, iface.mac)
        else:
            frames = [packets.unsolicited_advertisement(vip, iface.mac, iface.source6 or vip)]
        for frame in frames:
            self._send(iface, frame)
        self.announcements += 1

    def _read(self, iface: _Interface, sock: socket.socket) -> None:
        for _ in range(64):  # a bounded batch, then look at the others again
            try:
                frame, address = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # ENETDOWN once when the link goes down, and the like
                log.warning("reading on %s: %s", iface.name, error)
                return
            if address[2] == PACKET_OUTGOING:
                continue
            if sock is iface.arp:
                arp = packets.parse_arp(frame)
                if arp is None:
                    continue
                if arp.sender_ip in iface.vips:  # another host's gratuitous ARP or reply
                    self._claimed(iface, arp.sender_ip, arp.sender_mac)
                elif arp.op == packets.ARP_REQUEST and arp.target_ip in iface.vips:
                    self._send(iface, packets.arp_reply(arp, iface.mac))
                    self.replies += 1
                continue
            asked = packets.parse_solicitation(frame)
            if asked is not None and asked.target in iface.vips:
                source = iface.source6 or asked.target
                self._send(iface, packets.answer(asked, iface.mac, source))
                self.replies += 1
                continue
            told = packets.parse_advertisement(frame)
            if told is not None and told[0] in iface.vips:
                self._claimed(iface, told[0], told[1])

    def _sockets(self) -> Iterator[tuple[_Interface, socket.socket]]:
        for iface in self._interfaces.values():
            yield iface, iface.arp
            yield iface, iface.ndp

    def run(self, stop: threading.Event) -> None:
        """Thread body: answer and announce until ``stop``; an error never ends it."""
        while not stop.is_set():
            try:
                self._turn()
            except Exception:  # a bug here must not leave the VIPs unanswered for good
                log.exception("responder")
                stop.wait(0.5)
        self.close()

    def _turn(self) -> None:
        with self._lock:
            for iface in self._retired:
                iface.close()
            self._retired.clear()
            owners = {sock.fileno(): (iface, sock) for iface, sock in self._sockets()}
            wait = 1.0
            if self._pending:
                wait = max(0.0, min(wait, self._pending[0][0] - time.monotonic()))
        ready, _, _ = select.select([self._wake_r, *owners], [], [], wait)
        with self._lock:
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            for fd in ready:
                if fd in owners and self._interfaces.get(owners[fd][0].name) is owners[fd][0]:
                    self._read(*owners[fd])
            now = time.monotonic()
            while self._pending and self._pending[0][0] <= now:
                _, _, vip, name = heapq.heappop(self._pending)
                self._announce(vip, name)

    def close(self) -> None:
        with self._lock:
            for iface in [*self._interfaces.values(), *self._retired]:
                iface.close()
            self._interfaces.clear()
            self._retired.clear()
            self._pending.clear()
