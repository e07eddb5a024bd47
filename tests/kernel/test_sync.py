"""Connections that survive a director's loss: the same real-server order on every director
(mh, sh, dh), the kernel's connection sync daemons through the agent's kernel layer, and held
connections through a director killed behind a BGP router.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_agent.kernel import KernelError
from ipvs_agent.kernel.ipvs import IPVSKernel
from ipvs_agent.model import SyncDaemon, SyncState
from tests.kernel import bgpbed
from tests.kernel.bgpbed import VIP4, BGPBed, route_via, survivors
from tests.kernel.topology import Lab, Netns
from tests.kernel.traffic import _address, open_tcp, wait_for

EXTRA = [f"198.18.0.{i}" for i in range(1, 31)]


def _entries(ns: Netns, vip: str) -> list[tuple[str, int, str]]:
    """(client, client port, real server) of the IPVS connections to ``vip`` in ``ns``."""
    with ns.entered(), open("/proc/thread-self/net/ip_vs_conn") as handle:
        lines = handle.read().splitlines()[1:]
    out = []
    for line in lines:
        f = line.split()
        if _address(f[3]) == vip:
            out.append((_address(f[1]), int(f[2], 16), _address(f[5])))
    return out


def test_sync_daemons_start_report_and_stop(lab: Lab) -> None:
    a, b = lab.netns("sa", "sb")
    lab.veth(a, "eth0", b, "eth0")
    a.link_up("eth0")
    with IPVSKernel(netns=a.name) as kernel:
        master = SyncDaemon(SyncState.MASTER, "eth0", sync_id=7, group="239.0.0.81", port=9000)
        backup = SyncDaemon(SyncState.BACKUP, "eth0", sync_id=7, group="239.0.0.81", port=9000)
        assert kernel.daemons() == ()
        kernel.start_daemon(master)
        kernel.start_daemon(backup)
        running = kernel.daemons()
        assert [d.state for d in running] == [SyncState.MASTER, SyncState.BACKUP]
        assert all(w.matches(r) for w, r in zip((master, backup), running, strict=True))
        shown = a.run("ipvsadm", "-L", "--daemon").stdout
        assert "master sync daemon (mcast=eth0, syncid=7" in shown, shown
        assert "backup sync daemon (mcast=eth0, syncid=7" in shown, shown
        assert "group=239.0.0.81, port=9000" in shown, shown
        with pytest.raises(KernelError) as caught:
            kernel.start_daemon(master)
        assert caught.value.errno == errno.EEXIST
        kernel.stop_daemon(SyncState.MASTER)
        kernel.stop_daemon(SyncState.BACKUP)
        assert kernel.daemons() == ()
        with pytest.raises(KernelError) as caught:
            kernel.start_daemon(SyncDaemon(SyncState.MASTER, "nosuch0"))
        assert caught.value.errno == errno.ENODEV


@pytest.fixture
def synced(lab: Lab, tmp_path: Path) -> Iterator[BGPBed]:
    with bgpbed.bed(lab, tmp_path / "bed", directors=2, real_servers=3, sync=True) as made:
        made.client.ns.ip(*(f"addr add {a}/32 dev eth0" for a in EXTRA))
        made.router.ip("route add 198.18.0.0/24 via 198.51.100.100")
        yield made


def test_directors_with_different_histories_hold_one_order_and_agree(synced: BGPBed) -> None:
    """d1 gets three real servers at once; d2 gets two, then the third in the middle of the
    canonical order: both end with the same list, so mh sends each client to the same real
    server through either director, and d2's reorder keeps a connection it held."""
    bed = synced
    d1, d2 = bed.directors
    rs = bed.real_servers
    pool = bgpbed.pool_object()
    bed.pass_on(d1, [bgpbed.virtual_server(VIP4, "DR", rs)], pool, [])
    bed.pass_on(d2, [bgpbed.virtual_server(VIP4, "DR", [rs[0], rs[2]])], pool, [])
    route_via(bed.router, VIP4, [d2.addr4])
    # a client that d2 sends to rs3, the real server d2's reorder deletes and adds back
    held = None
    for source in EXTRA:
        sock, name = open_tcp(bed.client, VIP4, bgpbed.PORT, source)
        if name == "rs3":
            held = sock
            break
        if sock is not None:
            sock.close()
    assert held is not None, "no client address mapped to rs3 through d2"
    result = bed.pass_on(d2, [bgpbed.virtual_server(VIP4, "DR", rs)], pool, [])
    kinds = [str(op.kind) for op in result.ops]
    assert kinds.count("del-dest") == 1 and kinds.count("add-dest") == 2, kinds
    assert bgpbed.ping(held) == "rs3", "the held connection lived through the reorder"
    held.close()
    with IPVSKernel(netns=d1.ns.name) as k1, IPVSKernel(netns=d2.ns.name) as k2:
        lists = [[str(k) for k in next(iter(k.dump().values())).dests] for k in (k1, k2)]
    assert lists[0] == lists[1] == sorted(lists[0], reverse=True), lists
    through: dict[str, dict[str, str]] = {}
    for d in (d1, d2):
        route_via(bed.router, VIP4, [d.addr4])
        through[d.name] = {}
        for source in EXTRA:
            sock, name = open_tcp(bed.client, VIP4, bgpbed.PORT, source)
            through[d.name][source] = name
            if sock is not None:
                sock.close()
    assert through["d1"] == through["d2"], through
    assert len(set(through["d1"].values())) == 3, through


def test_a_backup_director_carries_on_the_masters_connections(synced: BGPBed) -> None:
    """rr (no consistent hashing): only the synced connection table can keep a flow that
    moves from d1 to d2 on its real server."""
    bed = synced
    d1, d2 = bed.directors
    pool = bgpbed.pool_object()
    vs = bgpbed.virtual_server(VIP4, "DR", bed.real_servers, scheduler="rr")
    for d in (d1, d2):
        bed.pass_on(d, [vs], pool, [])
        assert d.sync is not None and not d.sync.error, d.sync.error if d.sync else ""
        running = {x.state for x in d.sync.running}
        assert running == {SyncState.MASTER, SyncState.BACKUP}
        assert d.ns.read_sysctl("net.ipv4.vs.sync_version") == "1"
    route_via(bed.router, VIP4, [d1.addr4])
    sockets, names = [], []
    for source in EXTRA[:20]:
        sock, name = open_tcp(bed.client, VIP4, bgpbed.PORT, source)
        assert sock is not None
        sockets.append(sock)
        names.append(name)
    assert len(set(names)) == 3, names
    wanted = {(s, rs) for s, rs in zip(EXTRA[:20], names, strict=True)}
    ips = {r.name: r.addr4 for r in bed.real_servers}

    def learned() -> bool:
        seen = {(c, dest) for c, _, dest in _entries(d2.ns, VIP4)}
        return all((s, ips[n]) in seen for s, n in wanted)

    wait_for(learned, "d2's backup daemon learned d1's connections", 30, 0.5)
    route_via(bed.router, VIP4, [d2.addr4])
    assert survivors(sockets, names) == 20
    for sock in sockets:
        sock.close()


def test_held_connections_survive_a_director_killed(lab: Lab, tmp_path: Path) -> None:
    """DR + mh + sync behind BIRD: 100 held connections over two directors, one director dies
    without a word (every packet dropped, its agent and ExaBGP gone): once the router's hold
    time ran out, at least 99 % still reach their real server, and new connections work."""
    with bgpbed.bed(lab, tmp_path / "bed", directors=2, real_servers=2, sync=True) as bed:
        d1, d2 = bed.directors
        peers, pool = bgpbed.peer_objects(), bgpbed.pool_object()
        vs = bgpbed.virtual_server(VIP4, "DR", bed.real_servers)
        for d in bed.directors:
            bed.pass_on(d, [vs], pool, peers)
        for d in bed.directors:
            wait_for(lambda d=d: bed.established(d, ["r1"]), "sessions", 180, 0.5)  # type: ignore[misc]
        bed.wait_next_hops(VIP4, {d1.addr4, d2.addr4})
        sockets, names = [], []
        for _ in range(100):
            sock, name = open_tcp(bed.client, VIP4, bgpbed.PORT)
            assert sock is not None
            sockets.append(sock)
            names.append(name)
        on_d2 = len(_entries(d2.ns, VIP4))
        assert on_d2 > 0 and len(_entries(d1.ns, VIP4)) > 0
        bed.kill_director(d2)
        waited = bed.wait_next_hops(VIP4, {d1.addr4}, timeout=30)
        alive = survivors(sockets, names)
        print(f"route gone {waited:.1f} s after the kill; {alive}/100 held connections "
              f"survived ({on_d2} went through the killed director)")  # fmt: skip
        assert alive >= 99, (alive, on_d2)
        assert bed.client.tcp_identities(VIP4, bgpbed.PORT, 5).total() == 5
        for sock in sockets:
            sock.close()
