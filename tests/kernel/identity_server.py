"""A real server that answers with its own name, so tests can count where traffic went.

TCP: on accept it sends ``<name>\\n`` at once and then holds the connection until the
client closes it (or sends ``close``), so a client decides between short and held
connections (the latter are "active" for lc/wlc/sed/nq tests). A held connection that sends
``ping`` gets ``<name>\\n`` again: the client proves it still reaches the same server.
UDP: every datagram is answered with ``<name>\\n`` from the address it was sent to
(IP_PKTINFO), as a DR/TUN real server must answer from the VIP, not its own address.

It listens on IPv4 and IPv6 wildcard addresses. topology.py runs it in a forked
child inside a real server's netns (cheap under TCG); ``python -m
tests.kernel.identity_server`` runs it standalone (prints ``ready`` once bound).
"""

from __future__ import annotations

import argparse
import selectors
import socket
import struct
import sys
from collections.abc import Callable, Sequence

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = socket.IPV6_RECVPKTINFO
IPV6_PKTINFO = socket.IPV6_PKTINFO
ANCILLARY_SPACE = socket.CMSG_SPACE(32)


def _listeners(tcp_ports: Sequence[int], udp_ports: Sequence[int]) -> list[socket.socket]:
    """Bound sockets: one per (family, protocol, port)."""
    made: list[socket.socket] = []
    for family, anyaddr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        for kind, ports in ((socket.SOCK_STREAM, tcp_ports), (socket.SOCK_DGRAM, udp_ports)):
            for port in ports:
                sock = socket.socket(family, kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == socket.SOCK_DGRAM:
                    if family == socket.AF_INET:
                        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                    else:
                        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                sock.bind((anyaddr, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(4096)
                sock.setblocking(False)
                made.append(sock)
    return made


def _answer_datagram(sock: socket.socket, payload: bytes) -> None:
    """Reply to one datagram from the address it was addressed to."""
    try:
        _, ancillary, _, peer = sock.recvmsg(2048, ANCILLARY_SPACE)
    except BlockingIOError:
        return
    reply_ancillary = []
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
            # struct in_pktinfo {int ifindex; in_addr spec_dst; in_addr addr}
            destination = data[8:12]
            reply_ancillary.append((level, kind, struct.pack("=i4s4s", 0, destination, b"\0" * 4)))
        elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
            # struct in6_pktinfo {in6_addr addr; int ifindex}
            reply_ancillary.append((level, kind, data[:16] + struct.pack("=i", 0)))
    sock.sendmsg([payload], reply_ancillary, 0, peer)


def serve(
    name: str,
    tcp_ports: Sequence[int],
    udp_ports: Sequence[int],
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve forever; call on_ready once every socket is bound."""
    payload = f"{name}\n".encode()
    selector = selectors.DefaultSelector()
    listeners = _listeners(tcp_ports, udp_ports)
    for sock in listeners:
        selector.register(sock, selectors.EVENT_READ, "listener")
    if on_ready is not None:
        on_ready()
    while True:
        for key, _ in selector.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            if key.data == "listener" and sock.type == socket.SOCK_DGRAM:
                _answer_datagram(sock, payload)
            elif key.data == "listener":
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                try:
                    conn.send(payload)
                except OSError:
                    conn.close()
                    continue
                selector.register(conn, selectors.EVENT_READ, "connection")
            else:
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data or data.startswith(b"close"):
                    selector.unregister(sock)
                    sock.close()
                elif data.startswith(b"ping"):
                    try:
                        sock.send(payload)
                    except OSError:
                        selector.unregister(sock)
                        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: serve with the given name and ports."""
    parser = argparse.ArgumentParser(description="identity server for IPVS kernel tests")
    parser.add_argument("--name", required=True)
    parser.add_argument("--tcp", type=int, action="append", default=[])
    parser.add_argument("--udp", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    serve(args.name, args.tcp, args.udp, on_ready=lambda: print("ready", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
