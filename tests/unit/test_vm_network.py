"""The lab VM's restricted network option (tests/vm/qemu.py) and its per-connection forwarder."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.vm import forward
from tests.vm.image import VMImage
from tests.vm.qemu import GuestForward, UserNetwork, qemu_command

IMAGE = VMImage("6.1.0-0-amd64", Path("/k/vmlinuz"), Path("/k/initrd"), Path("/k/modules"))


def test_default_vm_has_no_network() -> None:
    argv = qemu_command(IMAGE, Path("/share"), "run.sh")
    assert argv[argv.index("-nic") + 1] == "none"
    assert "-netdev" not in argv


def test_user_network_is_restricted_and_forwards_each_connection_to_a_program() -> None:
    network = UserNetwork((GuestForward(6443, 40001), GuestForward(7000, 40002)))
    argv = qemu_command(IMAGE, Path("/share"), "run.sh", network=network)
    assert "-nic" not in argv
    netdev = argv[argv.index("-netdev") + 1].split(",")
    assert netdev[:3] == ["user", "id=n0", "restrict=on"]
    assert "net=198.18.0.0/24" in netdev
    forwarder = f"{sys.executable} {Path(forward.__file__)}"
    assert f"guestfwd=tcp:198.18.0.10:6443-cmd:{forwarder} 40001" in netdev
    assert f"guestfwd=tcp:198.18.0.10:7000-cmd:{forwarder} 40002" in netdev
    assert argv[argv.index("-device", argv.index("-netdev")) + 1].startswith("virtio-net-pci,")
    assert "ip addr add 198.18.0.15/24 dev eth0 || exit 125" in network.guest_setup()


def test_forwarder_pumps_both_ways_and_passes_half_closes_on() -> None:
    """What qemu does: the guest's connection on fds 0-2 of a forwarder per connection."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        guest, qemu_end = socket.socketpair()
        proc = subprocess.Popen(
            [sys.executable, forward.__file__, str(port)],
            stdin=qemu_end.fileno(), stdout=qemu_end.fileno(), stderr=qemu_end.fileno(),
        )  # fmt: skip
        qemu_end.close()
        conn, _ = server.accept()
        received: list[bytes] = []

        def host_side() -> None:
            with conn:
                data = b""
                while chunk := conn.recv(100):
                    data += chunk
                received.append(data)
                conn.sendall(b"pong:" + data)

        thread = threading.Thread(target=host_side)
        thread.start()
        guest.sendall(b"ping")
        guest.shutdown(socket.SHUT_WR)  # the host sees end of file, yet can still answer
        reply = b""
        guest.settimeout(10)
        while chunk := guest.recv(100):
            reply += chunk
        thread.join(10)
        guest.close()
        assert proc.wait(10) == 0
    assert received == [b"ping"]
    assert reply == b"pong:ping"
