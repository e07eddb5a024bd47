"""The lab in BGP mode, inside the IPVS VM: two directors announce to a BIRD router.

Run by tests/e2e/bed.py as the VM's command (``python -m tests.e2e.bgpguest``). It is the
layer-2 lab's LAN (tests/e2e/l2guest.py: each director node a network namespace with its own
IPVS table and its own ``ipvs-agent run --bgp`` process against the real API server on the
host) with a router on it and a client behind the router:

    c2 198.51.100.100 ── r1 198.51.100.1 | 192.0.2.254 ── br0 ── n1 192.0.2.1, n2 192.0.2.2
       2001:db8:c::100     2001:db8:c::1 | 2001:db8:1::fe     ── rs1 192.0.2.11, rs2 .12

The router runs BIRD 2 (Debian's ``bird2``, an implementation independent of the agent's
ExaBGP) with the configuration of the kernel tests (tests/kernel/bgpbed.py): it peers with
every director and installs their routes into its kernel with ECMP, hashing flows on
addresses and ports. The real servers hold the VIPs on ``lo`` (direct routing) and answer
through the router. The agents also run the kernel's connection sync daemons on ``eth0``.

Beyond the layer-2 lab's requests, the host may ask for the router's next hops of a VIP, a
``birdc`` command, and held connections from the client (opened, then asked again who
answers them).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e import l2guest
from tests.e2e.l2guest import REAL_SERVERS, Cluster
from tests.kernel import bgpbed
from tests.kernel.topology import Netns, _hide_vip

NODES = ("n1", "n2")
CLIENT4, CLIENT6 = "198.51.100.100", "2001:db8:c::100"
ROUTER4, ROUTER6 = bgpbed.fabric4(254), bgpbed.fabric6(0xFE)
VIP4, VIP6 = bgpbed.VIP4, bgpbed.VIP6
BIRD_DIR = Path("/run/ipvs-lab-bird")
#: Seconds a held connection's answer may take.
HOLD_TIMEOUT = 5.0


class BGPCluster(Cluster):
    """The layer-2 lab's LAN and two directors announcing over BGP to a router."""

    node_names = NODES
    agent_args = ("--bgp", "--sync-interface", "eth0")

    def __init__(self, share: Path, kubeconfig: str, resync: float) -> None:
        super().__init__(share, kubeconfig, resync)
        self.router: Netns | None = None
        self.bird: subprocess.Popen[bytes] | None = None
        self.held: dict[int, list[tuple[socket.socket, str]]] = {}

    def build(self) -> None:
        super().build()
        router, client = self.lab.netns("r1", "c2")
        self.router = router
        self.plug(router, ROUTER4, ROUTER6)
        self.lab.veth(client, "eth0", router, "eth1")
        client.link_up("eth0")
        router.link_up("eth1")
        client.add_address("eth0", CLIENT4, 24)
        client.add_address("eth0", CLIENT6, 64)
        router.add_address("eth1", "198.51.100.1", 24)
        router.add_address("eth1", "2001:db8:c::1", 64)
        client.add_route("default", "198.51.100.1")
        client.add_route("default", "2001:db8:c::1")
        for key in (
            "net.ipv4.ip_forward",
            "net.ipv6.conf.all.forwarding",
            "net.ipv4.fib_multipath_hash_policy",
            "net.ipv6.fib_multipath_hash_policy",
        ):
            router.sysctl(key, 1)
        # Direct routing: the real servers accept the VIPs and answer through the router.
        for name in REAL_SERVERS:
            (ns,) = [n for n in self.lab.namespaces if n.name.rsplit("-", 1)[-1] == name]
            ns.add_route("default", ROUTER4)
            ns.add_route("default", ROUTER6)
            _hide_vip(ns)
            ns.add_address("lo", VIP4, 32)
            ns.add_address("lo", VIP6, 128)
        self.client = client
        BIRD_DIR.mkdir(parents=True, exist_ok=True)
        config = BIRD_DIR / "bird.conf"
        config.write_text(bgpbed.bird_config(len(NODES), ""))
        log = (self.share / "bird.log").open("ab")
        self.bird = router.popen(
            ["bird", "-f", "-c", str(config), "-s", str(BIRD_DIR / "bird.ctl"),
             "-P", str(BIRD_DIR / "bird.pid")],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

    # -- the router's view ------------------------------------------------------------

    def next_hops(self, vip: str) -> list[str]:
        """The next hops of ``vip`` in the router's kernel FIB (none: no route)."""
        assert self.router is not None
        out = self.router.run("ip", "-6" if ":" in vip else "-4", "route", "show", vip).stdout
        words = out.split()
        return sorted({words[i + 1] for i, word in enumerate(words[:-1]) if word == "via"})

    def birdc(self, args: list[str]) -> str:
        assert self.router is not None
        return self.router.run("birdc", "-s", str(BIRD_DIR / "bird.ctl"), *args, check=False).stdout

    # -- held connections -------------------------------------------------------------

    def hold_open(self, vip: str, count: int) -> dict[str, Any]:
        """``count`` TCP connections from the client to ``vip``, kept open; who answered."""
        assert self.client is not None
        family = socket.AF_INET6 if ":" in vip else socket.AF_INET
        held: list[tuple[socket.socket, str]] = []
        for _ in range(count):
            with self.client.entered():
                sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(HOLD_TIMEOUT)
            try:
                sock.connect((vip, l2guest.PORT))
                held.append((sock, sock.recv(64).decode().strip()))
            except OSError:
                sock.close()
                held.append((socket.socket(), ""))
        handle = max(self.held, default=0) + 1
        self.held[handle] = held
        return {"handle": handle, "identities": [who for _, who in held]}

    def hold_check(self, handle: int) -> dict[str, int]:
        """How many held connections still reach the real server that first answered them."""
        held = self.held[handle]
        kept = sum(1 for sock, first in held if first and bgpbed.ping(sock, HOLD_TIMEOUT) == first)
        return {"kept": kept, "opened": sum(1 for _, first in held if first)}

    def hold_close(self, handle: int) -> None:
        for sock, _ in self.held.pop(handle):
            sock.close()

    def handlers(self) -> dict[str, Callable[..., Any]]:
        return {
            **super().handlers(),
            "next_hops": self.next_hops,
            "birdc": self.birdc,
            "hold_open": self.hold_open,
            "hold_check": self.hold_check,
            "hold_close": self.hold_close,
        }

    def close(self) -> None:
        for handle in list(self.held):
            self.hold_close(handle)
        super().close()
        if self.bird is not None:
            self.bird.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.bird.wait(10)


if __name__ == "__main__":
    sys.exit(l2guest.main(kind=BGPCluster))
