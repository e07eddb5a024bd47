"""Network-namespace topologies for IPVS tests inside the VM.

IPVS tables are per network namespace, so every host of a test is its own netns:
clients, a director (which will later run the node agent) and real servers,
joined by veth pairs to bridges in a separate "switch" netns. A ``Lab`` owns
everything a test creates and removes it in ``close()`` (the ``lab`` fixture),
so tests stay independent inside one VM.

Addresses come only from documentation ranges:

    v4 client LAN (NAT)   198.51.100.0/24     v6  2001:db8:c1::/64
    v4 server LAN / DR+TUN LAN 192.0.2.0/24   v6  2001:db8:5e::/64
    VIP                   203.0.113.10/32     v6  2001:db8:f::10/128
    (198.18.0.0/15 is left for tests that need many client addresses)

Host numbers: director 1, real server i (1-based) 10+i, client i 100+i; the v6
host part is written with the same digits (192.0.2.11 <-> 2001:db8:5e::11).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import socket
import subprocess
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar

import pytest
from pyroute2 import IPRoute

from tests.kernel.identity_server import serve

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
SERVICE_PORT = 80
GUE_PORT = 6080
DEFAULT_TIMEOUT = 30.0
UDP_PORT_FIRST = 20000  # client source ports for datagrams, below the ephemeral range
UDP_PORT_LAST = 29999

Method = Literal["nat", "dr", "tun"]
#: Every forwarding method and tunnel type, for IPv4 and IPv6: (method, family, tunnel type).
TOPOLOGIES = [
    pytest.param("nat", 4, None, id="nat-v4"),
    pytest.param("nat", 6, None, id="nat-v6"),
    pytest.param("dr", 4, None, id="dr-v4"),
    pytest.param("dr", 6, None, id="dr-v6"),
    pytest.param("tun", 4, "ipip", id="tun-ipip-v4"),
    pytest.param("tun", 6, "ipip", id="tun-ipip-v6"),
    pytest.param("tun", 4, "gue", id="tun-gue-v4"),
    pytest.param("tun", 6, "gue", id="tun-gue-v6"),
    pytest.param("tun", 4, "gre", id="tun-gre-v4"),
    pytest.param("tun", 6, "gre", id="tun-gre-v6"),
]
TunType = Literal["ipip", "gue", "gre"]

P = ParamSpec("P")
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2


class TopologyError(RuntimeError):
    """A namespace, link or server could not be set up."""


def _check(result: int, what: str) -> None:
    """Raise OSError with errno for a failed libc call."""
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _setns(fd: int) -> None:
    """setns(2) for the calling thread only (Python 3.11 has no os.setns)."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


@contextlib.contextmanager
def netns_entered(path: str) -> Iterator[None]:
    """Move the current thread into the netns at ``path`` and back afterwards.

    Sockets (including pyroute2's netlink sockets) opened inside stay in that
    netns after the block; processes started inside are born in it.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
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


def _prepare_netns_dir() -> None:
    """/run/netns as a shared mount point, as ``ip netns add`` leaves it."""
    os.makedirs(NETNS_DIR, exist_ok=True)
    run_dir = NETNS_DIR.encode()
    if _libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None) != 0:
        _check(_libc.mount(run_dir, run_dir, b"none", MS_BIND | MS_REC, None), "bind /run/netns")
        _check(_libc.mount(b"", run_dir, b"none", MS_SHARED | MS_REC, None), "share /run/netns")


def create_netns(name: str) -> Netns:
    """Create a named netns in-process (like ``ip netns add``, without an exec).

    A new netns is unshared by this thread only, pinned by a bind mount on
    /run/netns/<name>, and the thread returns to its own netns.
    """
    _prepare_netns_dir()
    path = f"{NETNS_DIR}/{name}"
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        try:
            bound = _libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None)
            _check(bound, f"bind mount {path}")
        finally:
            _setns(own)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(own)
    return Netns(name)


def delete_netns(name: str) -> None:
    """Unpin a named netns (like ``ip netns del``); the kernel frees it when unused."""
    path = f"{NETNS_DIR}/{name}"
    _libc.umount2(path.encode(), MNT_DETACH)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _ip_batch(commands: Sequence[str], netns: str | None = None) -> None:
    """Run iproute2 commands in one ``ip -batch`` process."""
    if not commands:
        return
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = subprocess.run(
        argv, input="\n".join(commands) + "\n", capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        where = f" in netns {netns}" if netns else ""
        raise TopologyError(
            f"ip -batch failed{where}:\n{proc.stderr.strip()}\ncommands:\n" + "\n".join(commands)
        )


def _sysctl_path(key: str) -> str:
    """``net.ipv4.ip_forward`` or ``net/ipv4/conf/eth0.5/rp_filter`` -> /proc/sys path."""
    return "/proc/sys/" + (key if "/" in key else key.replace(".", "/"))


class Netns:
    """A named network namespace (``/run/netns/<name>``, usable with ``ip -n``).

    Building topologies goes through ``ipr``, a pyroute2 IPRoute socket opened
    inside the netns: in-process netlink is several times faster under TCG than
    one ``ip`` process per step. ``ip()`` and ``run()`` remain for everything else.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"{NETNS_DIR}/{name}"
        self._ipr: Any = None

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @property
    def ipr(self) -> Any:
        """A pyroute2 IPRoute bound to this netns (opened on first use)."""
        if self._ipr is None:
            with self.entered():
                self._ipr = IPRoute()
        return self._ipr

    def close(self) -> None:
        """Close the IPRoute socket (it would keep the netns alive)."""
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def entered(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: the current thread runs inside this netns."""
        return netns_entered(self.path)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run Python code inside this netns (in the current thread)."""
        with self.entered():
            return fn(*args, **kwargs)

    def run(
        self, *argv: str, check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this netns and capture its output."""
        with self.entered():
            proc = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        if check and proc.returncode != 0:
            raise TopologyError(
                f"{' '.join(argv)} in {self.name} exited {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process inside this netns (caller stops it)."""
        with self.entered():
            return subprocess.Popen(list(argv), **kwargs)

    def ip(self, *commands: str) -> None:
        """Run iproute2 commands (without the leading ``ip``) in this netns."""
        _ip_batch(commands, self.name)

    def sysctl(self, key: str, value: int | str) -> None:
        """Write a sysctl of this netns, e.g. ``net.ipv4.ip_forward``."""
        with self.entered(), open(_sysctl_path(key), "w") as handle:
            handle.write(f"{value}\n")

    def read_sysctl(self, key: str) -> str:
        """Read a sysctl of this netns."""
        with self.entered(), open(_sysctl_path(key)) as handle:
            return handle.read().strip()

    def index(self, ifname: str) -> int:
        """Interface index of ``ifname`` in this netns."""
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise TopologyError(f"no interface {ifname} in {self.name}")
        return int(found[0])

    def link_up(self, ifname: str) -> None:
        self.ipr.link("set", index=self.index(ifname), state="up")

    def add_address(self, ifname: str, address: str, prefixlen: int) -> None:
        self.ipr.addr("add", index=self.index(ifname), address=address, prefixlen=prefixlen)

    def add_route(self, destination: str, gateway: str) -> None:
        """Route ``destination`` (CIDR, or ``default``) via ``gateway``."""
        family = socket.AF_INET6 if ":" in gateway else socket.AF_INET
        if destination == "default":
            self.ipr.route("add", family=family, gateway=gateway)
        else:
            self.ipr.route("add", family=family, dst=destination, gateway=gateway)


@dataclass
class ServerProcess:
    """An identity server running in a forked child inside a netns."""

    name: str
    pid: int

    def stop(self) -> None:
        """Kill and reap the child."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _server_child(
    name: str, tcp_ports: Sequence[int], udp_ports: Sequence[int], read_end: int, write_end: int
) -> NoReturn:
    """Body of the forked server child: report readiness or the error, then serve."""
    status = 0
    try:
        os.close(read_end)
        os.setsid()

        def ready() -> None:
            os.write(write_end, b"ready\n")
            os.close(write_end)

        serve(name, tcp_ports, udp_ports, on_ready=ready)
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(write_end, traceback.format_exc().encode())
        status = 1
    finally:
        os._exit(status)


def _start_server(
    ns: Netns, name: str, tcp_ports: Sequence[int], udp_ports: Sequence[int], timeout: float
) -> ServerProcess:
    """Fork an identity server into ``ns``; return once its sockets are bound."""
    read_end, write_end = os.pipe()
    with ns.entered():
        pid = os.fork()
        if pid == 0:  # the child is born in ns; it must never return into pytest
            _server_child(name, tcp_ports, udp_ports, read_end, write_end)
    os.close(write_end)
    try:
        message = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in message:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                raise TopologyError(f"identity server {name} in {ns.name} not ready in {timeout}s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            message += chunk
    finally:
        os.close(read_end)
    server = ServerProcess(name, pid)
    if not message.startswith(b"ready"):
        server.stop()
        raise TopologyError(f"identity server {name} in {ns.name} failed:\n{message.decode()}")
    return server


class Lab:
    """Owns the namespaces and server processes of one test; ``close()`` removes all."""

    _serial = 0

    def __init__(self) -> None:
        Lab._serial += 1
        self.prefix = f"ipvst{os.getpid() % 1000}x{Lab._serial}"
        self.namespaces: list[Netns] = []
        self.servers: list[ServerProcess] = []

    def netns(self, *roles: str) -> list[Netns]:
        """Create namespaces named ``<prefix>-<role>``, lo up, IPv6 DAD off.

        DAD is switched off for the interfaces created later (``default``), so
        IPv6 addresses work at once instead of being tentative for a second.
        """
        created = []
        for role in roles:
            ns = create_netns(f"{self.prefix}-{role}")
            self.namespaces.append(ns)
            created.append(ns)
            for scope in ("all", "default"):
                ns.sysctl(f"net.ipv6.conf.{scope}.accept_dad", 0)
            ns.link_up("lo")
        return created

    def veth(self, a: Netns, a_name: str, b: Netns, b_name: str) -> None:
        """A veth pair with one end in each namespace."""
        a.ipr.link("add", ifname=a_name, kind="veth", peer={"ifname": b_name, "net_ns_fd": b.path})

    def start_server(
        self,
        ns: Netns,
        name: str,
        tcp_ports: Sequence[int] = (SERVICE_PORT,),
        udp_ports: Sequence[int] = (SERVICE_PORT,),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> ServerProcess:
        """Run an identity server in ``ns`` until the lab closes."""
        server = _start_server(ns, name, tcp_ports, udp_ports, timeout)
        self.servers.append(server)
        return server

    def close(self) -> None:
        """Stop every server and delete every namespace this lab created.

        Every step is attempted even if one fails; the first error is re-raised.
        """
        errors: list[BaseException] = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as error:
                errors.append(error)
        self.servers.clear()
        for ns in self.namespaces:
            try:
                ns.close()
                delete_netns(ns.name)
            except Exception as error:
                errors.append(error)
        self.namespaces.clear()
        if errors:
            raise errors[0]


# ---------------------------------------------------------------- clients


def _recv_line(sock: socket.socket, deadline: float, what: str) -> str:
    """Read one newline-terminated identity before the deadline."""
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what}: no identity before the deadline (got {data!r})")
        sock.settimeout(remaining)
        chunk = sock.recv(256)
        if not chunk:
            raise ConnectionError(f"{what}: closed before an identity was sent (got {data!r})")
        data += chunk
    return data.decode().strip()


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


@dataclass
class HeldConnections:
    """Open TCP connections kept established (active) until ``close()``."""

    sockets: list[socket.socket] = field(default_factory=list)
    identities: Counter[str] = field(default_factory=Counter)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    def __enter__(self) -> HeldConnections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Client:
    """A client host: sends traffic to the VIP and counts which real server answered."""

    ns: Netns
    addr: str
    _next_udp_port: int = field(default=UDP_PORT_FIRST, repr=False)

    def _connect(self, vip: str, port: int, deadline: float, what: str) -> socket.socket:
        with self.ns.entered():
            sock = socket.socket(_family(vip), socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect((vip, port))
        except BaseException as error:
            sock.close()
            error.add_note(f"while making {what} from {self.ns.name}")
            raise
        return sock

    def tcp_identities(
        self, vip: str, port: int, count: int, timeout: float = DEFAULT_TIMEOUT
    ) -> Counter[str]:
        """Make ``count`` sequential TCP connections, each finished before the next."""
        deadline = time.monotonic() + timeout
        seen: Counter[str] = Counter()
        for index in range(count):
            what = f"TCP connection {index + 1}/{count} to [{vip}]:{port}"
            with self._connect(vip, port, deadline, what) as sock:
                seen[_recv_line(sock, deadline, what)] += 1
        return seen

    def hold_tcp(
        self, vip: str, port: int, count: int, timeout: float = DEFAULT_TIMEOUT
    ) -> HeldConnections:
        """Open ``count`` TCP connections one after another and keep them open."""
        deadline = time.monotonic() + timeout
        held = HeldConnections()
        try:
            for index in range(count):
                what = f"held TCP connection {index + 1}/{count} to [{vip}]:{port}"
                sock = self._connect(vip, port, deadline, what)
                held.sockets.append(sock)
                held.identities[_recv_line(sock, deadline, what)] += 1
        except BaseException:
            held.close()
            raise
        return held

    def _udp_socket(self, family: socket.AddressFamily) -> socket.socket:
        """A UDP socket on a source port this client has not used before.

        Kernel-chosen ports may repeat, and a repeat would hit the IPVS connection
        entry of the earlier datagram (UDP entries live 300 s) instead of being
        scheduled anew, so counts would drift by one now and then.
        """
        with self.ns.entered():
            sock = socket.socket(family, socket.SOCK_DGRAM)
        for _ in range(UDP_PORT_LAST - UDP_PORT_FIRST):
            port = self._next_udp_port
            self._next_udp_port = port + 1 if port < UDP_PORT_LAST else UDP_PORT_FIRST
            try:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
                return sock
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    sock.close()
                    raise
        sock.close()
        raise TopologyError(f"no free UDP source port in {self.ns.name}")

    def udp_identities(
        self, vip: str, port: int, count: int, timeout: float = DEFAULT_TIMEOUT
    ) -> Counter[str]:
        """Send ``count`` datagrams, each from a new source port, one at a time."""
        deadline = time.monotonic() + timeout
        seen: Counter[str] = Counter()
        for index in range(count):
            what = f"UDP datagram {index + 1}/{count} to [{vip}]:{port}"
            sock = self._udp_socket(_family(vip))
            with sock:
                sock.connect((vip, port))  # replies must come from the VIP itself
                sock.send(b"who\n")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{what}: deadline passed")
                sock.settimeout(remaining)
                try:
                    seen[sock.recv(256).decode().strip()] += 1
                except TimeoutError as error:
                    raise TimeoutError(f"{what}: no reply before the deadline") from error
        return seen


def wait_tcp_port(ns: Netns, addr: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Poll until ``addr:port`` accepts a TCP connection from ``ns`` (bounded)."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        with ns.entered():
            sock = socket.socket(_family(addr), socket.SOCK_STREAM)
        with sock:
            sock.settimeout(min(1.0, max(0.001, deadline - time.monotonic())))
            try:
                sock.connect((addr, port))
                return
            except OSError as error:
                last = error
        time.sleep(0.05)
    raise TimeoutError(f"[{addr}]:{port} not accepting from {ns.name} after {timeout}s: {last}")


# ---------------------------------------------------------------- topologies


@dataclass
class RealServer:
    """A real server host: its netns, address on the LAN and identity server."""

    name: str
    ns: Netns
    rip: str
    server: ServerProcess


@dataclass
class Topology:
    """A ready-to-program IPVS setup; IPVS itself is left to the test."""

    method: Method
    family: int
    tun_type: TunType | None
    vip: str
    port: int
    director: Netns
    director_addr: str
    clients: list[Client]
    real_servers: list[RealServer]
    tun_port: int = 0

    @property
    def client(self) -> Client:
        return self.clients[0]

    @property
    def label(self) -> str:
        kind = f"tun-{self.tun_type}" if self.method == "tun" else self.method
        return f"{kind}-v{self.family}"


@dataclass(frozen=True)
class _Plan:
    """Per-family addressing (see the module docstring)."""

    family: int

    @property
    def plen(self) -> int:
        return 24 if self.family == 4 else 64

    @property
    def host_plen(self) -> int:
        return 32 if self.family == 4 else 128

    @property
    def vip(self) -> str:
        return "203.0.113.10" if self.family == 4 else "2001:db8:f::10"

    def client_lan(self, host: int) -> str:
        return f"198.51.100.{host}" if self.family == 4 else f"2001:db8:c1::{host}"

    def server_lan(self, host: int) -> str:
        return f"192.0.2.{host}" if self.family == 4 else f"2001:db8:5e::{host}"


def _check_family(family: int) -> _Plan:
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family}")
    return _Plan(family)


def _switch(switch: Netns, bridges: Sequence[str]) -> None:
    """Bridges in the switch netns (no STP delay, no IPv6 chatter of its own)."""
    switch.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
    switch.sysctl("net.ipv6.conf.default.disable_ipv6", 1)
    for bridge in bridges:
        switch.ipr.link("add", ifname=bridge, kind="bridge", br_stp_state=0, br_mcast_snooping=0)
        switch.link_up(bridge)


def _attach(lab: Lab, switch: Netns, bridge: str, host: Netns, ifname: str) -> None:
    """Connect ``host``'s ``ifname`` to ``bridge`` with a veth pair (host end up)."""
    port = f"{host.name.rsplit('-', 1)[-1]}-{ifname}"[:15]
    lab.veth(host, ifname, switch, port)
    switch.ipr.link("set", index=switch.index(port), master=switch.index(bridge), state="up")
    host.link_up(ifname)


def _add_director_vip(director: Netns, plan: _Plan) -> None:
    """The VIP on a dummy device (like kube-ipvs0): local, so IPVS sees it in LOCAL_IN."""
    director.ipr.link("add", ifname="vip0", kind="dummy")
    director.add_address("vip0", plan.vip, plan.host_plen)
    director.link_up("vip0")


def _make_clients(
    lab: Lab, switch: Netns, bridge: str, plan: _Plan, count: int, lan: Callable[[int], str],
    route_via: str, route_vip_only: bool,
) -> list[Client]:  # fmt: skip
    clients = []
    for index, ns in enumerate(lab.netns(*(f"c{i + 1}" for i in range(count)))):
        addr = lan(101 + index)
        _attach(lab, switch, bridge, ns, "eth0")
        ns.add_address("eth0", addr, plan.plen)
        target = f"{plan.vip}/{plan.host_plen}" if route_vip_only else "default"
        ns.add_route(target, route_via)
        clients.append(Client(ns, addr))
    return clients


def build_nat(lab: Lab, family: int = 4, real_servers: int = 3, clients: int = 1) -> Topology:
    """NAT: clients | director (router, ip_forward=1) | real servers routing back via it."""
    plan = _check_family(family)
    switch, director = lab.netns("sw", "dir")
    _switch(switch, ["brc", "brs"])
    director_client = plan.client_lan(1)
    director_server = plan.server_lan(1)
    _attach(lab, switch, "brc", director, "eth0")
    _attach(lab, switch, "brs", director, "eth1")
    director.add_address("eth0", director_client, plan.plen)
    director.add_address("eth1", director_server, plan.plen)
    _add_director_vip(director, plan)
    if family == 4:
        director.sysctl("net.ipv4.ip_forward", 1)
    else:
        director.sysctl("net.ipv6.conf.all.forwarding", 1)
    made_clients = _make_clients(
        lab, switch, "brc", plan, clients, plan.client_lan, director_client, route_vip_only=False
    )
    servers = []
    for index, ns in enumerate(lab.netns(*(f"rs{i + 1}" for i in range(real_servers)))):
        name = f"rs{index + 1}"
        rip = plan.server_lan(11 + index)
        _attach(lab, switch, "brs", ns, "eth0")
        ns.add_address("eth0", rip, plan.plen)
        ns.add_route("default", director_server)
        servers.append(RealServer(name, ns, rip, lab.start_server(ns, name)))
    return Topology(
        "nat", family, None, plan.vip, SERVICE_PORT, director, director_server,
        made_clients, servers,
    )  # fmt: skip


def _one_lan(lab: Lab, plan: _Plan, clients: int) -> tuple[Netns, Netns, str, list[Client]]:
    """Switch + director on one LAN with the clients; clients route the VIP via it."""
    switch, director = lab.netns("sw", "dir")
    _switch(switch, ["br0"])
    director_addr = plan.server_lan(1)
    _attach(lab, switch, "br0", director, "eth0")
    director.add_address("eth0", director_addr, plan.plen)
    _add_director_vip(director, plan)
    made_clients = _make_clients(
        lab, switch, "br0", plan, clients, plan.server_lan, director_addr, route_vip_only=True
    )
    return switch, director, director_addr, made_clients


def _hide_vip(ns: Netns) -> None:
    """Real servers hold the VIP but must never answer ARP for it."""
    for scope in ("all", "default", "eth0"):
        ns.sysctl(f"net.ipv4.conf.{scope}.arp_ignore", 1)
        ns.sysctl(f"net.ipv4.conf.{scope}.arp_announce", 2)


def build_dr(
    lab: Lab, family: int = 4, real_servers: int = 2, clients: int = 1, prepare: bool = True
) -> Topology:
    """DR: one LAN; each real server has the VIP on lo and answers clients directly.

    ``prepare=False`` leaves the real servers bare (no VIP, ARP as the kernel defaults), for
    tests where the agent must prepare them.
    """
    plan = _check_family(family)
    switch, director, director_addr, made_clients = _one_lan(lab, plan, clients)
    servers = []
    for index, ns in enumerate(lab.netns(*(f"rs{i + 1}" for i in range(real_servers)))):
        name = f"rs{index + 1}"
        rip = plan.server_lan(11 + index)
        _attach(lab, switch, "br0", ns, "eth0")
        ns.add_address("eth0", rip, plan.plen)
        if prepare:
            _hide_vip(ns)
            ns.add_address("lo", plan.vip, plan.host_plen)
        servers.append(RealServer(name, ns, rip, lab.start_server(ns, name)))
    return Topology(
        "dr", family, None, plan.vip, SERVICE_PORT, director, director_addr,
        made_clients, servers,
    )  # fmt: skip


def _add_decap_device(ns: Netns, plan: _Plan, tun_type: TunType, rip: str) -> None:
    """Create ``tun0``, which decapsulates what the director sends to ``rip``.

    No modprobe: creating the device autoloads its module, as on a real node.
    gue needs an IP-in-IP device too: fou strips UDP+GUE and hands the inner
    packet to the IP-in-IP handler.
    """
    if tun_type == "gre" and plan.family == 4:
        ns.ipr.link("add", ifname="tun0", kind="gre", gre_local=rip)
    elif tun_type == "gre":
        ns.ipr.link("add", ifname="tun0", kind="ip6gre", ip6gre_local=rip)
    elif plan.family == 4:
        ns.ipr.link("add", ifname="tun0", kind="ipip", ipip_local=rip)
    else:
        ns.ipr.link(
            "add", ifname="tun0", kind="ip6tnl", ip6tnl_local=rip, ip6tnl_proto=socket.IPPROTO_IPV6
        )


def build_tun(
    lab: Lab,
    family: int = 4,
    tun_type: TunType = "ipip",
    real_servers: int = 2,
    clients: int = 1,
    prepare: bool = True,
) -> Topology:
    """TUN: the director encapsulates (ipip / gue / gre) to each real server's address.

    Each real server decapsulates on ``tun0`` (which holds the VIP), with rp_filter
    off, VIP ARP suppressed, and answers clients directly. For gue it also listens
    for GUE on GUE_PORT (``ip fou``); fou has no module alias for autoload in this
    kernel, so it is loaded explicitly, as an administrator would on a real node.
    ``prepare=False`` leaves the real servers bare: no decapsulation, no VIP.
    """
    plan = _check_family(family)
    if tun_type not in ("ipip", "gue", "gre"):
        raise ValueError(f"unknown tunnel type {tun_type}")
    switch, director, director_addr, made_clients = _one_lan(lab, plan, clients)
    servers = []
    for index, ns in enumerate(lab.netns(*(f"rs{i + 1}" for i in range(real_servers)))):
        name = f"rs{index + 1}"
        rip = plan.server_lan(11 + index)
        _attach(lab, switch, "br0", ns, "eth0")
        ns.add_address("eth0", rip, plan.plen)
        if prepare:
            _hide_vip(ns)
            _add_decap_device(ns, plan, tun_type, rip)
            ns.add_address("tun0", plan.vip, plan.host_plen)
            ns.link_up("tun0")
            for scope in ("all", "default", "tun0"):
                ns.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 0)
            if tun_type == "gue":
                ns.run("modprobe", "fou")
                ns.ip(f"fou add port {GUE_PORT} gue" + (" -6" if family == 6 else ""))
        servers.append(RealServer(name, ns, rip, lab.start_server(ns, name)))
    return Topology(
        "tun", family, tun_type, plan.vip, SERVICE_PORT, director, director_addr, made_clients,
        servers, tun_port=GUE_PORT if tun_type == "gue" else 0,
    )  # fmt: skip


def build(
    lab: Lab,
    method: Method,
    family: int = 4,
    tun_type: TunType | None = None,
    real_servers: int = 2,
    clients: int = 1,
) -> Topology:
    """Dispatch to build_nat / build_dr / build_tun."""
    if method == "nat":
        return build_nat(lab, family, real_servers, clients)
    if method == "dr":
        return build_dr(lab, family, real_servers, clients)
    if method == "tun":
        return build_tun(lab, family, tun_type or "ipip", real_servers, clients)
    raise ValueError(f"unknown forwarding method {method}")


__all__ = [
    "GUE_PORT",
    "SERVICE_PORT",
    "Client",
    "HeldConnections",
    "Lab",
    "Netns",
    "RealServer",
    "ServerProcess",
    "Topology",
    "TopologyError",
    "build",
    "build_dr",
    "build_nat",
    "build_tun",
    "create_netns",
    "delete_netns",
    "netns_entered",
    "wait_tcp_port",
]
