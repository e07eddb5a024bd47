"""Production safety on the real kernel: what a VIP exposes, ownership through a flushed
firewall, a foreign program racing the agent, node settings and their undoing, planner bugs.

Every "node" is a network namespace running the agent's pass with the real kernel and the real
host layer (``LinuxHost``: addresses, nftables, state file, sysctls), as ``ipvs-agent run``
does; the flush test runs the agent loop itself. Clients are namespaces too; every assertion
is a real TCP or UDP exchange, ARP or ICMP packet, or what the kernel's tables say.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from ipvs_agent import desired
from ipvs_agent.agent import Agent, Settings, serve_http
from ipvs_agent.audit import Auditor
from ipvs_agent.host.podnetns import PodNamespaces
from ipvs_agent.host.realserver import RS_INTERFACE
from ipvs_agent.host.state import StateFile
from ipvs_agent.kernel.ipvs import IPVSKernel
from ipvs_agent.model import Protocol, ServiceKey
from ipvs_agent.ops import Op
from ipvs_agent.system import LinuxHost
from tests.kernel.agent_harness import NodeAgent
from tests.kernel.ipvsctl import ipvsadm, ipvsadm_list
from tests.kernel.topology import Lab, Netns, Topology, build_dr, build_nat
from tests.kernel.traffic import wait_for
from tests.unit.agent_helpers import StubMirror

METRICS_PORT = 9753
NODE_PORT = 2222  # a listener on the director, bound to the wildcard address (like sshd)


def virtual_server(
    topology: Topology,
    name: str = "web",
    servers: Sequence[str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    rips = [rs.rip for rs in topology.real_servers] if servers is None else list(servers)
    body: dict[str, Any] = {
        "address": topology.vip,
        "ports": [{"port": topology.port}],
        "scheduler": {"name": "rr"},
        "forwarding": {"method": {"nat": "NAT", "dr": "DR", "tun": "TUN"}[topology.method]},
        "backends": {"static": [{"address": rip} for rip in rips]},
    }
    body.update(spec)
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "lab", "generation": 1},
        "spec": body,
    }


def agent_for(topology: Topology, tmp_path: Path, **kwargs: Any) -> NodeAgent:
    """The director's agent, with the VIP left to it (the topology's own vip0 copy goes)."""
    director = topology.director
    plen = 32 if topology.family == 4 else 128
    director.ip(f"addr del {topology.vip}/{plen} dev vip0")
    return NodeAgent(
        director, "director", [topology.director_addr], state_dir=tmp_path / "state", **kwargs
    )


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for thing in reversed(made):
        thing.close()


def tcp_answers(ns: Netns, addr: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection from ``ns`` to ``addr:port`` gets established."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with ns.entered():
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except OSError:
            return False
    return True


def metrics_server(ns: Netns) -> Any:
    """The agent's own /metrics endpoint in ``ns``, bound to every address (the old default)."""
    agent = Agent(
        Settings("director"),
        IPVSKernel(netns=ns.name),
        None,  # type: ignore[arg-type]  # never reconciles: only the HTTP side is wanted
        [StubMirror("virtualservers", []), StubMirror("endpointslices", [])],
        threading.Event(),
    )
    with ns.entered():
        return serve_http(agent, METRICS_PORT, "::")  # IPv6 and IPv4 (bindv6only is 0)


# ------------------------------------------------------------------ 1. what a VIP answers


class Stopper:
    def __init__(self, server: Any) -> None:
        self.server = server

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("family", [4, 6])
def test_a_vip_answers_only_its_declared_ports(
    lab: Lab, tmp_path: Path, closing: list[Any], family: int
) -> None:
    topology = build_nat(lab, family=family, real_servers=1)
    director, client = topology.director, topology.client
    agent = agent_for(topology, tmp_path)
    closing.append(agent)
    # The node's own services, on every address: like sshd, and the agent's metrics endpoint
    # as it was bound before (0.0.0.0).
    lab.start_server(director, "node", tcp_ports=(NODE_PORT,), udp_ports=(NODE_PORT,))
    closing.append(Stopper(metrics_server(director)))
    node = "198.51.100.1" if family == 4 else "2001:db8:c1::1"  # the director, client side
    assert tcp_answers(client.ns, node, NODE_PORT)
    assert tcp_answers(client.ns, node, METRICS_PORT)

    agent.reconcile([virtual_server(topology)])
    assert client.tcp_identities(topology.vip, topology.port, 2) == {"rs1": 2}
    # The VIP is local to the node, yet reaches none of the node's own listeners...
    assert not tcp_answers(client.ns, topology.vip, NODE_PORT)
    assert not udp_answers(client.ns, topology.vip, NODE_PORT)
    assert not tcp_answers(client.ns, topology.vip, METRICS_PORT)
    # ...which the node's own address still does.
    assert tcp_answers(client.ns, node, NODE_PORT)
    assert udp_answers(client.ns, node, NODE_PORT)
    assert tcp_answers(client.ns, node, METRICS_PORT)
    # Echo requests are answered (a VIP that answers ping is easy to check).
    assert ping(client.ns, topology.vip)

    # A port declared later opens, one taken away closes.
    moved = virtual_server(topology, ports=[{"port": NODE_PORT, "targetPort": topology.port}])
    agent.reconcile([moved])
    assert client.tcp_identities(topology.vip, NODE_PORT, 1) == {"rs1": 1}  # IPVS's, not sshd
    assert not tcp_answers(client.ns, topology.vip, topology.port)


def udp_answers(ns: Netns, addr: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with ns.entered():
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(2.0)
        sock.connect((addr, port))
        sock.send(b"hello")
        try:
            sock.recv(64)
        except OSError:  # timeout, or port unreachable
            return False
    return True


def ping(ns: Netns, addr: str) -> bool:
    argv = ["busybox", "ping", "-c", "1", "-W", "3", addr]
    return ns.run(*argv).returncode == 0


# ------------------------------------------------------------------ 1b. ICMP errors and PMTU


class Router:
    """client | router (a narrow link toward the client) | director | real server.

    The real server's replies, un-NATed by the director, leave with the VIP as source; the
    router cannot forward them over its narrow link and sends "fragmentation needed" (IPv4)
    or "packet too big" (IPv6) to the VIP. Only if the director lets that ICMP reach IPVS
    does the real server learn the path MTU; else a large reply never arrives.
    """

    MTU = 1280

    def __init__(self, lab: Lab, family: int) -> None:
        six = family == 6
        self.vip = "2001:db8:f::10" if six else "203.0.113.10"
        plen, host = (64, 128) if six else (24, 32)

        def a(v4: str, v6: str) -> str:
            return v6 if six else v4

        self.client, router, self.director, self.server = lab.netns("c1", "rt", "dir", "rs1")
        lab.veth(self.client, "eth0", router, "r0")
        lab.veth(router, "r1", self.director, "eth0")
        lab.veth(self.director, "eth1", self.server, "eth0")
        self.client_addr = a("198.51.100.101", "2001:db8:c1::101")
        self.director_addr = a("198.18.1.1", "2001:db8:12::1")
        self.rip = a("192.0.2.11", "2001:db8:5e::11")
        for ns, ifname, address in (
            (self.client, "eth0", self.client_addr),
            (router, "r0", a("198.51.100.254", "2001:db8:c1::254")),
            (router, "r1", a("198.18.1.254", "2001:db8:12::254")),
            (self.director, "eth0", self.director_addr),
            (self.director, "eth1", a("192.0.2.1", "2001:db8:5e::1")),
            (self.server, "eth0", self.rip),
        ):
            ns.add_address(ifname, address, plen)
            ns.link_up(ifname)
        router.ipr.link("set", index=router.index("r0"), mtu=self.MTU)
        self.client.add_route("default", a("198.51.100.254", "2001:db8:c1::254"))
        self.director.add_route("default", a("198.18.1.254", "2001:db8:12::254"))
        self.server.add_route("default", a("192.0.2.1", "2001:db8:5e::1"))
        router.add_route(f"{self.vip}/{host}", self.director_addr)
        for ns in (router, self.director):
            ns.sysctl("net.ipv6.conf.all.forwarding" if six else "net.ipv4.ip_forward", 1)

    def large_reply_server(self, size: int) -> socket.socket:
        """A real server that sends ``size`` bytes to every client, then closes."""
        family = socket.AF_INET6 if ":" in self.rip else socket.AF_INET
        with self.server.entered():
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.rip, 80))
        sock.listen(8)

        def serve() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"x" * size)

        threading.Thread(target=serve, daemon=True).start()
        return sock

    def download(self, timeout: float = 20.0) -> int:
        family = socket.AF_INET6 if ":" in self.vip else socket.AF_INET
        with self.client.entered():
            sock = socket.socket(family, socket.SOCK_STREAM)
        got = 0
        deadline = time.monotonic() + timeout
        with sock:
            sock.settimeout(timeout)
            sock.connect((self.vip, 80))
            while time.monotonic() < deadline:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                got += len(chunk)
        return got


@pytest.mark.parametrize("family", [4, 6])
def test_path_mtu_discovery_works_through_the_guard(
    lab: Lab, tmp_path: Path, closing: list[Any], family: int
) -> None:
    net = Router(lab, family)
    closing.append(net.large_reply_server(64 * 1024))
    agent = NodeAgent(net.director, "director", [net.director_addr], state_dir=tmp_path / "s")
    closing.append(agent)
    vs = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "big", "namespace": "lab", "generation": 1},
        "spec": {
            "address": net.vip,
            "ports": [{"port": 80}],
            "scheduler": {"name": "rr"},
            "trafficPolicy": "Cluster",
            "backends": {"static": [{"address": net.rip}]},
        },
    }
    agent.reconcile([vs])
    assert net.download() == 64 * 1024, "the ICMP error to the VIP must reach IPVS"


# ------------------------------------------------------------------ 2. a flushed firewall


def test_a_pass_that_changes_nothing_leaves_the_state_file_as_it_is(
    lab: Lab, tmp_path: Path
) -> None:
    """The state file (the ownership record beside nftables) is rewritten only when what it
    says changes: a resync with nothing to do writes nothing; a new service is recorded."""
    topology = build_nat(lab, family=4, real_servers=2)
    agent = agent_for(topology, tmp_path)
    web = {**virtual_server(topology), "status": {"address": topology.vip}}
    agent.reconcile([web])
    path = tmp_path / "state" / "state.json"
    written = path.stat()
    agent.reconcile([web])
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    other = virtual_server(topology, "api")
    other["spec"]["ports"] = [{"port": topology.port + 1}]
    agent.reconcile([web, {**other, "status": {"address": topology.vip}}])
    assert path.stat().st_ino != written.st_ino, "the new service was recorded"
    recorded = StateFile(str(tmp_path / "state"), netns=topology.director.name).load()
    assert {k.port for k in recorded.owned} == {topology.port, topology.port + 1}


@contextlib.contextmanager
def looping_agent(
    topology: Topology,
    tmp_path: Path,
    mirror: StubMirror,
    resync: float,
    audit: bool = False,
) -> Iterator[tuple[Agent, LinuxHost]]:
    """``Agent.run`` in the director's netns with the real host side, as in the DaemonSet
    (with ``audit``, its drift auditor too); stopped and closed after the block."""
    director = topology.director
    host = LinuxHost(
        netns=director.name,
        pods=PodNamespaces([], None, own=director.path),
        state_dir=str(tmp_path / "state"),
    )
    with IPVSKernel(netns=director.name) as kernel:
        agent = Agent(
            Settings("director", resync_seconds=resync, settle_seconds=0),
            kernel,
            host,
            [mirror, StubMirror("endpointslices", []), StubMirror("node", [])],
            threading.Event(),
            auditor=Auditor(IPVSKernel(netns=director.name), host.reader()) if audit else None,
        )
        stop = threading.Event()
        loop = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        loop.start()
        try:
            yield agent, host
        finally:
            stop.set()
            agent.changed.set()
            loop.join(30)
            host.close()


def test_ownership_survives_a_flushed_ruleset(lab: Lab, tmp_path: Path) -> None:
    topology = build_nat(lab, family=4, real_servers=2)
    director, client = topology.director, topology.client
    near, remote = topology.real_servers
    # A pod on another node: its replies come back only if the director masquerades.
    remote.ns.ip("route del default")
    director.ip(f"addr del {topology.vip}/32 dev vip0")
    vs = virtual_server(topology, servers=[remote.rip])
    mirror = StubMirror("virtualservers", [{**vs, "status": {"address": topology.vip}}])
    resync = 3.0
    with looping_agent(topology, tmp_path, mirror, resync) as (agent, _):
        wait_for(lambda: agent.passes > 0, "the first pass")
        assert client.tcp_identities(topology.vip, topology.port, 2) == {"rs2": 2}

        # What `systemctl reload nftables` does with Debian's stock /etc/nftables.conf.
        director.run("nft", "flush", "ruleset")
        assert "ipvs-operator" not in director.run("nft", "list", "tables").stdout
        started = time.monotonic()
        wait_for(
            lambda: "ipvs-operator" in director.run("nft", "list", "tables").stdout,
            "the tables restored",
            timeout=2 * resync + 5,
        )
        restored_after = time.monotonic() - started
        repaired = 'ipvs_agent_host_repairs_total{what="nftables"} 1.0'
        wait_for(lambda: repaired in _metrics(agent), "the repair reported", timeout=30)
        assert agent.last is not None
        outcomes = {k: (str(o.state), o.reason) for k, o in agent.last.outcomes.items()}
        assert outcomes == {"lab/web": ("Programmed", "")}, outcomes
        assert client.tcp_identities(topology.vip, topology.port, 2) == {"rs2": 2}

        # Endpoint changes are applied again (today: never after a flush).
        mirror._items = [
            {**virtual_server(topology, servers=[near.rip]), "status": {"address": topology.vip}}
        ]
        agent.changed.set()
        wait_for(
            lambda: client.tcp_identities(topology.vip, topology.port, 1) == {"rs1": 1},
            "the endpoint change in the kernel",
            timeout=2 * resync + 5,
        )
        print(f"tables restored {restored_after:.1f} s after the flush (resync {resync} s)")


def test_the_drift_audit_reads_beside_the_loop_and_wakes_a_full_pass_only_for_drift(
    lab: Lab, tmp_path: Path
) -> None:
    """With the auditor (as ``ipvs-agent run`` has it), a resync is a reading on a thread of
    its own: a clean table costs no pass, while a deleted service, a flushed ruleset and a VIP
    removed by hand are each found and repaired by a full pass, traffic flowing again."""
    topology = build_nat(lab, family=4, real_servers=2)
    director, client = topology.director, topology.client
    director.ip(f"addr del {topology.vip}/32 dev vip0")
    vs = {**virtual_server(topology), "status": {"address": topology.vip}}
    mirror = StubMirror("virtualservers", [vs])
    with looping_agent(topology, tmp_path, mirror, 1.0, audit=True) as (agent, host):

        def audits(result: str) -> float:
            found = agent.metrics.registry.get_sample_value(
                "ipvs_agent_audits_total", {"result": result}
            )
            return found or 0.0

        def serving() -> bool:
            try:
                return sum(client.tcp_identities(topology.vip, topology.port, 2, 5.0).values()) == 2
            except Exception:  # refused or timed out: not yet
                return False

        wait_for(lambda: agent.passes > 0, "the first pass")
        assert serving()
        wait_for(lambda: audits("clean") >= 3, "three clean audits", timeout=60)
        assert agent.passes == 1, "a clean audit runs no pass"
        samples = agent.metrics.registry.get_sample_value
        ended = [samples("ipvs_agent_audits_total", {"result": r}) for r in ("drift", "failed")]
        assert ended == [0.0, 0.0], "every ending is a series from the start"

        drifts = {
            "a deleted service": lambda: ipvsadm(
                director, "-D", "-t", f"{topology.vip}:{topology.port}"
            ),
            "a flushed ruleset": lambda: director.run("nft", "flush", "ruleset"),
            "a VIP removed": lambda: director.ip(
                f"addr del {topology.vip}/32 dev {host.vips.name}"
            ),
        }
        for what, drift in drifts.items():
            passes, found = agent.passes, audits("drift")
            drift()
            wait_for(partial(lambda f: audits("drift") > f, found), f"{what} found", 60)
            wait_for(partial(lambda p: agent.passes > p and serving(), passes), what, 60)
        assert audits("failed") == 0


def _metrics(agent: Agent) -> str:
    return agent.metrics.exposition().decode()


# ------------------------------------------------------------------ 3. the race


class Racing(IPVSKernel):
    """Between the agent's dump and its apply, another program creates the same service."""

    def __init__(self, netns: str, rival: str) -> None:
        super().__init__(netns=netns)
        self.netns_name = netns
        self.rival = rival

    def apply(self, ops: Sequence[Op]) -> list[Any]:
        if self.rival:
            proc = subprocess.run(
                ["ip", "netns", "exec", self.netns_name, "ipvsadm", *self.rival.split()],
                capture_output=True,
                text=True,
                check=False,
            )
            assert proc.returncode == 0, proc.stderr
            self.rival = ""
        return super().apply(ops)


def test_a_foreign_program_racing_the_agent_keeps_its_service(
    lab: Lab, tmp_path: Path, closing: list[Any]
) -> None:
    topology = build_dr(lab, family=4, real_servers=2)
    agent = agent_for(topology, tmp_path)
    closing.append(agent)
    rival = f"-A -t {topology.vip}:{topology.port} -s sh"
    racing = Racing(topology.director.name, rival)
    result = agent.reconcile([virtual_server(topology)], kernel=racing, check=False)
    listing = ipvsadm_list(topology.director)
    assert f"{topology.vip}:{topology.port} sh" in listing
    assert "->" not in listing.split(f"{topology.vip}:{topology.port}")[1], listing
    key = ServiceKey.for_address(ipaddress.ip_address(topology.vip), Protocol.TCP, topology.port)
    assert key not in agent.host.recorded().owned
    assert result.outcomes["lab/web"].reason == "AddressConflict"
    again = agent.reconcile([virtual_server(topology)])
    assert again.ops == [] and ipvsadm_list(topology.director) == listing, "left alone"


# ------------------------------------------------------------------ 4/5. node settings, undo


def arp_reply(ns: Netns, ifname: str, sender: str, target: str) -> bool:
    """Send one ARP request for ``target`` from ``ns``; whether anybody answers."""
    with ns.entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    with sock:
        sock.bind((ifname, 0x0806))
        mac = sock.getsockname()[4]
        request = (
            b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac + socket.inet_aton(sender) + b"\x00" * 6 + socket.inet_aton(target)
        )  # fmt: skip
        sock.send(request)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                frame = sock.recv(128)
            except TimeoutError:
                return False
            op, spa = struct.unpack("!H", frame[20:22])[0], frame[28:32]
            if op == 2 and spa == socket.inet_aton(target):
                return True
    return False


def sysctls(ns: Netns, *names: str) -> dict[str, str]:
    return {name: ns.read_sysctl(name) for name in names}


DIRECTOR_SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.ipv4.vs.conntrack",
    "net.ipv4.conf.all.arp_ignore",
    "net.ipv4.conf.all.arp_announce",
)


def test_node_settings_follow_the_services_and_cleanup_undoes_exactly_the_agents_work(
    lab: Lab, tmp_path: Path, closing: list[Any]
) -> None:
    topology = build_dr(lab, family=4, real_servers=2)
    director, client = topology.director, topology.client
    director.call(lambda: IPVSKernel().close())  # ip_vs loaded: its sysctls exist
    director.ip("link add eth1 type dummy", "link set eth1 up")  # a SLAAC interface
    director.sysctl("net.ipv6.conf.eth1.accept_ra", 1)
    agent = agent_for(topology, tmp_path)
    closing.append(agent)
    before = sysctls(director, *DIRECTOR_SYSCTLS, "net.ipv6.conf.eth1.accept_ra")

    # DR only: nothing node-wide is needed, nothing changes; the VIP answers no ARP.
    agent.reconcile([virtual_server(topology)])
    assert client.tcp_identities(topology.vip, topology.port, 2) == {"rs1": 1, "rs2": 1}
    assert sysctls(director, *DIRECTOR_SYSCTLS, "net.ipv6.conf.eth1.accept_ra") == before
    assert not arp_reply(client.ns, "eth0", client.addr, topology.vip)
    assert arp_reply(client.ns, "eth0", client.addr, topology.director_addr)
    # IPVS's own: deleted real servers' connections expire at once (not node networking).
    assert set(agent.host.node_changes()) == {"net.ipv4.vs.expire_nodest_conn"}

    # IPv6 NAT and IPv4 NAT with masquerade: forwarding (SLAAC kept), conntrack, arp_announce.
    nat6 = virtual_server(
        topology,
        name="nat6",
        address="2001:db8:f::10",
        forwarding={"method": "NAT"},
        servers=["2001:db8:5e::11"],
    )
    nat4 = virtual_server(topology, name="nat4", forwarding={"method": "NAT"}, ports=[{"port": 81}])
    # The node also serves as a DR real server (of a VirtualServer it does not direct).
    rs_side = virtual_server(
        topology,
        name="rs-side",
        address="203.0.113.20",
        servers=[topology.director_addr],
        nodeSelector={"matchLabels": {"not": "here"}},
    )
    agent.reconcile([virtual_server(topology), nat6, nat4, rs_side])
    changes = agent.host.node_changes()
    assert changes["net.ipv6.conf.eth1.accept_ra"] == ("2", "1"), changes
    assert changes["net.ipv6.conf.all.forwarding"] == ("1", before["net.ipv6.conf.all.forwarding"])
    assert changes["net.ipv4.ip_forward"][0] == "1"
    assert director.read_sysctl("net.ipv6.conf.eth1.accept_ra") == "2"
    assert "203.0.113.20" in director.run("ip", "-br", "addr", "show", RS_INTERFACE).stdout

    # Things of others' that cleanup must leave alone.
    assert ipvsadm(director, "-A", "-t", "198.51.100.99:25", "-s", "rr").returncode == 0
    director.run("nft", "add", "table", "inet", "someone-else")
    state_file = tmp_path / "state" / "state.json"
    assert state_file.exists()

    proc = subprocess.run(
        [
            "ip", "netns", "exec", director.name,
            str(Path(sys.executable).parent / "ipvs-agent"), "cleanup",
            f"--state-dir={tmp_path / 'state'}", "--proc=", f"--netns-dir={tmp_path}",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = ipvsadm_list(director)
    assert "198.51.100.99:25" in listing and topology.vip not in listing, listing
    links = director.run("ip", "-br", "link").stdout
    assert "ipvs0" not in links and RS_INTERFACE not in links, links
    tables = director.run("nft", "list", "tables").stdout
    assert "ipvs-operator" not in tables and "someone-else" in tables
    after = sysctls(director, *DIRECTOR_SYSCTLS, "net.ipv6.conf.eth1.accept_ra")
    assert after == before, "every sysctl the agent changed is back"
    assert not state_file.exists()


# ------------------------------------------------------------------ 8. a planner bug


def test_a_planner_bug_leaves_the_real_server_setup_and_the_services(
    lab: Lab, tmp_path: Path, closing: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = build_dr(lab, family=4, real_servers=2)
    director = topology.director
    agent = agent_for(topology, tmp_path)
    closing.append(agent)
    objects = [
        virtual_server(topology),
        virtual_server(
            topology,
            name="rs-side",
            address="203.0.113.20",
            servers=[topology.director_addr],
            nodeSelector={"matchLabels": {"not": "here"}},
        ),
    ]
    agent.reconcile(objects)
    table = ipvsadm_list(director)
    real = (desired.real_server_part, desired._services)

    def broken(real_fn: Any) -> Any:
        def fn(vs: Any, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"planner bug in {vs.name}")

        return fn

    monkeypatch.setattr(desired, "real_server_part", broken(real[0]))
    monkeypatch.setattr(desired, "_services", broken(real[1]))
    for obj in objects:  # an edit meets the bug (unchanged objects are not planned again)
        meta = obj.setdefault("metadata", {})
        meta["generation"] = int(meta.get("generation") or 1) + 1
    result = agent.reconcile(objects)
    assert {o.reason for o in result.outcomes.values()} == {"InternalError"}
    assert ipvsadm_list(director) == table, "the director's services stay"
    assert "203.0.113.20" in director.run("ip", "-br", "addr", "show", RS_INTERFACE).stdout
    assert topology.client.tcp_identities(topology.vip, topology.port, 2) == {"rs1": 1, "rs2": 1}


def test_the_cli_says_what_went_wrong_in_one_line(lab: Lab, tmp_path: Path) -> None:
    (ns,) = lab.netns("cli")
    program = str(Path(sys.executable).parent / "ipvs-agent")
    missing = subprocess.run(
        ["ip", "netns", "exec", ns.name, program, "plan", "-f", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ},
    )
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "nope.yaml" in missing.stderr
