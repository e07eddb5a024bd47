"""The ExaBGP process: started with a configuration, spoken to line by line, stopped.

ExaBGP runs as a child of the agent, in the agent's network namespace (the node's), with a
configuration file written to a private directory (mode 0700: it holds the sessions' MD5
passwords). Its API helper (``relay.py``) connects back to a Unix socket there, so the agent
reads ExaBGP's acknowledgements and session changes and writes commands on one connection.
The child gets ``PR_SET_PDEATHSIG``: if the agent dies, ExaBGP dies with it and its sessions
close, so no router keeps routes to a node whose agent is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ipvs_agent.announce.bgp import exabgp
from ipvs_agent.announce.bgp.policy import Session

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
RELAY = Path(__file__).with_name("relay.py")


class DriverError(OSError):
    """ExaBGP could not be started or stopped answering."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def exabgp_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """ExaBGP's settings (its environment variables): stay root (the agent is), no CLI pipes,
    log to standard output for the agent to pass on but not its per-message statistics (two
    lines per keepalive, each way, would drown the agent's log), acknowledge every command."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "exabgp_daemon_user": "root",
            "exabgp_daemon_drop": "false",
            "exabgp_daemon_daemonize": "false",
            "exabgp_cli_enable": "false",
            "exabgp_api_ack": "true",
            "exabgp_api_respawn": "false",
            "exabgp_log_destination": "stdout",
            "exabgp_log_level": "INFO",
            "exabgp_log_statistics": "false",
        }
    )
    return env


class ExaBGP:
    """One running ExaBGP with its helper's connection; ``on_event`` gets every parsed line
    (from the reader thread)."""

    def __init__(
        self,
        workdir: Path,
        sessions: Sequence[Session],
        on_event: Callable[[exabgp.Event], None],
        start_timeout: float = 120.0,
        command: Sequence[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.sessions = tuple(sessions)
        self.on_event = on_event
        self.start_timeout = start_timeout
        self.command = list(command or [sys.executable, "-m", "exabgp"])
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: socket.socket | None = None
        self._acks: list[bool] = []
        self._ack_ready = threading.Condition()
        self._closed = threading.Event()

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Write the configuration, start ExaBGP and wait for its helper to connect."""
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.workdir, 0o700)
        path = self.workdir / "relay.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        config = self.workdir / "exabgp.conf"
        helper = [sys.executable, "-I", str(RELAY), str(path)]
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(exabgp.render_config(self.sessions, helper))
        try:
            self._proc = subprocess.Popen(
                [*self.command, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=exabgp_environment(),
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        except OSError as error:
            listener.close()
            raise DriverError(error.errno or 0, f"cannot start ExaBGP: {error}") from error
        threading.Thread(target=self._log_output, name="exabgp-log", daemon=True).start()
        listener.settimeout(1.0)
        deadline = time.monotonic() + self.start_timeout
        try:
            while self._conn is None:
                if self._proc.poll() is not None:
                    raise DriverError(0, f"ExaBGP exited with status {self._proc.returncode}")
                if time.monotonic() > deadline:
                    raise DriverError(0, "ExaBGP's helper did not connect in time")
                with contextlib.suppress(TimeoutError):
                    self._conn, _ = listener.accept()
        except DriverError:
            self.stop()
            raise
        finally:
            listener.close()
        self._conn.settimeout(None)
        threading.Thread(target=self._read, name="exabgp-api", daemon=True).start()
        log.info("ExaBGP started (pid %d) with %d session(s)", self._proc.pid, len(self.sessions))

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._closed.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ExaBGP: SIGTERM (it closes its sessions with a NOTIFICATION, so routers drop
        the routes at once), SIGKILL after ``timeout``."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("ExaBGP did not stop in %.0f s: killing it", timeout)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)

    # --- commands -------------------------------------------------------------------------

    def send(self, lines: Sequence[str], timeout: float = 30.0) -> list[bool]:
        """Send API lines and wait for ExaBGP's acknowledgement of each, in order."""
        conn = self._conn
        if conn is None or not lines:
            return [False] * len(lines)
        with self._ack_ready:
            self._acks.clear()
        try:
            conn.sendall("".join(f"{line}\n" for line in lines).encode())
        except OSError as error:
            log.warning("ExaBGP's helper is gone: %s", error)
            self._closed.set()
            return [False] * len(lines)
        deadline = time.monotonic() + timeout
        with self._ack_ready:
            while len(self._acks) < len(lines) and not self._closed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ack_ready.wait(min(left, 1.0))
            got = self._acks[: len(lines)]
            del self._acks[: len(lines)]
        return got + [False] * (len(lines) - len(got))

    # --- threads --------------------------------------------------------------------------

    def _read(self) -> None:
        conn = self._conn
        buffer = b""
        while conn is not None:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                event = exabgp.parse(raw.decode("utf-8", "replace"))
                if isinstance(event, exabgp.Ack):
                    with self._ack_ready:
                        self._acks.append(event.ok)
                        self._ack_ready.notify_all()
                elif event is not None:
                    self.on_event(event)
        self._closed.set()
        with self._ack_ready:
            self._ack_ready.notify_all()
        self.on_event(None)

    def _log_output(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        for raw in proc.stdout:
            text = raw.decode("utf-8", "replace").rstrip()
            if text:
                log.info("exabgp: %s", text)
