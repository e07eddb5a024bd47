"""Real servers and clients for the health-check and feedback tests inside the VM.

A :class:`RealServer` runs in a forked child in a real server's network namespace (a fresh
Python would cost seconds under TCG) and answers a control channel, so a test can stop its
listeners while established connections live on, script its HTTP health answers, and read
what it served. It can serve, all in one event loop:

- TCP identity ports: ``<name>\\n`` on accept, then ``pong <name>\\n`` for every ``ping``
  line, until the client closes — a held connection shows it was never reset;
- an HTTP health endpoint whose status codes follow a script (for flapping);
- UDP ports: ``pong <name>`` for ``ping``, else ``<name>``; a DNS port answering every query
  NOERROR with one A record;
- a feedback agent (HAProxy agent-check): ``N%`` free capacity, measured as below;
- a work port of fixed capacity: ``slots`` requests at a time, each held ``service`` seconds,
  the rest queued, so a weak and a strong real server differ in capacity as real ones do;
  the server measures its own utilisation (busy slot-seconds over the last ``window``).

:func:`offered_load` is the bounded open-loop load generator (a forked child in a client
namespace): requests at a fixed rate, each latency measured, stopped by count and deadline.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import json
import os
import selectors
import signal
import socket
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from tests.kernel.topology import Lab, Netns

CONTROL_TIMEOUT = 30.0


@dataclass
class Config:
    name: str
    tcp_ports: list[int] = field(default_factory=list)
    udp_ports: list[int] = field(default_factory=list)
    http_port: int = 0
    http_statuses: list[int] = field(default_factory=lambda: [200])
    dns_port: int = 0
    agent_port: int = 0
    #: A fixed answer of the feedback agent ("" = measured free capacity).
    agent_answer: str = ""
    work_port: int = 0
    slots: int = 1
    service: float = 0.1
    window: float = 2.0


class _Server:
    """The child's event loop (never returns)."""

    def __init__(self, config: Config, control: socket.socket) -> None:
        self.c = config
        self.control = control
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[str, list[socket.socket]] = {}
        self.http_requests = 0
        self.served = 0
        self.queue: collections.deque[socket.socket] = collections.deque()
        self.busy: list[tuple[float, int, socket.socket]] = []  # (done at, seq, conn)
        self.seq = 0
        self.busy_integral = 0.0
        self.busy_since = time.monotonic()
        self.samples: collections.deque[tuple[float, float]] = collections.deque()
        self.buffers: dict[socket.socket, bytes] = {}
        #: Work connections that carry several requests (``keep`` lines), a session each.
        self.keep: set[socket.socket] = set()
        self.sel.register(control, selectors.EVENT_READ, ("control", None))

    # ------------------------------------------------------------ sockets

    def _bind(self, kind: int, port: int, role: str) -> None:
        for family, anyaddr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = socket.socket(family, kind)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((anyaddr, port))
            if kind == socket.SOCK_STREAM:
                sock.listen(1024)
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, (role, None))
            self.listeners.setdefault(role, []).append(sock)

    def open(self, roles: set[str] | None = None) -> None:
        c = self.c
        wanted = [
            *((socket.SOCK_STREAM, p, "tcp") for p in c.tcp_ports),
            *((socket.SOCK_DGRAM, p, "udp") for p in c.udp_ports),
            *([(socket.SOCK_STREAM, c.http_port, "http")] if c.http_port else []),
            *([(socket.SOCK_DGRAM, c.dns_port, "dns")] if c.dns_port else []),
            *([(socket.SOCK_STREAM, c.agent_port, "agent")] if c.agent_port else []),
            *([(socket.SOCK_STREAM, c.work_port, "work")] if c.work_port else []),
        ]
        for kind, port, role in wanted:
            if (roles is None or role in roles) and role not in self.listeners:
                self._bind(kind, port, role)

    def close(self, roles: set[str] | None = None) -> None:
        for role in list(self.listeners):
            if roles is None or role in roles:
                for sock in self.listeners.pop(role):
                    self.sel.unregister(sock)
                    sock.close()

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        self.buffers.pop(conn, None)
        self.keep.discard(conn)
        conn.close()

    # ------------------------------------------------------------ utilisation

    def _integrate(self, until: float) -> None:
        """Add the busy slot-seconds since the last step (the busy count was constant)."""
        if until > self.busy_since:
            self.busy_integral += len(self.busy) * (until - self.busy_since)
            self.busy_since = until

    def _advance(self, now: float) -> None:
        """Finish, in time order, the work done by ``now``; start what waits; account."""
        while self.busy and self.busy[0][0] <= now:
            done = self.busy[0][0]
            self._integrate(done)
            _, _, conn = heapq.heappop(self.busy)
            with contextlib.suppress(OSError):
                conn.send(f"{self.c.name}\n".encode())
            if conn in self.keep:  # a session: wait for its next request
                self.buffers[conn] = b""
                self.sel.register(conn, selectors.EVENT_READ, ("work-conn", None))
            else:
                self._drop(conn)
            self.served += 1
            self._start_work(done)
        self._integrate(now)
        if not self.samples or now - self.samples[-1][0] >= 0.1:
            self.samples.append((now, self.busy_integral))
        while self.samples and now - self.samples[0][0] > self.c.window + 1:
            self.samples.popleft()

    def utilisation(self, now: float) -> float:
        self._advance(now)
        old = next(
            ((t, b) for t, b in self.samples if now - t <= self.c.window), (now, self.busy_integral)
        )
        span = max(now - old[0], 1e-3)
        return min(1.0, (self.busy_integral - old[1]) / (self.c.slots * span))

    def _start_work(self, at: float) -> None:
        while self.queue and len(self.busy) < self.c.slots:
            conn = self.queue.popleft()
            self.seq += 1
            heapq.heappush(self.busy, (at + self.c.service, self.seq, conn))

    # ------------------------------------------------------------ protocols

    def _accept(self, listener: socket.socket, role: str) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        if role == "tcp":
            with contextlib.suppress(OSError):
                conn.send(f"{self.c.name}\n".encode())
        if role == "agent":
            answer = self.c.agent_answer
            if not answer:
                answer = f"{round(100 * (1 - self.utilisation(time.monotonic())))}%"
            with contextlib.suppress(OSError):
                conn.send(f"{answer}\n".encode())
            conn.close()
            return
        self.buffers[conn] = b""
        self.sel.register(conn, selectors.EVENT_READ, (f"{role}-conn", None))

    def _read(self, conn: socket.socket, role: str) -> None:
        try:
            data = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if role == "work-conn" and conn not in self.keep:
                self.sel.unregister(conn)  # half-closed: still owed an answer
                return
            self._drop(conn)
            return
        buffered = self.buffers.get(conn, b"") + data
        self.buffers[conn] = buffered
        if role == "tcp-conn":
            while b"\n" in self.buffers[conn]:
                line, _, rest = self.buffers[conn].partition(b"\n")
                self.buffers[conn] = rest
                if line.strip() == b"ping":
                    conn.send(f"pong {self.c.name}\n".encode())
        elif role == "http-conn" and b"\r\n\r\n" in buffered:
            statuses = self.c.http_statuses
            status = statuses[self.http_requests % len(statuses)]
            self.http_requests += 1
            body = f"{self.c.name}\n".encode()
            with contextlib.suppress(OSError):
                conn.sendall(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n".encode()
                    + body
                )
            self._drop(conn)
        elif role == "work-conn" and b"\n" in buffered:
            if buffered.startswith(b"keep"):
                self.keep.add(conn)
            self.sel.unregister(conn)
            now = time.monotonic()
            self._advance(now)
            self.queue.append(conn)
            self._start_work(now)

    def _datagram(self, sock: socket.socket, role: str) -> None:
        try:
            data, peer = sock.recvfrom(4096)
        except BlockingIOError:
            return
        if role == "dns":
            if len(data) < 12:
                return
            qid = struct.unpack("!H", data[:2])[0]
            question_end = data.index(b"\0", 12) + 5
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 30, 4) + bytes([192, 0, 2, 99])
            reply = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + data[12:question_end]
            sock.sendto(reply + answer, peer)
        elif data.strip() == b"ping":
            sock.sendto(f"pong {self.c.name}\n".encode(), peer)
        else:
            sock.sendto(f"{self.c.name}\n".encode(), peer)

    def _command(self) -> None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.control.recv(65536)
            if not chunk:
                os._exit(0)  # the test went away
            data += chunk
        request = json.loads(data)
        command = request["cmd"]
        roles = set(request.get("roles") or ()) or None
        if command == "stop":
            self.close(roles)
        elif command == "start":
            self.open(roles)
        elif command == "http":
            self.c.http_statuses = list(request["statuses"])
            self.http_requests = 0
        reply = {
            "ok": True,
            "at": time.monotonic(),
            "http_requests": self.http_requests,
            "served": self.served,
            "utilisation": self.utilisation(time.monotonic()),
            "busy": self.busy_integral,
            "queued": len(self.queue),
        }
        self.control.sendall(json.dumps(reply).encode() + b"\n")

    def serve(self) -> NoReturn:
        self.open()
        self.control.sendall(b'{"ok": true}\n')
        while True:
            timeout = max(0.0, self.busy[0][0] - time.monotonic()) if self.busy else None
            for key, _ in self.sel.select(timeout):
                role, _ = key.data
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if role == "control":
                    self._command()
                elif role in ("udp", "dns"):
                    self._datagram(sock, role)
                elif role.endswith("-conn"):
                    self._read(sock, role)
                else:
                    self._accept(sock, role)
            self._advance(time.monotonic())


@dataclass
class RealServer:
    """The test's handle on a forked real server."""

    name: str
    pid: int
    control: socket.socket
    config: Config

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send a command; the answer carries the child's monotonic time ("at")."""
        self.control.settimeout(CONTROL_TIMEOUT)
        self.control.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.control.recv(65536)
            if not chunk:
                raise ConnectionError(f"real server {self.name} exited")
            data += chunk
        answer: dict[str, Any] = json.loads(data)
        return answer

    def stop_listening(self, *roles: str) -> float:
        """Close the listeners (all, or these roles); established connections live on.
        Returns when they are closed (monotonic time)."""
        return float(self.call("stop", roles=list(roles))["at"])

    def listen(self, *roles: str) -> float:
        return float(self.call("start", roles=list(roles))["at"])

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.control.close()


def _child(config: Config, control: socket.socket, other: socket.socket) -> NoReturn:
    status = 0
    try:
        other.close()
        os.setsid()
        _Server(config, control).serve()
    except BaseException:
        with contextlib.suppress(OSError):
            control.sendall(json.dumps({"error": traceback.format_exc()}).encode() + b"\n")
        status = 1
    finally:
        os._exit(status)


def start(lab: Lab, ns: Netns, config: Config) -> RealServer:
    """Fork a real server into ``ns``; it is stopped when the lab closes."""
    parent, child = socket.socketpair()
    with ns.entered():
        pid = os.fork()
        if pid == 0:
            _child(config, child, parent)
    child.close()
    server = RealServer(config.name, pid, parent, config)
    lab.servers.append(server)  # type: ignore[arg-type]  # stop() is all Lab.close needs
    parent.settimeout(CONTROL_TIMEOUT)
    first = b""
    while not first.endswith(b"\n"):
        chunk = parent.recv(65536)
        if not chunk:
            raise RuntimeError(f"real server {config.name} died at start")
        first += chunk
    if b"error" in first:
        raise RuntimeError(f"real server {config.name} failed:\n{json.loads(first)['error']}")
    return server


# ---------------------------------------------------------------- the load generator


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (relative to the first), its latency, who served it."""

    start: float
    latency: float
    served_by: str


_STOPPING: list[bool] = []


def _generate(vip: str, port: int, rate: float, count: int, deadline: float) -> list[Outcome]:
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    end = t0 + deadline
    sent, done = 0, []
    open_: dict[socket.socket, tuple[float, bytes]] = {}
    while (sent < count or open_) and time.monotonic() < end:
        if _STOPPING:
            count = sent  # told to stop: finish what is in flight
        now = time.monotonic()
        while sent < count and t0 + sent / rate <= now:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect((vip, port))
            sel.register(sock, selectors.EVENT_WRITE)
            open_[sock] = (t0 + sent / rate, b"")
            sent += 1
        wake = t0 + sent / rate if sent < count else end
        for key, events in sel.select(max(0.0, min(wake, end) - time.monotonic())):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            started, data = open_[sock]
            if events & selectors.EVENT_WRITE:
                try:
                    sock.send(b"req\n")
                except OSError:
                    done.append(Outcome(started - t0, time.monotonic() - started, "error"))
                    sel.unregister(sock)
                    sock.close()
                    del open_[sock]
                    continue
                sel.modify(sock, selectors.EVENT_READ)
                continue
            try:
                chunk = sock.recv(256)
            except OSError:
                chunk = b""
            data += chunk
            if chunk and not data.endswith(b"\n"):
                open_[sock] = (started, data)
                continue
            name = data.decode().strip() or "error"
            done.append(Outcome(started - t0, time.monotonic() - started, name))
            sel.unregister(sock)
            sock.close()
            del open_[sock]
    for sock, (started, _) in open_.items():
        done.append(Outcome(started - t0, time.monotonic() - started, "unfinished"))
        sock.close()
    return done


def _sessions(
    vip: str, port: int, rate: float, count: int, per_session: int, think: float, deadline: float
) -> list[Outcome]:
    """``count`` sessions opened at ``rate`` per second, each one connection that sends
    ``per_session`` requests one after another, ``think`` seconds after each answer: a client
    with a long-lived connection, whose load the count of connections does not show."""
    family = socket.AF_INET6 if ":" in vip else socket.AF_INET
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    end = t0 + deadline
    opened, done = 0, []
    timers: list[tuple[float, int, socket.socket]] = []  # (send at, tie, connection)
    state: dict[socket.socket, list[Any]] = {}  # [requests sent, sent at, buffer]
    tie = 0
    while (opened < count or state) and time.monotonic() < end:
        if _STOPPING:
            count = opened
        now = time.monotonic()
        while opened < count and t0 + opened / rate <= now:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect((vip, port))
            sel.register(sock, selectors.EVENT_WRITE)
            state[sock] = [0, t0 + opened / rate, b""]
            opened += 1
        while timers and timers[0][0] <= now:
            _, _, sock = heapq.heappop(timers)
            if sock in state:
                state[sock][1] = now
                with contextlib.suppress(OSError):
                    sock.send(b"keep\n")
                sel.register(sock, selectors.EVENT_READ)
        wakes = [t0 + opened / rate] if opened < count else []
        wakes += [timers[0][0]] if timers else []
        wake = min([*wakes, end])
        for key, events in sel.select(max(0.0, wake - time.monotonic())):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            sent, started, data = state[sock]
            if events & selectors.EVENT_WRITE:
                try:
                    sock.send(b"keep\n")
                except OSError:
                    done.append(Outcome(started - t0, time.monotonic() - started, "error"))
                    sel.unregister(sock)
                    sock.close()
                    del state[sock]
                    continue
                sel.modify(sock, selectors.EVENT_READ)
                continue
            try:
                chunk = sock.recv(256)
            except OSError:
                chunk = b""
            data += chunk
            if chunk and not data.endswith(b"\n"):
                state[sock][2] = data
                continue
            finished = time.monotonic()
            done.append(Outcome(started - t0, finished - started, data.decode().strip() or "error"))
            sel.unregister(sock)
            if not chunk or sent + 1 >= per_session:
                sock.close()
                del state[sock]
                continue
            state[sock] = [sent + 1, 0.0, b""]
            tie += 1
            heapq.heappush(timers, (finished + think, tie, sock))
    for sock, (_, started, _) in state.items():
        if started:
            done.append(Outcome(started - t0, time.monotonic() - started, "unfinished"))
        sock.close()
    return done


@contextlib.contextmanager
def offered_load(
    ns: Netns,
    vip: str,
    port: int,
    rate: float,
    seconds: float,
    per_session: int = 1,
    think: float = 0.0,
) -> Iterator[Callable[[], list[Outcome]]]:
    """Requests at ``rate`` per second for at most ``seconds`` from a forked child in ``ns``
    (with ``per_session`` > 1: sessions at that rate, see :func:`_sessions`); the yielded
    function stops it (requests in flight finish, bounded) and returns every request."""
    read_end, write_end = os.pipe()
    with ns.entered():
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                os.close(read_end)
                signal.signal(signal.SIGUSR1, lambda *_: _STOPPING.append(True))
                if per_session > 1:
                    count = int(rate * seconds)
                    out = _sessions(vip, port, rate, count, per_session, think, seconds + 60)
                else:
                    out = _generate(vip, port, rate, int(rate * seconds), seconds + 30)
                payload = json.dumps([asdict(o) for o in out]).encode()
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(payload)
            except BaseException:
                traceback.print_exc()
                status = 1
            finally:
                os._exit(status)
    os.close(write_end)
    result: list[Outcome] = []

    def collect() -> list[Outcome]:
        """Stop sending (requests in flight finish) and return every request."""
        if not result:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
            deadline = time.monotonic() + seconds + 60
            chunks = []
            with os.fdopen(read_end, "rb") as pipe:
                while time.monotonic() < deadline:
                    chunk = pipe.read(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            os.waitpid(pid, 0)
            result.extend(Outcome(**o) for o in json.loads(b"".join(chunks) or b"[]"))
        return result

    try:
        yield collect
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
