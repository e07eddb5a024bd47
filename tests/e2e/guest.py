"""The lab's node, inside the IPVS VM: demo network, node agent, and traffic on request.

Run by tests/e2e/bed.py as the VM's command (``python -m tests.e2e.guest``). The VM's root
network namespace is the Kubernetes node and IPVS director: ``ipvs-agent run`` runs there
as it would in a host-network DaemonSet pod, programs that netns's IPVS table and holds the
virtual addresses on its ``ipvs0``. It reaches the API server on the host only through the
restricted qemu NIC (``eth0``, a ``guestfwd``). Around it, network namespaces built with
tests/kernel/topology.py:

    c1   198.51.100.101 ── labc (198.51.100.1, root) ─ routed ─ labs (192.0.2.1, root)
    c2   192.0.2.101    ──────────────────────────────────────── labs
    rs1..rs3  192.0.2.11-13 on labs, default route via 192.0.2.1 (NAT replies), and
              DR_VIP on lo, TUN_VIP on an ipip tun0 (arp_ignore/announce, rp_filter 0)

NAT traffic comes from c1 (on the other side of the director, as NAT needs); DR and TUN
traffic from c2, on the real servers' LAN, which they answer directly. Every real server
runs an identity server (tests/kernel/identity_server.py) on port 80.

The daemon then connects to the host's lab controller (a second ``guestfwd``) and serves
requests, one JSON object per line each way, until ``shutdown`` or until the host goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from tests.e2e.destwatch import Watches, table_counts
from tests.image.runner import (
    Container,
    create_host_directories,
    ensure_cgroup2,
    process_status,
    root_mount_options,
)
from tests.kernel.topology import Lab, Netns, wait_tcp_port

#: A BGP router on the client LAN (``start_router``), peering with the node's address there.
ROUTER = "198.51.100.254"
ROUTER_DIR = Path("/run/ipvs-lab-router")
NODE_LAN_CLIENT = "198.51.100.1"
NODE_LAN_SERVER = "192.0.2.1"
NAT_CLIENT = "198.51.100.101"
LAN_CLIENT = "192.0.2.101"
REAL_SERVERS = {"rs1": "192.0.2.11", "rs2": "192.0.2.12", "rs3": "192.0.2.13"}
DR_VIP = "203.0.113.20"
TUN_VIP = "203.0.113.30"
PORT = 80
CONNECT_TIMEOUT = 60.0


def _sysctl(key: str, value: int) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as handle:
        handle.write(f"{value}\n")


class Node:
    """The demo network around the VM's root netns, and the agent process."""

    def __init__(self, share: Path) -> None:
        self.share = share
        self.lab = Lab()
        self.ipr = IPRoute()
        self.clients: dict[str, Netns] = {}
        self.agent: subprocess.Popen[bytes] | None = None
        self.container: Container | None = None  # the agent from the image (runc)
        self.held: dict[int, list[tuple[str, socket.socket]]] = {}
        self._next_hold = 0
        self.router: Netns | None = None
        self.bird: subprocess.Popen[bytes] | None = None
        self.watches = Watches()  # bench/bench_endpoints.py's kernel watches

    # -- building ---------------------------------------------------------------------

    def _bridge(self, name: str, address: str) -> None:
        self.ipr.link("add", ifname=name, kind="bridge", br_stp_state=0, br_mcast_snooping=0)
        index = self.ipr.link_lookup(ifname=name)[0]
        self.ipr.addr("add", index=index, address=address, prefixlen=24)
        self.ipr.link("set", index=index, state="up")

    def _plug(self, ns: Netns, bridge: str, address: str, gateway: str) -> None:
        """A veth from ``ns`` (its eth0, ``address``) into ``bridge`` of the root netns."""
        port = f"lab-{ns.name.rsplit('-', 1)[-1]}"
        self.ipr.link(
            "add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns.path}
        )
        index = self.ipr.link_lookup(ifname=port)[0]
        master = self.ipr.link_lookup(ifname=bridge)[0]
        self.ipr.link("set", index=index, master=master, state="up")
        ns.link_up("eth0")
        ns.add_address("eth0", address, 24)
        ns.add_route("default", gateway)

    def build(self) -> None:
        _sysctl("net.ipv4.ip_forward", 1)
        self._bridge("labc", f"{NODE_LAN_CLIENT}")
        self._bridge("labs", f"{NODE_LAN_SERVER}")
        c1, c2 = self.lab.netns("c1", "c2")
        self._plug(c1, "labc", NAT_CLIENT, NODE_LAN_CLIENT)
        self._plug(c2, "labs", LAN_CLIENT, NODE_LAN_SERVER)
        self.clients = {"c1": c1, "c2": c2}
        for name, ns in zip(REAL_SERVERS, self.lab.netns(*REAL_SERVERS), strict=True):
            rip = REAL_SERVERS[name]
            for scope in ("all", "default"):
                ns.sysctl(f"net.ipv4.conf.{scope}.arp_ignore", 1)
                ns.sysctl(f"net.ipv4.conf.{scope}.arp_announce", 2)
                ns.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 0)
            self._plug(ns, "labs", rip, NODE_LAN_SERVER)
            ns.add_address("lo", DR_VIP, 32)
            ns.ipr.link("add", ifname="tun0", kind="ipip", ipip_local=rip)
            ns.sysctl("net.ipv4.conf.tun0.rp_filter", 0)
            ns.add_address("tun0", TUN_VIP, 32)
            ns.link_up("tun0")
            self.lab.start_server(ns, name)
        for rip in REAL_SERVERS.values():
            wait_tcp_port(self.clients["c2"], rip, PORT)

    def start_agent(self, kubeconfig: str, node_name: str, resync: float, daemonset: str) -> None:
        log = (self.share / "agent.log").open("ab")
        env = {**os.environ, "KUBECONFIG": kubeconfig, "PYTHONUNBUFFERED": "1"}
        argv = [
            sys.executable, "-m", "ipvs_agent", "run", "--node-name", node_name,
            "--metrics-port", "0", "--resync-seconds", str(resync),
            "--state-dir", "/run/ipvs-agent", "--daemonset", daemonset,
        ]  # fmt: skip
        self.agent = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def start_router(self) -> None:
        """BIRD 2 (tests/kernel/bgpbed.py's configuration) in a router namespace on the client
        LAN, peering with the node at ``NODE_LAN_CLIENT``: the agent's ExaBGP has a peer."""
        from tests.kernel import bgpbed

        (router,) = self.lab.netns("r1")
        self.router = router
        self._plug(router, "labc", ROUTER, NODE_LAN_CLIENT)
        ROUTER_DIR.mkdir(parents=True, exist_ok=True)
        config = ROUTER_DIR / "bird.conf"
        config.write_text(bgpbed.bird_config(1, "", [(NODE_LAN_CLIENT, "")], router_id=ROUTER))
        log = (self.share / "bird.log").open("ab")
        self.bird = router.popen(
            ["bird", "-f", "-c", str(config), "-s", str(ROUTER_DIR / "bird.ctl")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

    def router_routes(self) -> str:
        """The router's IPv4 kernel routes (what BGP installed)."""
        assert self.router is not None
        return self.router.run("ip", "-4", "route", "show", "proto", "bird", check=False).stdout

    def handlers(self) -> dict[str, Callable[..., Any]]:
        """The requests the host may send."""
        return {
            "start_router": self.start_router,
            "router_routes": self.router_routes,
            "agent_alive": self.agent_alive,
            "container_status": self.container_status,
            "http_get": self.http_get,
            "stop_agent": self.stop_agent,
            "tcp": self.tcp,
            "hold": self.hold,
            "held_alive": self.held_alive,
            "release": self.release,
            "run": self.run,
            "watch_dest": self.watches.arm,
            "watch_result": self.watches.result,
            "table_counts": table_counts,
            "agent_metrics": self.agent_metrics,
        }

    def stop_agent(self, timeout: float = 120.0) -> int | None:
        """SIGTERM, as the kubelet stops a pod; the agent's exit status (None: still running)."""
        if self.agent is None:
            return None
        self.agent.send_signal(signal.SIGTERM)
        try:
            return self.agent.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def start_agent_container(self, bundles: Path) -> None:
        """The chart's agent pod from the image: the init container, then the agent (runc).

        ``bundles`` holds one runc bundle per container (config.json written by the host from
        the rendered chart, tests/image/oci.py), whose root is the unpacked image.
        """
        ensure_cgroup2()
        state = Path("/run/ipvs-lab-runc")
        init = bundles / "load-modules"
        if init.is_dir():
            create_host_directories(init)
            with (self.share / "agent-init.log").open("ab") as log:
                proc = subprocess.run(
                    ["runc", "--root", str(state), "run", "--bundle", str(init), "load-modules"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=600, check=False,
                )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"init container load-modules exited {proc.returncode}")
            subprocess.run(["runc", "--root", str(state), "delete", "load-modules"], check=False)
        self.container = Container("agent", bundles / "agent", state, self.share / "agent.log")
        self.container.start()

    def agent_alive(self) -> bool:
        if self.container is not None:
            return self.container.running()
        return self.agent is not None and self.agent.poll() is None

    def container_status(self) -> dict[str, Any]:
        """The agent container's first process as the kernel sees it."""
        assert self.container is not None
        pid = self.container.pid
        return {"status": process_status(pid), "root": root_mount_options(pid)}

    def http_get(self, url: str) -> dict[str, Any]:
        """One GET from the node (a kubelet's probe of a host-network pod)."""
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return {"status": response.status, "body": response.read().decode()[:200]}
        except urllib.error.HTTPError as error:
            return {"status": error.code, "body": error.read().decode()[:200]}
        except OSError as error:
            return {"status": 0, "body": repr(error)}

    def agent_metrics(self, prefix: str = "ipvs_agent_") -> dict[str, float]:
        """The agent's /metrics samples named ``prefix``..., histogram buckets left out.

        The lab starts the agent with ``--metrics-port 0``: its port is found from the
        listening TCP sockets the agent's process holds.
        """
        if self.agent is None or self.agent.poll() is not None:
            raise RuntimeError("the agent is not running (as a process of this guest)")
        port = _listening_port(self.agent.pid)
        url = f"http://127.0.0.1:{port}/metrics"
        # With 2000 services x 10 the page holds ~100 000 per-service and per-real-server
        # samples: under emulation it takes longer than 30 s (but less than the host's 180).
        with urllib.request.urlopen(url, timeout=150) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith(prefix) or "_bucket{" in line or "_created" in line:
                continue
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
        return samples

    # -- requests ---------------------------------------------------------------------

    def _connect(
        self, client: str, vip: str, port: int, deadline: float
    ) -> tuple[str, socket.socket]:
        """A connection from ``client`` and the name of the real server that answered."""
        with self.clients[client].entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect((vip, port))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(64)
                if not chunk:
                    raise ConnectionError(f"[{vip}]:{port} closed before an identity: {data!r}")
                data += chunk
        except BaseException:
            sock.close()
            raise
        return data.decode().strip(), sock

    def tcp(self, client: str, vip: str, port: int, count: int, seconds: float) -> dict[str, int]:
        """``count`` sequential connections, each closed before the next: who answered."""
        deadline = time.monotonic() + seconds
        seen: Counter[str] = Counter()
        for _ in range(count):
            name, sock = self._connect(client, vip, port, deadline)
            with sock:
                seen[name] += 1
        return dict(seen)

    def hold(self, client: str, vip: str, port: int, count: int, seconds: float) -> dict[str, Any]:
        """Open ``count`` connections and keep them: a handle and who answered each."""
        deadline = time.monotonic() + seconds
        made: list[tuple[str, socket.socket]] = []
        try:
            for _ in range(count):
                made.append(self._connect(client, vip, port, deadline))
        except BaseException:
            for _, sock in made:
                sock.close()
            raise
        self._next_hold += 1
        self.held[self._next_hold] = made
        return {"handle": self._next_hold, "identities": [name for name, _ in made]}

    def held_alive(self, handle: int) -> list[list[Any]]:
        """[identity, alive] for each held connection: alive = neither closed nor reset."""
        out: list[list[Any]] = []
        for name, sock in self.held[handle]:
            sock.setblocking(False)
            try:
                alive = sock.recv(1) != b""  # the identity server sends nothing more
            except BlockingIOError:
                alive = True
            except OSError as error:
                alive = error.errno not in (errno.ECONNRESET, errno.EPIPE)
            finally:
                sock.setblocking(True)
            out.append([name, alive])
        return out

    def release(self, handle: int) -> None:
        for _, sock in self.held.pop(handle, []):
            sock.close()

    def run(self, argv: list[str]) -> dict[str, Any]:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        return {"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}

    def close(self) -> None:
        for handle in list(self.held):
            self.release(handle)
        if self.container is not None:
            self.container.stop()
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        if self.bird is not None:
            self.bird.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.bird.wait(10)
        self.lab.close()
        self.ipr.close()


def _listening_port(pid: int) -> int:
    """The port of a listening IPv4 TCP socket that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    with open("/proc/net/tcp") as handle:
        for line in list(handle)[1:]:
            words = line.split()
            if words[3] == "0A" and words[9] in inodes:  # TCP_LISTEN
                return int(words[1].rsplit(":", 1)[1], 16)
    raise RuntimeError(f"process {pid} listens on no IPv4 TCP port")


def _connect_home(address: str, port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((address, port), timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def serve(
    handlers: Mapping[str, Callable[..., Any]], conn: socket.socket, hello: dict[str, Any]
) -> None:
    """Answer requests until ``shutdown`` or end of file."""
    reader = conn.makefile("r", encoding="utf-8")
    send = conn.makefile("w", encoding="utf-8")
    send.write(json.dumps({"hello": hello}) + "\n")
    send.flush()
    for line in reader:
        request = json.loads(line)
        op = request.pop("op")
        if op == "shutdown":
            send.write(json.dumps({"ok": True, "result": None}) + "\n")
            send.flush()
            return
        started = time.monotonic()
        try:
            result = handlers[op](**request)
            reply = {"ok": True, "result": result}
        except Exception as error:
            reply = {"ok": False, "error": f"{error!r}", "traceback": traceback.format_exc()}
        reply["seconds"] = round(time.monotonic() - started, 3)
        send.write(json.dumps(reply) + "\n")
        send.flush()


def main(argv: list[str] | None = None) -> int:
    """Start the agent first (its imports take a minute under TCG), build, then call home."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True, help="ADDRESS:PORT of the host controller")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", required=True)
    parser.add_argument("--resync-seconds", type=float, default=30.0)
    parser.add_argument("--daemonset", default="", help="NAMESPACE/NAME the agent watches")
    parser.add_argument("--agent-bundles", help="run the agent from the image: runc bundles")
    args = parser.parse_args(argv)
    address, port = args.control.rsplit(":", 1)
    node = Node(Path(args.kubeconfig).parent)
    try:
        if args.agent_bundles:
            node.start_agent_container(Path(args.agent_bundles))
        else:
            node.start_agent(args.kubeconfig, args.node_name, args.resync_seconds, args.daemonset)
        started = time.monotonic()
        node.build()
        hello = {
            "kernel": platform.release(),
            "build_seconds": round(time.monotonic() - started, 1),
        }
        with contextlib.closing(_connect_home(address, int(port), CONNECT_TIMEOUT)) as conn:
            conn.settimeout(None)
            serve(node.handlers(), conn, hello)
    finally:
        node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
