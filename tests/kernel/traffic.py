"""Client traffic beyond topology.Client: many source addresses, chosen source ports, resets,
datagrams from one socket, and the director's IPVS connection table.

Extra client addresses come from 198.18.0.0/15 (RFC 2544 benchmarking space, left free by the
topologies for this). They sit on the first client's ``eth0`` and the director (and, for DR and
TUN, each real server, which answers clients directly) routes them back via that client.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from tests.kernel.topology import DEFAULT_TIMEOUT, Client, Topology

EXTRA_CLIENTS = "198.18.0.0/15"
#: What a client notices when the director has no real server for it: IPVS answers the SYN
#: with ICMP port unreachable, and connect() fails with ECONNREFUSED.
REFUSED = "refused"


def add_client_addresses(topology: Topology, addresses: Sequence[str]) -> list[str]:
    """Give the first client these extra (198.18.0.0/15) addresses; return them."""
    client = topology.client
    network = ipaddress.ip_network(EXTRA_CLIENTS)
    for address in addresses:
        if ipaddress.ip_address(address) not in network:
            raise ValueError(f"{address} is outside {EXTRA_CLIENTS}")
        client.ns.add_address("eth0", address, 32)
    routers = [topology.director]
    if topology.method != "nat":
        routers += [rs.ns for rs in topology.real_servers]
    for ns in routers:
        ns.add_route(EXTRA_CLIENTS, client.addr)
    return list(addresses)


def client_addresses(count: int, third_octet: int = 0) -> list[str]:
    """``count`` addresses 198.18.<third_octet>.1, .2, …"""
    if not 0 < count < 255:
        raise ValueError("between 1 and 254 addresses per /24")
    return [f"198.18.{third_octet}.{host}" for host in range(1, count + 1)]


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def open_tcp(
    client: Client,
    vip: str,
    port: int,
    source: str = "",
    source_port: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[socket.socket | None, str]:
    """Connect from ``source``:``source_port`` (defaults: the kernel's choice) and read the
    identity; return the open socket and the identity, or (None, REFUSED)."""
    deadline = time.monotonic() + timeout
    with client.ns.entered():
        sock = socket.socket(_family(vip), socket.SOCK_STREAM)
    try:
        if source or source_port:
            sock.bind((source or ("::" if ":" in vip else "0.0.0.0"), source_port))
        sock.settimeout(timeout)
        try:
            sock.connect((vip, port))
        except ConnectionRefusedError:
            sock.close()
            return None, REFUSED
        data = b""
        while not data.endswith(b"\n"):
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(256)
            if not chunk:
                raise ConnectionError(f"[{vip}]:{port} from {source}: closed, got {data!r}")
            data += chunk
        return sock, data.decode().strip()
    except BaseException as error:
        sock.close()
        error.add_note(f"TCP from [{source or '*'}]:{source_port} to [{vip}]:{port}")
        raise


def tcp_identity(
    client: Client, vip: str, port: int, source: str = "", source_port: int = 0
) -> str:
    """One short connection: the identity of the real server that answered, or REFUSED."""
    sock, identity = open_tcp(client, vip, port, source, source_port)
    if sock is not None:
        sock.close()
    return identity


def tcp_identities_from(
    client: Client, vip: str, port: int, sources: Sequence[str]
) -> dict[str, list[str]]:
    """One short connection from each source address, in order: source → identities."""
    seen: dict[str, list[str]] = {}
    for source in sources:
        seen.setdefault(source, []).append(tcp_identity(client, vip, port, source))
    return seen


def reset(sock: socket.socket) -> None:
    """Abort a connection with a RST (SO_LINGER 0): IPVS moves its entry to CLOSE (10 s)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class Held:
    """TCP connections kept open, with the real server each reached."""

    sockets: list[socket.socket]
    identities: list[str]

    def counts(self) -> Counter[str]:
        return Counter(self.identities)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self.sockets.clear()


@contextlib.contextmanager
def held_tcp(client: Client, vip: str, port: int, count: int) -> Iterator[Held]:
    """``count`` connections opened one after another (each established before the next)
    and held; a refused one is recorded as REFUSED."""
    held = Held([], [])
    try:
        for _ in range(count):
            sock, identity = open_tcp(client, vip, port)
            if sock is not None:
                held.sockets.append(sock)
            held.identities.append(identity)
        yield held
    finally:
        held.close()


def datagrams_from_one_socket(
    client: Client, vip: str, port: int, count: int, timeout: float = DEFAULT_TIMEOUT
) -> list[str]:
    """``count`` datagrams from one UDP socket (one source port), each answered before the
    next; the identities in order."""
    deadline = time.monotonic() + timeout
    with client.ns.entered():
        sock = socket.socket(_family(vip), socket.SOCK_DGRAM)
    seen: list[str] = []
    with sock:
        sock.connect((vip, port))  # replies must come from the VIP
        for index in range(count):
            sock.send(b"who\n")
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                seen.append(sock.recv(256).decode().strip())
            except TimeoutError as error:
                raise TimeoutError(f"datagram {index + 1}/{count}: no reply") from error
    return seen


def datagram_replies(
    client: Client, vip: str, port: int, count: int, timeout: float = DEFAULT_TIMEOUT
) -> list[tuple[str, str]]:
    """``count`` datagrams from one *unconnected* socket: (identity, the reply's source
    address) for each, so a reply from somewhere other than the VIP is seen, not dropped."""
    deadline = time.monotonic() + timeout
    with client.ns.entered():
        sock = socket.socket(_family(vip), socket.SOCK_DGRAM)
    seen: list[tuple[str, str]] = []
    with sock:
        for index in range(count):
            sock.sendto(b"who\n", (vip, port))
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data, peer = sock.recvfrom(256)
            except TimeoutError as error:
                raise TimeoutError(f"datagram {index + 1}/{count}: no reply") from error
            seen.append((data.decode().strip(), str(peer[0])))
    return seen


def udp_identity(client: Client, vip: str, port: int, source: str = "") -> str:
    """One datagram from a fresh socket (new source port): the identity that answered."""
    with client.ns.entered():
        sock = socket.socket(_family(vip), socket.SOCK_DGRAM)
    with sock:
        if source:
            sock.bind((source, 0))
        sock.connect((vip, port))
        sock.send(b"who\n")
        sock.settimeout(DEFAULT_TIMEOUT)
        return sock.recv(256).decode().strip()


# ---------------------------------------------------------------- the connection table


@dataclass(frozen=True)
class Entry:
    """One line of /proc/net/ip_vs_conn (templates have client port 0 and state NONE)."""

    protocol: str
    client: str
    client_port: int
    virtual: str
    virtual_port: int
    dest: str
    dest_port: int
    state: str
    expires: int


def _address(text: str) -> str:
    if ":" in text:
        return str(ipaddress.IPv6Address(text))
    return str(ipaddress.IPv4Address(int(text, 16)))


def connection_entries(topology: Topology) -> list[Entry]:
    """The director's IPVS connection table (its own netns: /proc/thread-self)."""
    with topology.director.entered(), open("/proc/thread-self/net/ip_vs_conn") as handle:
        lines = handle.read().splitlines()[1:]
    entries = []
    for line in lines:
        f = line.split()
        client, virtual, dest = _address(f[1]), _address(f[3]), _address(f[5])
        ports = int(f[2], 16), int(f[4], 16), int(f[6], 16)
        entries.append(
            Entry(f[0], client, ports[0], virtual, ports[1], dest, ports[2], f[7], int(f[8]))
        )
    return entries


def wait_for(
    condition: Callable[[], bool], what: str, timeout: float = 30.0, interval: float = 0.2
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)  # poll interval, not synchronisation


__all__ = [
    "EXTRA_CLIENTS",
    "REFUSED",
    "Entry",
    "Held",
    "add_client_addresses",
    "client_addresses",
    "connection_entries",
    "datagram_replies",
    "datagrams_from_one_socket",
    "held_tcp",
    "open_tcp",
    "reset",
    "tcp_identities_from",
    "tcp_identity",
    "udp_identity",
    "wait_for",
]
