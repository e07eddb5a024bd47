"""The lab and node beds' wait for the VM to call home (tests/e2e/bed.py ``await_call_home``).

A VM that never calls home must fail the bed with how it ended and its console's tail, the
kernel's own report of a panic or a stall, rather than a bare timeout. A real child process
stands in for qemu; the listener is a real socket on loopback.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.bed import LabError, await_call_home
from tests.unit.test_vm_network import IMAGE
from tests.vm.qemu import qemu_command


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock


def vm(seconds: float) -> tuple[subprocess.Popen[bytes], threading.Thread]:
    """A stand-in qemu that runs ``seconds``, waited on by a thread as the beds' boot thread."""
    proc = subprocess.Popen(["sleep", str(seconds)])
    thread = threading.Thread(target=proc.wait, daemon=True)
    thread.start()
    return proc, thread


def test_a_vm_that_calls_home_gives_its_connection(listener: socket.socket) -> None:
    proc, thread = vm(60)
    try:
        with socket.create_connection(listener.getsockname()):
            conn = await_call_home(listener, thread, lambda: proc, lambda: "unused", 10)
            conn.close()
        assert proc.poll() is None
    finally:
        proc.kill()


def test_a_vm_that_ends_first_fails_with_how_it_ended(listener: socket.socket) -> None:
    _, thread = vm(0)
    with pytest.raises(LabError, match="ended before it called home: Kernel panic"):
        await_call_home(listener, thread, lambda: None, lambda: "Kernel panic - not syncing", 30)


def test_a_silent_vm_is_killed_and_fails_with_its_console(listener: socket.socket) -> None:
    proc, thread = vm(60)
    with pytest.raises(LabError, match="did not call home within 1s: BUG: soft lockup"):
        await_call_home(listener, thread, lambda: proc, lambda: "BUG: soft lockup - CPU#1", 1)
    assert proc.wait(timeout=10) != 0, "qemu is killed, so the console log is complete"
    assert not thread.is_alive()


def test_the_guest_kernel_panics_on_a_soft_lockup_and_a_hung_task() -> None:
    argv = qemu_command(IMAGE, Path("/share"), "run.sh")
    line = argv[argv.index("-append") + 1].split()
    assert {"softlockup_panic=1", "hung_task_panic=1", "panic=-1"} <= set(line)
