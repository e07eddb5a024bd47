"""One guest connection of a qemu ``guestfwd=...-cmd:`` forward, pumped to a host port.

qemu (libslirp) starts this program for every TCP connection the guest makes to a
forwarded address, with that connection as a socket on fds 0, 1 and 2; it connects to
127.0.0.1:PORT and copies bytes both ways, passing half-closes on, until both sides are
done. Nothing may be written to stdout/stderr: they are the guest's connection.

    python tests/vm/forward.py PORT
"""

from __future__ import annotations

import selectors
import socket
import sys


def pump(guest: socket.socket, host: socket.socket) -> None:
    """Copy until both directions reached end of file (or one side failed)."""
    peer = {guest: host, host: guest}
    selector = selectors.DefaultSelector()
    for sock in peer:
        selector.register(sock, selectors.EVENT_READ)
    open_reads = 2
    while open_reads:
        for key, _ in selector.select():
            source = key.fileobj
            assert isinstance(source, socket.socket)
            try:
                data = source.recv(65536)
            except OSError:
                return
            if data:
                try:
                    peer[source].sendall(data)
                except OSError:
                    return
                continue
            selector.unregister(source)
            open_reads -= 1
            try:
                peer[source].shutdown(socket.SHUT_WR)
            except OSError:
                return


def main(argv: list[str]) -> int:
    """Forward fd 0 (the guest's connection) to 127.0.0.1:argv[0]."""
    port = int(argv[0])
    guest = socket.socket(fileno=0)
    try:
        host = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        guest.close()
        return 1
    host.settimeout(None)
    with guest, host:
        pump(guest, host)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
