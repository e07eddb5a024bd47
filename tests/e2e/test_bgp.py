"""BGP announcement with two directors, each its own ``ipvs-agent run --bgp``, against the real
API server and a BIRD router (the lab in BGP mode, tests/e2e/bgpguest.py).

What a user applies (tests/e2e/bgpscenario.py): BGPPeers for the router, an AddressPool with
``bgp``, a VirtualServer per family with ``mh`` over direct routing. Through the events of a
director's life, with a client behind the router streaming new TCP connections and UDP
datagrams and holding connections open:

1. both directors' sessions establish; the router's FIB holds each VIP with one next hop per
   director, its flows spread over both, and status names both;
2. a director's agent stops (SIGTERM: a rollout or drain): it withdraws before it goes (its
   kernel keeps forwarding what still arrives), so no new connection fails, and every held
   connection carries on through the other director;
3. it comes back and announces again;
4. an agent is killed (SIGKILL: a crash): its ExaBGP dies with it, the session closes and the
   router drops the route without waiting for the hold time; the node's kernel keeps
   forwarding meanwhile, so nothing fails.

A director whose node goes silent (no session close, only the hold time) is measured by the
kernel tests and bench/bench_bgp.py, where the bed can drop every packet of a node.
Tests run in order and share the lab.
"""

from __future__ import annotations

from tests.e2e import bgpscenario as bs
from tests.e2e import l2scenario as l2
from tests.e2e.bed import LabBed, wait_for
from tests.e2e.bgpguest import NODES
from tests.kernel.bgpbed import HOLD

#: Each stream's samples: a new TCP connection and a UDP datagram every 50 ms.
STREAM_LIMIT = 600.0
#: Held connections through the directors while one stops.
HELD = 40


def watch(bed: LabBed) -> list[int]:
    """Streams from the client behind the router to both VIPs (no ARP probes: it is routed)."""
    return [
        int(bed.call("stream_start", vip=vip, probe=0, limit=STREAM_LIMIT))
        for vip in bs.VIPS.values()
    ]


def assert_nothing_failed(seen: list[l2.Seen], what: str) -> None:
    for s in seen:
        failed = [
            (kind, round(t - s.at, 2))
            for kind, samples in (("tcp", s.tcp), ("udp", s.udp))
            for t, who in samples
            if not who
        ]
        print(f"{what} {s.vip}: {len(s.tcp)} TCP, {len(s.udp)} UDP samples; failed {failed}")
        assert s.tcp and s.udp, (what, s.vip, "no samples")
        assert not failed, (what, s.vip, failed)


def test_both_directors_announce_and_the_router_spreads_flows(bgplab: LabBed) -> None:
    bed = bgplab
    bs.wait_announced(bed, NODES)
    for node in NODES:
        wait_for(
            f"{node}'s sessions Established in its IPVSNode",
            lambda node=node: (
                bs.sessions(bed, node)  # type: ignore[misc]
                == dict.fromkeys(bs.PEERS, "Established")
            ),
            bs.TIMEOUT,
        )
    route = bed.call("birdc", args=["show", "route", "all", f"{bs.VIP4}/32"])
    print(route)
    assert "(64512,100)" in route, "the pool's community reaches the router"
    before = {node: bs.director_connections(bed, node, bs.VIP4) for node in NODES}
    handles = watch(bed)
    at = float(bed.call("now"))
    l2.settle(bed, 5.0)
    seen = l2.seen(bed, list(bs.VIPS.values()), handles, at)
    assert_nothing_failed(seen, "steady state")
    for s in seen:
        assert {who for _, who in s.tcp} == set(l2.REAL_SERVERS), "mh-port spreads flows"
    spread = {n: bs.director_connections(bed, n, bs.VIP4) - before[n] for n in NODES}
    print(f"new connections to {bs.VIP4} scheduled per director: {spread}")
    assert all(count > 0 for count in spread.values()), ("ECMP over both directors", spread)


def test_a_stopping_director_withdraws_before_it_goes(bgplab: LabBed) -> None:
    bed = bgplab
    bs.wait_announced(bed, NODES)
    held = bed.call("hold_open", vip=bs.VIP4, count=HELD)
    assert all(held["identities"]), held
    handles = watch(bed)
    l2.settle(bed, 1.0)
    at = float(bed.call("now"))
    assert bed.call("stop_agent", node="n1") == 0
    stopped = float(bed.call("now")) - at
    bs.wait_announced(bed, ("n2",))
    l2.settle(bed, 3.0)
    seen = l2.seen(bed, list(bs.VIPS.values()), handles, at)
    print(f"the agent took {stopped:.2f}s to withdraw and exit")
    assert_nothing_failed(seen, "planned stop")
    kept = bed.call("hold_check", handle=held["handle"])
    bed.call("hold_close", handle=held["handle"])
    print(f"held connections through the stop: {kept}")
    assert kept["kept"] == kept["opened"] == HELD, kept


def test_a_returning_director_announces_again(bgplab: LabBed) -> None:
    bed = bgplab
    bed.call("start_agent", node="n1")
    bs.wait_announced(bed, NODES, timeout=600)  # its start-up takes minutes under TCG


def test_a_killed_agents_routes_go_with_its_session(bgplab: LabBed) -> None:
    bed = bgplab
    bs.wait_announced(bed, NODES)
    handles = watch(bed)
    l2.settle(bed, 1.0)
    at = float(bed.call("now"))
    bed.call("stop_agent", node="n2", kill=True)
    for vip in bs.VIPS.values():
        wait_for(
            f"{vip} via n1 only",
            lambda vip=vip: (
                bs.next_hops(bed, vip)  # type: ignore[misc]
                == {bs.director_address("n1", vip)}
            ),
            60,
            0.1,
        )
    gone = float(bed.call("now")) - at
    l2.settle(bed, 2.0)
    seen = l2.seen(bed, list(bs.VIPS.values()), handles, at)
    print(f"the router dropped the killed agent's routes {gone:.2f}s after the kill "
          f"(hold time {HOLD}s)")  # fmt: skip
    assert_nothing_failed(seen, "agent killed")
    protocols = bed.call("birdc", args=["show", "protocols"])
    print(protocols)
    # The router saw the session end (ExaBGP closed it), not its hold timer run out.
    assert "Hold timer expired" not in protocols, protocols
