"""qemu never outlives the run that started it (tests/vm/qemu.py), shown without a VM: a shell
that starts a child of its own (as qemu starts its guestfwd forwarders) stands in for qemu."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.operator.harness import wait_for
from tests.vm import qemu

CHECKOUT = Path(__file__).resolve().parents[2]
#: A stand-in for qemu: prints its own pid and its child's, then waits for ever.
FAKE_QEMU = ["sh", "-c", 'sleep 600 & echo "child $!"; echo "leader $$"; wait']
DEADLINE = 20.0

#: The parent process: supervises FAKE_QEMU (console to argv[2]) as argv[1] says. SIGUSR1
#: dumps its threads' stacks, for a parent that does not end (see ``status``).
PARENT = """
import faulthandler, signal, sys, threading
from tests.vm import qemu

faulthandler.register(signal.SIGUSR1, all_threads=True)

mode, console = sys.argv[1], sys.argv[2]
with open(console, "wb") as sink:
    if mode == "command line":
        qemu.exit_on_signals()
        qemu._supervise(FAKE, sink, 600)
    elif mode == "library":
        qemu._supervise(FAKE, sink, 600)
    else:  # "exit": the run is in a thread when the interpreter ends
        threading.Thread(target=qemu._supervise, args=(FAKE, sink, 600), daemon=True).start()
        sys.stdin.read()
"""


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie waiting for its reaper has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def pids(console: Path) -> dict[str, int]:
    """The fake qemu's pid ("leader") and its child's, once it printed both."""
    try:
        lines = console.read_text().split("\n")
    except FileNotFoundError:
        return {}
    found = dict(line.split() for line in lines if line.count(" ") == 1)
    return {k: int(v) for k, v in found.items()} if len(found) == 2 else {}


def kill(pids: Iterable[int]) -> None:
    """Kill what a failed test left running."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def status(proc: subprocess.Popen[bytes]) -> int:
    """The parent's exit status; if it has not ended within DEADLINE, fail with where each of
    its threads is (Python stacks from faulthandler, kernel wait channels): a hang seen once
    in CI (SIGINT, 2026-12-05) could not be reproduced, so a recurrence must say where."""
    try:
        return proc.wait(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pass
    stderr = Path(f"/proc/{proc.pid}/fd/2").resolve()
    channels = {
        task.name: (task / "wchan").read_text() for task in Path(f"/proc/{proc.pid}/task").iterdir()
    }
    proc.send_signal(signal.SIGUSR1)
    wait_for(
        "its threads' stacks", lambda: "most recent call first" in stderr.read_text(), DEADLINE
    )
    raise AssertionError(
        f"the parent did not end within {DEADLINE}s; wait channels {channels}; "
        f"stderr:\n{stderr.read_text()}"
    )


@contextlib.contextmanager
def parent(mode: str, console: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    """The parent running in ``mode``, once its fake qemu runs (stderr to the file beside
    ``console``); whatever is left is killed."""
    code = f"FAKE = {FAKE_QEMU!r}\n{PARENT}"
    with (console.parent / "stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, mode, str(console)],
            cwd=CHECKOUT, stdin=subprocess.PIPE, stderr=stderr,
        )  # fmt: skip
    found: dict[str, int] = {}
    try:
        found.update(wait_for("the fake qemu to start", lambda: pids(console), DEADLINE))
        yield proc, found
    finally:
        proc.kill()
        proc.wait()
        kill(found.values())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_command_line_kills_qemu_and_its_children_when_it_is_signalled(
    tmp_path: Path, signum: int
) -> None:
    with parent("command line", tmp_path / "console") as (proc, found):
        proc.send_signal(signum)
        assert status(proc) == 128 + signum, (tmp_path / "stderr").read_text()
        wait_for("qemu and its child to end", lambda: all(map(gone, found.values())), DEADLINE)


def test_an_interrupted_run_kills_qemu_and_its_children(tmp_path: Path) -> None:
    with parent("library", tmp_path / "console") as (proc, found):
        proc.send_signal(signal.SIGINT)  # KeyboardInterrupt, as in pytest
        status(proc)
        wait_for("qemu and its child to end", lambda: all(map(gone, found.values())), DEADLINE)


def test_interpreter_exit_kills_a_run_still_going_in_a_thread(tmp_path: Path) -> None:
    with parent("exit", tmp_path / "console") as (proc, found):
        assert proc.stdin is not None
        proc.stdin.close()
        assert status(proc) == 0, (tmp_path / "stderr").read_text()
        wait_for("qemu and its child to end", lambda: all(map(gone, found.values())), DEADLINE)


def test_a_run_past_its_limit_kills_qemu_and_its_children(tmp_path: Path) -> None:
    console = tmp_path / "console"
    found: dict[str, int] = {}

    def started(proc: subprocess.Popen[bytes]) -> None:  # the limit counts from here
        found.update(wait_for("the fake qemu to start", lambda: pids(console), DEADLINE))

    try:
        with console.open("wb") as sink:
            assert qemu._supervise(FAKE_QEMU, sink, 0.2, on_start=started)
        wait_for("qemu and its child to end", lambda: all(map(gone, found.values())), DEADLINE)
        assert not qemu._running
    finally:
        kill(found.values())


def test_an_exception_in_on_start_kills_qemu(tmp_path: Path) -> None:
    started: list[int] = []

    def on_start(proc: subprocess.Popen[bytes]) -> None:
        started.append(proc.pid)
        raise RuntimeError("the caller failed")

    try:
        with (tmp_path / "console").open("wb") as sink, pytest.raises(RuntimeError):
            qemu._supervise(FAKE_QEMU, sink, 600, on_start=on_start)
        wait_for("the fake qemu to end", lambda: gone(started[0]), DEADLINE)
        assert not qemu._running
    finally:
        kill(started)
