"""Active-active directors behind a BGP router, in the VM: the bed of test_bgp.py and
bench/bench_bgp.py.

A router namespace runs BIRD 2 (Debian's ``bird2``: an independent BGP implementation) and
installs the directors' host routes into its kernel with ECMP (``merge paths on``), hashing
flows on addresses and ports (``fib_multipath_hash_policy=1``); a client sits behind it. Each
director namespace runs the agent's pipeline as the in-cluster agent does — the reconcile pass
with the real host layer (VIPs on ``ipvs0``, the nftables guard, sysctls) and the BGP speaker
with ExaBGP, fed by the same ``plan_from_pass`` — and, if asked, the connection sync daemons.
Real servers share the fabric LAN with the directors (DR needs it) and answer clients through
the router.

```
  c1 198.51.100.100 ── r1 198.51.100.1 | 192.0.2.254 ── br0 ── d1 192.0.2.1 ... dN 192.0.2.N
     2001:db8:c::100      2001:db8:c::1 | 2001:db8:1::fe      ── rs1 192.0.2.11, rs2 192.0.2.12
```
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipvs_agent.announce.bgp.inputs import plan_from_pass
from ipvs_agent.announce.bgp.speaker import BGPSpeaker, exabgp_factory
from ipvs_agent.kernel.ipvs import IPVSKernel
from ipvs_agent.reconciler import PassResult
from ipvs_agent.syncd import SyncDaemons, SyncSettings
from ipvs_api import load
from tests.kernel.agent_harness import NodeAgent
from tests.kernel.topology import Client, Lab, Netns, ServerProcess, _attach, _hide_vip, _switch
from tests.kernel.traffic import wait_for

ROUTER_ASN, DIRECTOR_ASN = 64512, 64513
VIP4, VIP6 = "203.0.113.10", "2001:db8:f::10"
PORT = 80
HOLD = 3


def fabric4(host: int) -> str:
    return f"192.0.2.{host}"


def fabric6(host: int) -> str:
    return f"2001:db8:1::{host:x}"


@dataclass
class Director:
    name: str
    ns: Netns
    index: int
    agent: NodeAgent
    speaker: BGPSpeaker
    stop: threading.Event
    thread: threading.Thread
    sync: SyncDaemons | None = None
    last: PassResult | None = None
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def addr4(self) -> str:
        return fabric4(self.index)

    @property
    def addr6(self) -> str:
        return fabric6(self.index)


@dataclass
class RealServerHost:
    name: str
    ns: Netns
    addr4: str
    addr6: str
    server: ServerProcess


@dataclass
class BGPBed:
    lab: Lab
    workdir: Path
    router: Netns
    client: Client
    client6: Client
    directors: list[Director]
    real_servers: list[RealServerHost]
    password: str = ""
    bird: subprocess.Popen[Any] | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)

    # --- the router's view ------------------------------------------------------------------

    def birdc(self, *command: str) -> str:
        return self.router.run("birdc", "-s", str(self.workdir / "bird.ctl"), *command).stdout

    def next_hops(self, vip: str) -> set[str]:
        """The next hops of ``vip``'s route in the router's kernel FIB (empty: no route)."""
        six = ":" in vip
        out = self.router.run("ip", "-6" if six else "-4", "route", "show", vip).stdout
        hops = set()
        words = out.split()
        for i, word in enumerate(words[:-1]):
            if word == "via":
                hops.add(words[i + 1].removeprefix("inet6").strip())
        return hops

    def wait_next_hops(self, vip: str, hops: set[str], timeout: float = 60.0) -> float:
        """Poll until the router's FIB holds exactly ``hops`` for ``vip``; seconds waited."""
        start = time.monotonic()
        wait_for(lambda: self.next_hops(vip) == hops, f"{vip} via {sorted(hops)} in the "
                 f"router's FIB (now {sorted(self.next_hops(vip))})", timeout, 0.1)  # fmt: skip
        return time.monotonic() - start

    # --- the directors ------------------------------------------------------------------------

    def program(self, vs: dict[str, Any], pool: dict[str, Any], peers: Sequence[dict[str, Any]],
                directors: Sequence[Director] | None = None) -> None:  # fmt: skip
        """One pass on each director with these objects, then its BGP plan to its speaker."""
        for d in directors or self.directors:
            self.pass_on(d, [vs], pool, peers)

    def pass_on(
        self,
        d: Director,
        vss: Sequence[dict[str, Any]],
        pool: dict[str, Any],
        peers: Sequence[dict[str, Any]],
    ) -> PassResult:
        result = d.agent.reconcile(list(vss))
        if d.sync is not None:
            with IPVSKernel(netns=d.ns.name) as kernel:
                d.sync.ensure(kernel)
        address_pool = load.address_pool(pool)
        bgp_peers = [load.bgp_peer(p) for p in peers]
        passwords = {("bgp", "password"): self.password} if self.password else {}
        snap_vss = [load.virtual_server(v) for v in vss]
        plan = plan_from_pass(
            snap_vss,
            {},
            {address_pool.name: address_pool},
            result.outcomes,
            result.plan,
            node_of(d),
            bgp_peers,
            passwords,
        )
        d.speaker.update(plan)
        d.last = result
        return result

    def established(self, d: Director, peers: Sequence[str]) -> bool:
        states = d.speaker.session_states()
        return all(str(states.get(p)) == "Established" for p in peers)

    def stop_director(self, d: Director) -> None:
        """A planned stop (SIGTERM of the agent): withdraw, then ExaBGP closes its sessions."""
        d.speaker.leave()
        d.stop.set()
        d.thread.join(10)

    def kill_director(self, d: Director) -> None:
        """A node dying: it goes silent at once (every packet dropped, in and out), its agent
        and ExaBGP are gone without a word; the router notices when the hold time runs out."""
        rules = (
            "table netdev crash {\n"
            "  chain ingress_drop {\n"
            "    type filter hook ingress device eth0 priority -500; policy drop;\n"
            "  }\n"
            "}\n"
            "table inet crash {\n"
            "  chain output_drop { type filter hook output priority -500; policy drop; }\n"
            "  chain forward_drop { type filter hook forward priority -500; policy drop; }\n"
            "}\n"
        )
        with d.ns.entered():
            subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, timeout=30)
        d.stop.set()
        d.speaker.abandon()

    def close(self) -> None:
        for d in self.directors:
            d.stop.set()
            with contextlib.suppress(Exception):
                d.speaker.abandon()
            d.agent.close()
        if self.bird is not None:
            self.bird.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.bird.wait(10)


def node_of(d: Director) -> Any:
    from ipvs_agent.desired import Node

    addresses = frozenset(ipaddress.ip_address(a) for a in (d.addr4, d.addr6))
    return Node(d.name, dict(d.labels), None, addresses, active_active=True)


def peer_objects(password: bool = False, hold: int = HOLD) -> list[dict[str, Any]]:
    """The BGPPeers of the bed: the router, once per family."""
    peers = []
    for name, address in (("r1", fabric4(254)), ("r1-v6", fabric6(0xFE))):
        spec: dict[str, Any] = {
            "address": address,
            "asn": ROUTER_ASN,
            "localASN": DIRECTOR_ASN,
            "holdTimeSeconds": hold,
        }
        if password:
            spec["passwordSecret"] = {"name": "bgp"}
        peers.append(
            {"apiVersion": "ipvs.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": name},
             "spec": spec}
        )  # fmt: skip
    return peers


def pool_object(**bgp: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "AddressPool",
        "metadata": {"name": "anycast"},
        "spec": {"addresses": ["203.0.113.0/28", "2001:db8:f::/120"], "bgp": bgp},
    }


def virtual_server(
    vip: str,
    method: str,
    real_servers: Sequence[RealServerHost],
    scheduler: str = "mh",
    weights: Sequence[int] | None = None,
    name: str = "web",
) -> dict[str, Any]:
    six = ":" in vip
    static = [
        {"address": rs.addr6 if six else rs.addr4, "weight": (weights[i] if weights else 1)}
        for i, rs in enumerate(real_servers)
    ]
    forwarding: dict[str, Any] = {"method": method}
    if method == "TUN":
        forwarding["tunnel"] = {"type": "ipip"}
    flags = ["mh-fallback"] if scheduler == "mh" else []
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "lab"},
        "spec": {
            "address": vip,
            "ports": [{"port": PORT, "protocol": "TCP"}],
            "scheduler": {"name": scheduler, **({"flags": flags} if flags else {})},
            "forwarding": forwarding,
            "backends": {"static": static},
        },
        "status": {"address": vip, "addressPool": "anycast"},
    }


def bird_config(
    directors: int,
    password: str,
    neighbors: Sequence[tuple[str, str]] | None = None,
    router_id: str = fabric4(254),
) -> str:
    """BIRD's configuration: ECMP into the kernel, one session per director and family (the
    fabric's addresses), or per (IPv4, IPv6) pair of ``neighbors``."""
    pairs = neighbors or [(fabric4(i), fabric6(i)) for i in range(1, directors + 1)]
    lines = [
        f"router id {router_id};",
        "protocol device { scan time 1; }",
        "protocol kernel k4 { ipv4 { export all; import none; }; merge paths on; }",
        "protocol kernel k6 { ipv6 { export all; import none; }; merge paths on; }",
        "template bgp directors {",
        f"  local as {ROUTER_ASN};",
        f"  hold time {HOLD};",
        "  connect retry time 1;",
        "  error wait time 1, 2;",
    ]
    if password:
        lines.append(f'  password "{password}";')
    lines.append("}")
    for i, (v4, v6) in enumerate(pairs, start=1):
        lines += [
            f"protocol bgp d{i} from directors {{ neighbor {v4} as {DIRECTOR_ASN};",
            "  ipv4 { import all; export none; }; }",
        ]
        if v6:
            lines += [
                f"protocol bgp d{i}v6 from directors {{ neighbor {v6} as {DIRECTOR_ASN};",
                "  ipv6 { import all; export none; }; }",
            ]
    return "\n".join(lines) + "\n"


def build(
    lab: Lab,
    workdir: Path,
    directors: int = 2,
    real_servers: int = 2,
    method: str = "DR",
    password: str = "",
    sync: bool = False,
) -> BGPBed:
    """The whole bed, BIRD started, the directors' agents and speakers ready (no VS yet)."""
    workdir.mkdir(parents=True, exist_ok=True)
    switch, router, client_ns = lab.netns("sw", "r1", "c1")
    _switch(switch, ["br0"])
    # router: the client link and the fabric
    lab.veth(client_ns, "eth0", router, "eth1")
    client_ns.link_up("eth0")
    router.link_up("eth1")
    client_ns.add_address("eth0", "198.51.100.100", 24)
    client_ns.add_address("eth0", "2001:db8:c::100", 64)
    router.add_address("eth1", "198.51.100.1", 24)
    router.add_address("eth1", "2001:db8:c::1", 64)
    client_ns.add_route("default", "198.51.100.1")
    client_ns.add_route("default", "2001:db8:c::1")
    _attach(lab, switch, "br0", router, "eth0")
    router.add_address("eth0", fabric4(254), 24)
    router.add_address("eth0", fabric6(0xFE), 64)
    for key, value in (
        ("net.ipv4.ip_forward", 1),
        ("net.ipv6.conf.all.forwarding", 1),
        ("net.ipv4.fib_multipath_hash_policy", 1),
        ("net.ipv6.fib_multipath_hash_policy", 1),
    ):
        router.sysctl(key, value)
    # real servers: on the fabric, answering clients through the router (DR/TUN)
    hosts: list[RealServerHost] = []
    for i, ns in enumerate(lab.netns(*(f"rs{n + 1}" for n in range(real_servers)))):
        name = f"rs{i + 1}"
        _attach(lab, switch, "br0", ns, "eth0")
        a4, a6 = fabric4(11 + i), fabric6(0x11 + i)
        ns.add_address("eth0", a4, 24)
        ns.add_address("eth0", a6, 64)
        ns.add_route("default", fabric4(254))
        ns.add_route("default", fabric6(0xFE))
        _hide_vip(ns)
        if method == "DR":
            ns.add_address("lo", VIP4, 32)
            ns.add_address("lo", VIP6, 128)
        elif method == "TUN":
            ns.ipr.link("add", ifname="tun0", kind="ipip", ipip_local=a4)
            ns.ipr.link("add", ifname="tun6", kind="ip6tnl", ip6tnl_local=a6)
            for dev in ("tun0", "tun6"):
                ns.link_up(dev)
            ns.add_address("tun0", VIP4, 32)
            ns.add_address("tun6", VIP6, 128)
            for scope in ("all", "default", "tun0"):
                ns.sysctl(f"net.ipv4.conf.{scope}.rp_filter", 0)
        else:  # NAT: replies go back through a director; the agent masquerades (Cluster)
            pass
        hosts.append(RealServerHost(name, ns, a4, a6, lab.start_server(ns, name)))
    # directors
    made: list[Director] = []
    for i, ns in enumerate(lab.netns(*(f"d{n + 1}" for n in range(directors))), start=1):
        _attach(lab, switch, "br0", ns, "eth0")
        ns.add_address("eth0", fabric4(i), 24)
        ns.add_address("eth0", fabric6(i), 64)
        ns.add_route("default", fabric4(254))
        ns.add_route("default", fabric6(0xFE))
        state = workdir / f"d{i}-state"
        agent = NodeAgent(
            ns, f"d{i}", [fabric4(i), fabric6(i)], state_dir=state, active_active=True,
            connection_sync=sync,
        )  # fmt: skip
        speaker = BGPSpeaker(exabgp_factory(workdir / f"d{i}-bgp"))
        stop = threading.Event()
        thread = threading.Thread(
            target=ns.call, args=(speaker.run, stop), name=f"bgp-d{i}", daemon=True
        )
        thread.start()
        syncd = SyncDaemons(SyncSettings("eth0", sync_id=7), agent.host.state) if sync else None
        made.append(Director(f"d{i}", ns, i, agent, speaker, stop, thread, syncd))
    config = workdir / "bird.conf"
    config.write_text(bird_config(directors, password))
    bed = BGPBed(lab, workdir, router, Client(client_ns, "198.51.100.100"),
                 Client(client_ns, "2001:db8:c::100"), made, hosts, password)  # fmt: skip
    bed.bird = router.popen(
        ["bird", "-f", "-c", str(config), "-s", str(workdir / "bird.ctl"),
         "-P", str(workdir / "bird.pid")],
        stdout=open(workdir / "bird.log", "w"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for(lambda: (workdir / "bird.ctl").exists(), "BIRD's control socket", 30)
    return bed


@contextlib.contextmanager
def bed(lab: Lab, workdir: Path, **kw: Any) -> Iterator[BGPBed]:
    made = build(lab, workdir, **kw)
    try:
        yield made
    finally:
        made.close()


def ping(sock: Any, timeout: float = 5.0) -> str:
    """Ask a held connection's real server for its name again ("" if the connection is dead:
    reset, or no answer within ``timeout``)."""
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.sendall(b"ping\n")
        data = b""
        while not data.endswith(b"\n"):
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(256)
            if not chunk:
                return ""
            data += chunk
        return data.decode().strip()
    except OSError:
        return ""


def survivors(sockets: Sequence[Any], identities: Sequence[str], timeout: float = 5.0) -> int:
    """How many held connections still reach the real server they first reached. Each is
    asked in turn; every one has ``timeout`` seconds (a lost one costs that much)."""
    return sum(
        1 for sock, first in zip(sockets, identities, strict=True) if ping(sock, timeout) == first
    )


def route_via(router: Netns, vip: str, hops: Sequence[str]) -> None:
    """A static route in the router (tests without BGP): ``vip`` via these next hops."""
    six = ":" in vip
    plen = 128 if six else 32
    nexthops = " ".join(f"nexthop via {h}" for h in hops)
    router.ip(f"{'-6 ' if six else ''}route replace {vip}/{plen} {nexthops}")
