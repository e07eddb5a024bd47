"""The agent's nftables table on a real kernel: ownership record and NAT masquerade.

Masquerade is proved with real traffic: a NAT real server whose default route does not lead
back through the director (a pod on another node) only answers once the table marks its
service; a real server of a traffic-policy-Local service (not marked) sees the client itself.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from pathlib import Path

from ipvs_agent.host.addresses import VipInterface
from ipvs_agent.host.nftables import NftTable, Ruleset, render
from ipvs_agent.host.sysctl import VS_CONNTRACK, Needs, apply, needed, read
from ipvs_agent.model import AddressFamily, Protocol, ServiceKey
from tests.kernel.topology import Lab, Netns, build_nat

GOLDEN = Path(__file__).parent.parent / "unit" / "golden" / "nftables"
VIP = ipaddress.ip_address("203.0.113.10")
VIP6 = ipaddress.ip_address("2001:db8:f::10")
CLUSTER_PORT, LOCAL_PORT = 80, 81
REMOTE_RS_PORT, LOCAL_RS_PORT = 8080, 8081

FOREIGN = """\
table inet foreign {
	set owned4 {
		type ipv4_addr . inet_proto . inet_service
		elements = { 192.0.2.99 . tcp . 22 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 counter
	}
}
table ip foreignnat {
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		ip daddr 198.18.0.0/15 masquerade
	}
}
"""


def run_in(ns: Netns, argv: list[str], stdin: str | None = None) -> str:
    """Run a command in ``ns`` with ``stdin`` (ipvsadm -R, nft -f -); its stdout."""
    with ns.entered():
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
        )
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"
    return proc.stdout


def nft(ns: Netns, *args: str, stdin: str | None = None) -> str:
    return run_in(ns, ["nft", *args], stdin)


def connect_fails(ns: Netns, addr: str, port: int, timeout: float = 2.0) -> bool:
    with ns.entered():
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except OSError:
            return True
    return False


def listener(ns: Netns, port: int) -> socket.socket:
    """A TCP listener inside ``ns``; accept() tells which source address reached it."""
    with ns.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(16)
    return sock


def peer_seen(client: Netns, server: socket.socket, addr: str, port: int) -> str:
    """Connect from ``client`` to ``addr:port``; the address the real server saw."""
    with client.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(10)
        sock.connect((addr, port))
        server.settimeout(10)
        conn, peer = server.accept()
        conn.close()
    return str(peer[0])


def test_masquerade_reaches_real_servers_on_other_nodes(lab: Lab) -> None:
    topology = build_nat(lab, family=4, real_servers=2)
    director, client = topology.director, topology.client
    local_rs, remote_rs = topology.real_servers
    # A pod on another node: its replies do not come back through this director.
    remote_rs.ns.ip("route del default")
    director.ip(f"addr del {VIP}/32 dev vip0")
    with VipInterface(netns=director.name) as vips:
        vips.sync({VIP})
    rules = (
        f"-A -t {VIP}:{CLUSTER_PORT} -s rr\n"
        f"-a -t {VIP}:{CLUSTER_PORT} -r {remote_rs.rip}:{REMOTE_RS_PORT} -m\n"
        f"-A -t {VIP}:{LOCAL_PORT} -s rr\n"
        f"-a -t {VIP}:{LOCAL_PORT} -r {local_rs.rip}:{LOCAL_RS_PORT} -m\n"
    )
    run_in(director, ["ipvsadm", "-R"], stdin=rules)
    everything = needed(Needs(True, True, True, True, True), os.uname().release)
    result = apply(everything, netns=director.name)
    assert result.missing == ()
    with director.entered():
        assert read(VS_CONNTRACK) == "1"
    assert not apply(everything, netns=director.name).changed

    remote = listener(remote_rs.ns, REMOTE_RS_PORT)
    local = listener(local_rs.ns, LOCAL_RS_PORT)
    with remote, local:
        assert connect_fails(client.ns, str(VIP), CLUSTER_PORT)

        cluster = ServiceKey.for_address(VIP, Protocol.TCP, CLUSTER_PORT)
        local_only = ServiceKey.for_address(VIP, Protocol.TCP, LOCAL_PORT)
        table = NftTable(netns=director.name)
        assert table.sync(Ruleset.of({cluster, local_only}, {cluster}))

        # Cluster: source NAT to the director, so the reply finds its way back.
        assert peer_seen(client.ns, remote, str(VIP), CLUSTER_PORT) == topology.director_addr
        # Local: not marked, the real server sees the client's own address.
        assert peer_seen(client.ns, local, str(VIP), LOCAL_PORT) == client.addr
        # A client on the director itself (output chain) is masqueraded too.
        assert peer_seen(director, remote, str(VIP), CLUSTER_PORT) == topology.director_addr

        # Dropping the service from the masquerade set breaks the remote path again.
        assert table.sync(Ruleset.of({cluster, local_only}, set()))
        assert connect_fails(client.ns, str(VIP), CLUSTER_PORT)


def test_owned_sets_survive_re_renders_and_other_tables_are_untouched(lab: Lab) -> None:
    (ns,) = lab.netns("nft")
    nft(ns, "-f", "-", stdin=FOREIGN)
    foreign_before = nft(ns, "list", "table", "inet", "foreign")
    nat_before = nft(ns, "list", "table", "ip", "foreignnat")

    table = NftTable(netns=ns.name)
    assert table.read_owned() == set()
    owned = {
        ServiceKey.for_address(VIP, Protocol.TCP, 80),
        ServiceKey.for_address(VIP, Protocol.UDP, 53),
        ServiceKey.for_address(VIP, Protocol.SCTP, 5060),
        ServiceKey.for_address(VIP6, Protocol.TCP, 443),
        ServiceKey.for_fwmark(AddressFamily.INET, 16),
        ServiceKey.for_fwmark(AddressFamily.INET6, 16),
    }
    masquerade = {ServiceKey.for_address(VIP, Protocol.TCP, 80)}
    assert table.sync(Ruleset.of(owned, masquerade))
    assert table.read_owned() == owned
    assert not table.sync(Ruleset.of(owned, masquerade))  # unchanged: nft -f does not run

    more = owned | {ServiceKey.for_address(ipaddress.ip_address("198.51.100.7"), Protocol.TCP, 25)}
    assert table.sync(Ruleset.of(more, masquerade))
    assert NftTable(netns=ns.name).read_owned() == more  # as read by a restarted agent

    # A hand-deleted element is put back at the next sync.
    nft(ns, "delete", "element", "inet", "ipvs-operator", "owned4", "{ 203.0.113.10 . tcp . 80 }")
    assert table.read_owned() == more - {ServiceKey.for_address(VIP, Protocol.TCP, 80)}
    assert table.sync(Ruleset.of(more, masquerade))
    assert table.read_owned() == more

    # Every golden rendering loads on a real kernel (one transaction: each replaces the last).
    goldens = [path.read_text() for path in sorted(GOLDEN.glob("*.nft"))]
    assert len(goldens) >= 4
    table.apply("\n".join([*goldens, render(Ruleset.of(more, masquerade))]))
    assert table.read_owned() == more

    assert table.delete()
    assert not table.delete()
    assert table.read_owned() == set()
    assert nft(ns, "list", "table", "inet", "foreign") == foreign_before
    assert nft(ns, "list", "table", "ip", "foreignnat") == nat_before
