"""The layer-2 lab's nodes, inside the IPVS VM: several directors on one LAN, each its own agent.

Run by tests/e2e/bed.py as the VM's command (``python -m tests.e2e.l2guest``). Every director
"node" is a network namespace with its own IPVS table and its own ``ipvs-agent run`` process,
all against the real API server on the host; a client and the real servers share their LAN:

    sw: bridge br0 ── n1 eth0 192.0.2.1   2001:db8:1::1     (each node's agent: its own process)
                   ── n2 eth0 192.0.2.2   2001:db8:1::2
                   ── n3 eth0 192.0.2.3   2001:db8:1::3
                   ── c1 eth0 192.0.2.100 2001:db8:1::100   (the client: streams and ARP/NS probes)
                   ── rs1, rs2 192.0.2.11-12, 2001:db8:1::11-12 (identity servers on port 80)

A node reaches the API server as a real node does, over a path of its own: a veth ``api0`` to
the VM's root namespace (198.18.1.0/24), which routes and masquerades it out of the qemu NIC to
the API server's ``guestfwd`` (198.18.0.10). The VIPs come from an AddressPool with ``layer2``
on the LAN's subnets, so the elected node answers ARP/NDP on its ``eth0``.

The guest serves the host's requests (one JSON object per line) like tests/e2e/guest.py:
agents (start, SIGTERM, SIGKILL), links (down, up), and from the client a stream of new TCP
connections and UDP datagrams plus ARP/NDP probes, timestamped, for the host to judge.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from ipvs_agent.announce import packets
from tests.e2e.guest import _connect_home, serve
from tests.kernel.topology import Lab, Netns, wait_tcp_port

NODES = ("n1", "n2", "n3")
CLIENT4, CLIENT6 = "192.0.2.100", "2001:db8:1::100"
REAL_SERVERS = {"rs1": ("192.0.2.11", "2001:db8:1::11"), "rs2": ("192.0.2.12", "2001:db8:1::12")}
PORT = 80
API_ADDRESS = "198.18.0.10"
CONNECT_TIMEOUT = 120.0


def node_addresses(index: int) -> tuple[str, str]:
    return f"192.0.2.{index}", f"2001:db8:1::{index}"


#: Seconds a connection or datagram may take (the VM is emulated and shares a busy machine).
SAMPLE_TIMEOUT = 2.0


class Stream:
    """From the client: a new TCP connection and a UDP datagram every ``interval``, and an
    ARP request / neighbour solicitation for the VIP every ``probe`` seconds, each recorded
    when its outcome is known (monotonic seconds of this VM), until stopped or ``limit``
    seconds passed. A UDP datagram whose answer is lost is retried by the next one."""

    def __init__(self, client: Netns, vip: str, interval: float, probe: float, limit: float):
        """``probe`` 0: no ARP/NDP probes (a client behind a router has no link to the VIP)."""
        self.client, self.vip = client, ipaddress.ip_address(vip)
        self.interval, self.probe, self.limit = interval, probe, limit
        self.tcp: list[tuple[float, str]] = []  # (time, identity or "")
        self.udp: list[tuple[float, str]] = []
        self.answers: list[tuple[float, str]] = []  # (time, MAC that answered for the VIP)
        self.stop = threading.Event()
        self.family = socket.AF_INET6 if self.vip.version == 6 else socket.AF_INET
        self.threads = [
            threading.Thread(target=self._connections, daemon=True),
            threading.Thread(target=self._datagrams, daemon=True),
        ]
        self.raw: socket.socket | None = None
        if probe > 0:
            with client.entered():
                self.raw = socket.socket(
                    socket.AF_PACKET,
                    socket.SOCK_RAW,
                    socket.htons(
                        packets.ETH_P_ARP if self.vip.version == 4 else packets.ETH_P_IPV6
                    ),
                )
            self.raw.bind(("eth0", 0))
            self.mac = self.raw.getsockname()[4]
            self.threads += [
                threading.Thread(target=self._probes, daemon=True),
                threading.Thread(target=self._listen, daemon=True),
            ]
        self.began = time.monotonic()
        for thread in self.threads:
            thread.start()

    def _running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() - self.began < self.limit

    def _connections(self) -> None:
        while self._running():
            started = time.monotonic()
            with self.client.entered():
                sock = socket.socket(self.family, socket.SOCK_STREAM)
            who = ""
            with sock:
                sock.settimeout(SAMPLE_TIMEOUT)
                try:
                    sock.connect((str(self.vip), PORT))
                    who = sock.recv(64).decode().strip()
                except OSError:
                    pass
            self.tcp.append((time.monotonic(), who))
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _datagrams(self) -> None:
        with self.client.entered():
            sock = socket.socket(self.family, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(SAMPLE_TIMEOUT)
            while self._running():
                started = time.monotonic()
                who = ""
                try:
                    sock.sendto(b"who", (str(self.vip), PORT))
                    who = sock.recv(64).decode().strip()
                except OSError:
                    pass
                self.udp.append((time.monotonic(), who))
                self.stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def _probes(self) -> None:
        assert self.raw is not None
        source4 = ipaddress.IPv4Address(CLIENT4)
        source6 = ipaddress.IPv6Address(CLIENT6)
        while self._running():
            if isinstance(self.vip, ipaddress.IPv4Address):
                frame = packets.arp_frame(
                    packets.ARP_REQUEST, self.mac, source4, packets.ZERO_MAC, self.vip,
                    packets.BROADCAST,
                )  # fmt: skip
            else:
                frame = packets.solicitation(self.vip, self.mac, source6)
            with contextlib.suppress(OSError):
                self.raw.send(frame)
            self.stop.wait(self.probe)

    def _listen(self) -> None:
        assert self.raw is not None
        self.raw.settimeout(0.2)
        while self._running():
            try:
                frame = self.raw.recv(2048)
            except OSError:
                continue
            now = time.monotonic()
            if isinstance(self.vip, ipaddress.IPv4Address):
                arp = packets.parse_arp(frame)
                if arp is not None and arp.sender_ip == self.vip and arp.sender_mac != self.mac:
                    self.answers.append((now, packets.mac_text(arp.sender_mac)))
            else:
                na = packets.parse_advertisement(frame)
                if na is not None and na[0] == self.vip:
                    self.answers.append((now, packets.mac_text(na[1])))

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        if self.raw is not None:
            self.raw.close()
        return {"tcp": self.tcp, "udp": self.udp, "answers": self.answers}


class Cluster:
    """The LAN, the nodes with their API paths, and one agent process per node."""

    #: The director nodes, each with its agent (a subclass may run fewer).
    node_names: tuple[str, ...] = NODES
    #: More arguments of every ``ipvs-agent run`` (a subclass's mode).
    agent_args: tuple[str, ...] = ()

    def __init__(self, share: Path, kubeconfig: str, resync: float) -> None:
        self.share = share
        self.kubeconfig = kubeconfig
        self.resync = resync
        self.lab = Lab()
        self.ipr = IPRoute()
        self.nodes: dict[str, Netns] = {}
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.streams: dict[int, Stream] = {}
        self.client: Netns | None = None

    def _sysctl(self, key: str, value: int) -> None:
        with open("/proc/sys/" + key.replace(".", "/"), "w") as handle:
            handle.write(f"{value}\n")

    def build(self) -> None:
        self._sysctl("net.ipv4.ip_forward", 1)
        rules = (
            "table ip l2lab {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
            '  oifname "eth0" ip saddr 198.18.1.0/24 masquerade\n }\n}\n'
        )
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
        (switch,) = self.lab.netns("sw")
        self.switch = switch
        switch.ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_mcast_snooping=0)
        switch.link_up("br0")
        plug = self.plug
        for index, ns in enumerate(self.lab.netns(*self.node_names), start=1):
            self.nodes[ns.name.rsplit("-", 1)[-1]] = ns
            plug(ns, *node_addresses(index))
            host, inner = f"198.18.1.{4 * index - 3}", f"198.18.1.{4 * index - 2}"
            name = f"api-n{index}"
            self.ipr.link(
                "add", ifname=name, kind="veth", peer={"ifname": "api0", "net_ns_fd": ns.path}
            )
            link = self.ipr.link_lookup(ifname=name)[0]
            self.ipr.addr("add", index=link, address=host, prefixlen=30)
            self.ipr.link("set", index=link, state="up")
            ns.link_up("api0")
            ns.add_address("api0", inner, 30)
            ns.add_route(f"{API_ADDRESS}/32", host)
        (client,) = self.lab.netns("c1")
        self.client = client
        plug(client, CLIENT4, CLIENT6)
        for name, ns in zip(REAL_SERVERS, self.lab.netns(*REAL_SERVERS), strict=True):
            v4, v6 = REAL_SERVERS[name]
            plug(ns, v4, v6)
            self.lab.start_server(ns, name)
        for v4, _ in REAL_SERVERS.values():
            wait_tcp_port(client, v4, PORT)

    def plug(self, ns: Netns, v4: str, v6: str) -> None:
        """``ns``'s ``eth0`` on the LAN's bridge, with these addresses."""
        port = f"p-{ns.name.rsplit('-', 1)[-1]}"[:15]
        self.lab.veth(ns, "eth0", self.switch, port)
        index = self.switch.index(port)
        self.switch.ipr.link("set", index=index, master=self.switch.index("br0"), state="up")
        ns.link_up("eth0")
        ns.add_address("eth0", v4, 24)
        ns.add_address("eth0", v6, 64)

    # -- agents ----------------------------------------------------------------------

    def start_agent(self, node: str) -> None:
        ns = self.nodes[node]
        log = (self.share / f"agent-{node}.log").open("ab")
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "POD_NAMESPACE": "ipvs-system",
            "PYTHONUNBUFFERED": "1",
        }
        argv = [
            "ip", "netns", "exec", ns.name, sys.executable, "-m", "ipvs_agent", "run",
            "--node-name", node, "--metrics-port", "0", "--resync-seconds", str(self.resync),
            "--state-dir", f"/run/ipvs-agent-{node}", "--netns-dir", f"/run/ipvs-none-{node}",
            *self.agent_args,
        ]  # fmt: skip
        self.agents[node] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def stop_agent(self, node: str, kill: bool = False, timeout: float = 120.0) -> int | None:
        """SIGTERM (a rollout or drain) or SIGKILL (a crash); the exit status."""
        agent = self.agents[node]
        agent.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            return agent.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def agents_alive(self) -> dict[str, bool]:
        return {node: agent.poll() is None for node, agent in self.agents.items()}

    def link(self, node: str, up: bool) -> None:
        self.nodes[node].ip(f"link set eth0 {'up' if up else 'down'}")

    def macs(self) -> dict[str, str]:
        found = {}
        for node, ns in self.nodes.items():
            link = ns.ipr.link("get", index=ns.index("eth0"))[0]
            found[node] = str(link.get_attr("IFLA_ADDRESS"))
        return found

    # -- traffic ---------------------------------------------------------------------

    def stream_start(
        self, vip: str, interval: float = 0.05, probe: float = 0.1, limit: float = 300.0
    ) -> int:
        assert self.client is not None
        handle = max(self.streams, default=0) + 1
        self.streams[handle] = Stream(self.client, vip, interval, probe, limit)
        return handle

    def stream_stop(self, handle: int) -> dict[str, Any]:
        return self.streams.pop(handle).finish()

    def now(self) -> float:
        return time.monotonic()

    def run(self, argv: list[str], node: str = "") -> dict[str, Any]:
        if node:
            argv = ["ip", "netns", "exec", self.nodes[node].name, *argv]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        return {"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The requests the host may send."""
        return {
            "agents_alive": self.agents_alive,
            "start_agent": self.start_agent,
            "stop_agent": self.stop_agent,
            "link": self.link,
            "macs": self.macs,
            "stream_start": self.stream_start,
            "stream_stop": self.stream_stop,
            "now": self.now,
            "run": self.run,
        }

    def close(self) -> None:
        for stream in self.streams.values():
            stream.finish()
        for agent in self.agents.values():
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
        self.lab.close()
        self.ipr.close()


def main(argv: list[str] | None = None, kind: type[Cluster] = Cluster) -> int:
    """Build, start the agents (their imports take minutes under TCG), then call home."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True, help="ADDRESS:PORT of the host controller")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--resync-seconds", type=float, default=30.0)
    args, _ = parser.parse_known_args(argv)
    address, port = args.control.rsplit(":", 1)
    cluster = kind(Path(args.kubeconfig).parent, args.kubeconfig, args.resync_seconds)
    try:
        started = time.monotonic()
        cluster.build()
        for node in cluster.node_names:
            cluster.start_agent(node)
        hello = {
            "kernel": platform.release(),
            "build_seconds": round(time.monotonic() - started, 1),
            "macs": cluster.macs(),
        }
        with contextlib.closing(_connect_home(address, int(port), CONNECT_TIMEOUT)) as conn:
            conn.settimeout(None)
            serve(cluster.handlers(), conn, hello)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
