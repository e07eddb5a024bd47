"""BGP announcement against an independent implementation: BIRD 2 in a router namespace.

Directors run the agent's pass and its BGP speaker (ExaBGP) in their own namespaces
(tests/kernel/bgpbed.py); the router installs their host routes with ECMP. What is asserted is
what the router and a client behind it see: sessions established in BIRD, one next hop per
director in the router's kernel FIB, flows spread over the directors, routes withdrawn when a
director stops, is drained or loses its real servers — for IPv4 and IPv6.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_agent.announce.serving import EXCLUDE_LABEL
from tests.kernel import bgpbed
from tests.kernel.bgpbed import VIP4, VIP6, BGPBed, Director
from tests.kernel.topology import Lab
from tests.kernel.traffic import wait_for

PEERS = ("r1", "r1-v6")


def _entries(d: Director, vip: str) -> int:
    """Connection entries for ``vip`` in the director's IPVS table."""
    with d.ns.entered(), open("/proc/thread-self/net/ip_vs_conn") as handle:
        lines = handle.read().splitlines()[1:]
    packed = vip if ":" not in vip else None
    count = 0
    for line in lines:
        field = line.split()[3]
        if (
            packed is not None
            and ":" not in field
            and int(field, 16) == int.from_bytes(bytes(int(p) for p in packed.split(".")), "big")
        ) or (packed is None and ":" in field):
            count += 1
    return count


@pytest.fixture
def bgp(lab: Lab, tmp_path: Path) -> Iterator[BGPBed]:
    with bgpbed.bed(lab, tmp_path / "bed", directors=2) as made:
        yield made


def _announce_everywhere(bgp: BGPBed, **pool: object) -> tuple[dict, dict, dict, list]:  # type: ignore[type-arg]
    peers = bgpbed.peer_objects()
    the_pool = bgpbed.pool_object(**pool)
    v4 = bgpbed.virtual_server(VIP4, "DR", bgp.real_servers)
    v6 = bgpbed.virtual_server(VIP6, "DR", bgp.real_servers, name="web6")
    for d in bgp.directors:
        bgp.pass_on(d, [v4, v6], the_pool, peers)
    for d in bgp.directors:
        _wait_established(bgp, d)
    return v4, v6, the_pool, peers


def _wait_established(bgp: BGPBed, d: Director) -> None:
    wait_for(lambda: bgp.established(d, PEERS), f"{d.name}'s sessions up", 180, 0.5)


def test_every_director_announces_and_the_router_spreads_flows_over_them(bgp: BGPBed) -> None:
    _announce_everywhere(bgp, communities=["64512:100"])
    d1, d2 = bgp.directors
    bgp.wait_next_hops(VIP4, {d1.addr4, d2.addr4})
    bgp.wait_next_hops(VIP6, {d1.addr6, d2.addr6})
    shown = bgp.birdc("show", "protocols")
    assert shown.count("Established") == 4, shown
    route = bgp.birdc("show", "route", "all", f"{VIP4}/32")
    assert "(64512,100)" in route, route
    for d in bgp.directors:  # the agent reports what BIRD sees
        status = d.speaker.status()
        assert status["announced"] == [f"{VIP6}/128", f"{VIP4}/32"], status
        assert {s["state"] for s in status["sessions"]} == {"Established"}, status
    # Flows (one client address, kernel-chosen ports) spread over both directors; mh on both
    # picks one real server for this client, whichever director a flow takes.
    for client, vip in ((bgp.client, VIP4), (bgp.client6, VIP6)):
        seen = client.tcp_identities(vip, bgpbed.PORT, 40)
        spread = {d.name: _entries(d, vip) for d in bgp.directors}
        assert all(n > 0 for n in spread.values()), (vip, spread)
        assert sum(spread.values()) >= 40 and len(seen) == 1, (vip, spread, seen)


def test_routes_are_withdrawn_without_real_servers_on_drain_and_on_stop(bgp: BGPBed) -> None:
    v4, v6, pool, peers = _announce_everywhere(bgp)
    d1, d2 = bgp.directors
    both = {d1.addr4, d2.addr4}
    bgp.wait_next_hops(VIP4, both)
    # d1 loses every real server (all at weight 0): it withdraws, d2 keeps announcing.
    drained = bgpbed.virtual_server(VIP4, "DR", bgp.real_servers, weights=[0, 0])
    bgp.pass_on(d1, [drained, v6], pool, peers)
    bgp.wait_next_hops(VIP4, {d2.addr4}, timeout=20)
    assert bgp.client.tcp_identities(VIP4, bgpbed.PORT, 5).total() == 5
    bgp.pass_on(d1, [v4, v6], pool, peers)
    bgp.wait_next_hops(VIP4, both, timeout=20)
    # Drained node (the well-known exclusion label): it withdraws everything, sessions stay.
    d1.labels[EXCLUDE_LABEL] = ""
    bgp.pass_on(d1, [v4, v6], pool, peers)
    bgp.wait_next_hops(VIP4, {d2.addr4}, timeout=20)
    bgp.wait_next_hops(VIP6, {d2.addr6}, timeout=20)
    assert bgp.established(d1, PEERS)
    del d1.labels[EXCLUDE_LABEL]
    bgp.pass_on(d1, [v4, v6], pool, peers)
    bgp.wait_next_hops(VIP4, both, timeout=20)
    # A planned stop withdraws before ExaBGP goes: the router moves at once, traffic flows.
    bgp.stop_director(d2)
    waited = bgp.wait_next_hops(VIP4, {d1.addr4}, timeout=10)
    bgp.wait_next_hops(VIP6, {d1.addr6}, timeout=10)
    print(f"route gone {waited:.2f} s after the stop returned")
    assert bgp.client.tcp_identities(VIP4, bgpbed.PORT, 5).total() == 5
    assert bgp.client6.tcp_identities(VIP6, bgpbed.PORT, 5).total() == 5


def test_sessions_with_a_password_establish(lab: Lab, tmp_path: Path) -> None:
    with bgpbed.bed(lab, tmp_path / "bed", directors=1, password="s3cr;et'x") as bgp:
        peers = bgpbed.peer_objects(password=True)
        pool = bgpbed.pool_object()
        (d1,) = bgp.directors
        bgp.pass_on(d1, [bgpbed.virtual_server(VIP4, "DR", bgp.real_servers)], pool, peers)
        wait_for(lambda: bgp.established(d1, PEERS), "sessions with MD5 up", 180, 0.5)
        bgp.wait_next_hops(VIP4, {d1.addr4})
