"""Boot the IPVS test VM and run one command in it against this checkout.

The VM (see image.py) sees the host's root read-only over 9p with a tmpfs overlay,
so the checkout, its venv and the host's tools are all there under the same paths
without copying anything. A second, writable 9p share (``share_dir`` on the host,
``/run/ipvs-vm`` inside) carries the command script in and the results out. By default the
VM has no network interface (``-nic none``): tests build their own namespaces. With a
``UserNetwork`` it gets one restricted qemu user-mode NIC (``eth0``) that reaches nothing
but the host loopback ports it forwards (``guestfwd``) — the lab's way to the API server.

Command line use (console streamed to stderr)::

    python -m tests.vm.qemu -- python -m pytest tests/kernel -x
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.vm.image import Log as Log
from tests.vm.image import VMBuildError, VMImage, cache_dir, ensure_image, stderr_log

CHECKOUT = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT = 1800.0
SHARE_IN_VM = "/run/ipvs-vm"
EXIT_MARKER = "IPVS-VM-EXIT="
KEEP_LOGS = 20
ANSI_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[A-Za-z])")  # SeaBIOS's terminal codes
OVERMOUNTED = ("/tmp/", "/run/", "/dev/")


class VMBootError(RuntimeError):
    """qemu could not be started at all."""


@dataclass(frozen=True)
class GuestForward:
    """Guest connections to ``UserNetwork.forward_address:guest_port`` reach 127.0.0.1:host_port.

    Each connection gets its own forwarder process (``guestfwd=...-cmd:``, see
    tests/vm/forward.py): a ``guestfwd`` to a ``tcp:`` chardev is one host connection for
    the VM's whole life, which every guest connection would share.
    """

    guest_port: int
    host_port: int


@dataclass(frozen=True)
class UserNetwork:
    """One qemu user-mode NIC with ``restrict=on``: no route out, only the given forwards.

    The guest's ``eth0`` gets ``guest_address`` (static; slirp's DHCP is not needed) in
    ``net``, a documentation range; there is no default route, so nothing but the forwards
    answers.
    """

    forwards: tuple[GuestForward, ...]
    net: str = "198.18.0.0/24"
    guest_address: str = "198.18.0.15"
    forward_address: str = "198.18.0.10"

    def qemu_args(self) -> list[str]:
        """``-netdev``/``-device`` arguments for this network."""
        forwarder = f"{sys.executable} {Path(__file__).with_name('forward.py')}"
        if any(ch.isspace() or ch == "," for ch in str(Path(__file__).parent)):
            raise VMBootError(f"path unfit for a qemu option: {Path(__file__).parent}")
        netdev = [f"user,id=n0,restrict=on,net={self.net}"]
        netdev += [
            f"guestfwd=tcp:{self.forward_address}:{f.guest_port}-cmd:{forwarder} {f.host_port}"
            for f in self.forwards
        ]
        return ["-netdev", ",".join(netdev), "-device", "virtio-net-pci,netdev=n0,romfile="]

    def guest_setup(self) -> list[str]:
        """Shell lines for the run script: driver, address, link up (no udev in the VM)."""
        prefix = self.net.rsplit("/", 1)[1]
        return [
            "modprobe virtio_net || exit 125",
            f"ip addr add {self.guest_address}/{prefix} dev eth0 || exit 125",
            "ip link set eth0 up || exit 125",
        ]


@dataclass
class VMRun:
    """Outcome of one VM run; exit_code is None when the command never finished."""

    exit_code: int | None
    timed_out: bool
    duration: float
    console_log: Path
    share_dir: Path

    def console_tail(self, lines: int = 80) -> str:
        """Last console lines, with the serial line's carriage returns removed."""
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError as error:
            return f"(console log {self.console_log} unreadable: {error})"
        text = ANSI_ESCAPE.sub("", text.replace("\r\n", "\n"))
        clean = [line.rstrip("\r") for line in text.split("\n")]
        return "\n".join(clean[-lines:])

    def describe(self) -> str:
        """One line saying how the VM run ended."""
        if self.timed_out:
            how = f"timed out after {self.duration:.0f}s and was killed"
        elif self.exit_code is None:
            how = f"ended after {self.duration:.0f}s without reporting an exit status"
        else:
            how = f"exited with status {self.exit_code} after {self.duration:.0f}s"
        return f"the IPVS test VM {how} (full console log: {self.console_log})"


def vm_timeout() -> float:
    """Overall VM timeout in seconds from IPVS_VM_TIMEOUT (default 1800)."""
    raw = os.environ.get("IPVS_VM_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        return DEFAULT_TIMEOUT


def _venv_bin() -> list[str]:
    """The running interpreter's bin folders, so the VM finds the same tools."""
    found = [str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent)]
    return list(dict.fromkeys(found))


def _write_script(
    share_dir: Path,
    argv: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    network: UserNetwork | None = None,
) -> str:
    """Write the shell script the VM's init runs inside the chroot; return its name."""
    path_entries = [
        *_venv_bin(),
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    variables = {
        "PATH": ":".join(dict.fromkeys(path_entries)),
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "IPVS_IN_VM": "1",
        "IPVS_VM_SHARE": SHARE_IN_VM,
        **env,
    }
    lines = ["# generated by tests/vm/qemu.py", "set -u"]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in variables.items()]
    lines += [
        "ip link set lo up 2>/dev/null",
        *(network.guest_setup() if network else []),
        f"cd {shlex.quote(str(cwd))} || exit 125",
        shlex.join(argv),
    ]
    name = "run.sh"
    (share_dir / name).write_text("\n".join(lines) + "\n")
    return name


def _new_console_log() -> Path:
    """A fresh console log path; keeps only the most recent KEEP_LOGS logs."""
    logs = cache_dir() / "logs"
    logs.mkdir(exist_ok=True)
    old = sorted(logs.glob("console-*.log"))
    for stale in old[: max(0, len(old) - KEEP_LOGS + 1)]:
        stale.unlink(missing_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return logs / f"console-{stamp}-{os.getpid()}.log"


def paths_to_keep(paths: Sequence[Path]) -> list[str]:
    """Those of ``paths`` under a folder the VM mounts afresh (/tmp, /run, /dev).

    A CI clone or venv under /tmp would otherwise be hidden by the VM's tmpfs.
    """
    kept: list[Path] = []
    for path in sorted((p.resolve() for p in paths), key=lambda p: len(p.parts)):
        inside = any(path.is_relative_to(parent) for parent in kept)
        if str(path).startswith(OVERMOUNTED) and not inside:
            kept.append(path)
    return [str(path) for path in kept]


def qemu_command(
    image: VMImage,
    share_dir: Path,
    script: str,
    keep: Sequence[str] = (),
    network: UserNetwork | None = None,
    memory_mb: int = 2048,
) -> list[str]:
    """The qemu argv: TCG (KVM hangs here), no NIC (or ``network``), host root ro + share rw."""
    for path in (str(image.modules), str(share_dir), *keep):
        if any(ch.isspace() or ch == "," for ch in path):
            raise VMBootError(f"path unfit for the kernel command line (space or comma): {path}")
    append = " ".join(
        [
            "console=ttyS0",
            "quiet",
            "panic=-1",
            # A task stuck for 120 s (a kernel deadlock) ends the run at once, with its
            # report on the console, instead of at the suite's timeout an hour later.
            "hung_task_panic=1",
            # So does a CPU stuck in the kernel for 20 s (a soft lockup, seen once under TCG
            # in runc's start); the panic prints the stuck CPU's stack, which quiet hides.
            "softlockup_panic=1",
            f"ipvsvm_kver={image.kernel_version}",
            f"ipvsvm_modtree={image.modules}",
            f"ipvsvm_run={script}",
            *([f"ipvsvm_keep={','.join(keep)}"] if keep else []),
            *os.environ.get("IPVS_VM_APPEND", "").split(),
        ]
    )
    return [
        QEMU,
        "-accel", "tcg,thread=multi",
        "-cpu", os.environ.get("IPVS_VM_CPU", "max"),
        "-smp", "2",
        "-m", str(memory_mb),
        "-nographic",
        *(network.qemu_args() if network else ["-nic", "none"]),
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        "-append", append,
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={share_dir},mount_tag=ipvsout,security_model=none,multidevs=remap",
    ]  # fmt: skip


#: qemu processes running now; any left at interpreter exit are killed (see _supervise).
_running: set[subprocess.Popen[bytes]] = set()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL qemu's whole process group (its guestfwd forwarders too) and reap qemu.

    qemu leads a session of its own, so a terminal's Ctrl-C reaches only this process and
    nothing else ever kills qemu: whoever started it must.
    """
    if proc.returncode is None:  # still ours: its group cannot have been reused
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@atexit.register
def _kill_leftovers() -> None:
    """At interpreter exit, kill the qemu of a run still going in some thread."""
    for proc in list(_running):
        _kill_group(proc)


def exit_on_signals() -> None:
    """Make SIGTERM and SIGINT end the command line like an exception (status 128 + signal),
    so that what it started is stopped on the way out instead of left running: run_in_vm
    kills qemu, a LocalApiServer stops its API server and etcd (the benches that boot
    either call this first). A second signal is ignored, so it cannot cut that short."""

    def stop(signum: int, frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, stop)


def _supervise(
    command: Sequence[str],
    sink: IO[bytes],
    limit: float,
    echo: bool = False,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> bool:
    """Run qemu until it exits, its console copied to ``sink``; True if it outlived ``limit``
    seconds and was killed. Whatever else ends this early (KeyboardInterrupt, the command
    line's SIGTERM, an exception in ``on_start``) kills qemu's process group first, and so
    does interpreter exit while a thread waits here."""
    try:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    except OSError as error:
        raise VMBootError(f"cannot start {command[0]}: {error}") from error
    _running.add(proc)
    pump = threading.Thread(target=_pump, args=(proc.stdout, sink, echo), daemon=True)
    pump.start()
    try:
        if on_start is not None:
            on_start(proc)
        proc.wait(timeout=limit)
        return False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return True
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        _running.discard(proc)
        pump.join(timeout=10)


def _pump(source: IO[bytes], sink: IO[bytes], echo: bool) -> None:
    """Copy the serial console into the log file (and to stderr when asked)."""
    for chunk in iter(lambda: source.read1(65536), b""):  # type: ignore[attr-defined]
        sink.write(chunk)
        sink.flush()
        if echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()


def run_in_vm(
    argv: Sequence[str],
    share_dir: Path,
    *,
    cwd: Path = CHECKOUT,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    echo: bool = False,
    log: Log = stderr_log,
    network: UserNetwork | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
    memory_mb: int = 2048,
) -> VMRun:
    """Boot the VM, run ``argv`` in ``cwd`` inside it, and wait for power-off.

    ``network`` gives the VM a restricted NIC (see UserNetwork); ``on_start`` receives the
    qemu process once it runs, so a caller running this in a thread can kill it;
    ``memory_mb`` is the VM's memory (the node bed's containerd holds images in tmpfs).
    Raises VMBuildError / VMBootError when the VM cannot be prepared or started;
    everything that goes wrong after boot is in the returned VMRun instead.
    """
    if shutil.which(QEMU) is None:
        raise VMBootError(f"{QEMU} not found on the host (apt-get install qemu-system-x86)")
    image = ensure_image(log)
    share_dir = share_dir.resolve()
    script = _write_script(share_dir, argv, cwd.resolve(), env or {}, network)
    keep = paths_to_keep([CHECKOUT, cwd, Path(sys.prefix), Path(sys.base_prefix)])
    command = qemu_command(image, share_dir, script, keep, network, memory_mb)
    limit = vm_timeout() if timeout is None else timeout
    console_log = _new_console_log()
    log(f"booting {image.kernel_version} under qemu (TCG; timeout {limit:.0f}s)")
    started = time.monotonic()
    with open(console_log, "wb") as sink:
        sink.write(f"# {shlex.join(command)}\n".encode())
        sink.flush()
        timed_out = _supervise(command, sink, limit, echo, on_start)
    duration = time.monotonic() - started
    exit_code = _read_exit_code(share_dir, console_log)
    if timed_out:
        exit_code = None
    log(f"VM finished in {duration:.1f}s, exit status {exit_code}")
    return VMRun(exit_code, timed_out, duration, console_log, share_dir)


def _read_exit_code(share_dir: Path, console_log: Path) -> int | None:
    """Exit status from the share, else from the console marker, else None."""
    status = share_dir / "exit-status"
    try:
        return int(status.read_text().strip())
    except (OSError, ValueError):
        pass
    text = console_log.read_text(errors="replace")
    for line in reversed(text.splitlines()):
        if EXIT_MARKER in line:
            value = line.split(EXIT_MARKER, 1)[1].strip()
            if value.isdigit():
                return int(value)
    return None


def main() -> int:
    """CLI: run a command in the VM from the current directory, streaming the console."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args()
    exit_on_signals()
    with tempfile.TemporaryDirectory(prefix="ipvs-vm-") as tmp:
        try:
            run = run_in_vm(
                args.command, Path(tmp), cwd=Path.cwd(), timeout=args.timeout, echo=True
            )
        except (VMBuildError, VMBootError) as error:
            print(f"ipvs-vm: {error}", file=sys.stderr)
            return 125
    print(f"\nipvs-vm: {run.describe()}", file=sys.stderr)
    return 124 if run.exit_code is None else run.exit_code


if __name__ == "__main__":
    sys.exit(main())
