"""Run host-networking work inside a network namespace, in the calling thread only.

Netlink sockets opened and processes started while a thread is inside a namespace stay bound to
it, so entering briefly is all the classes of this package need. ``setns(2)`` applies to one
thread, which leaves the rest of the agent (and its event loop) where it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator, Sequence

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


class HostError(RuntimeError):
    """A host-networking change could not be made (the message says which and why)."""


def netns_path(netns: str) -> str:
    """A namespace name (as ``ip netns`` names it) or a path such as ``/proc/PID/ns/net``."""
    return netns if "/" in netns else f"{NETNS_RUN_DIR}/{netns}"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Move the current thread into ``netns`` for the block (``None``: stay where it is)."""
    if netns is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(netns), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def run(
    argv: Sequence[str], *, netns: str | None = None, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command born in ``netns``; the caller looks at the return code."""
    with entered(netns):
        try:
            return subprocess.run(
                list(argv),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as error:
            raise HostError(f"{argv[0]} is not installed: {error}") from error
