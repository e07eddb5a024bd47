"""Layer-2 announcement, the pure parts: election, liveness, inputs from a pass, frames.

Frames are pinned by golden hex files (tests/unit/golden/l2/); review a change to one like code.
Rewrite them after an intended change with ``IPVS_UPDATE_GOLDEN=1 pytest <this file>``.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs_agent.announce import packets
from ipvs_agent.announce.election import Member, Wanted, assign, elect, mine
from ipvs_agent.announce.members import lease_body
from ipvs_agent.announce.speaker import Speaker, interfaces_for, layer2_inputs
from ipvs_agent.desired import Outcome, State
from ipvs_agent.host._netns import HostError
from ipvs_api import load
from ipvs_api.leases import (
    ANNOTATION_LABELS,
    ANNOTATION_UNREADY,
    LeaseRecord,
    Liveness,
    read_lease,
)
from ipvs_api.types import LabelSelector

GOLDEN = Path(__file__).parent / "golden" / "l2"
MAC = bytes.fromhex("02005e0000aa")
CLIENT_MAC = bytes.fromhex("02005e0000c1")
V4 = ipaddress.IPv4Address("192.0.2.50")
V6 = ipaddress.IPv6Address("2001:db8::50")


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


# ------------------------------------------------------------------ election


def test_one_node_per_vip_the_same_on_every_node() -> None:
    members = [Member(n) for n in ("node-a", "node-b", "node-c")]
    wanted = [Wanted(ip(f"192.0.2.{i}")) for i in range(1, 31)]
    owners = assign(wanted, members)
    for node in ("node-a", "node-b", "node-c"):
        # Every node computes the same answer from the same inputs, in any order.
        assert assign(list(reversed(wanted)), list(reversed(members))) == owners
        assert set(mine(node, wanted, members)) == {v for v, o in owners.items() if o == node}
    assert set(owners.values()) == {"node-a", "node-b", "node-c"}, "spread, not all on one"


def test_spread_is_even_and_a_leaving_node_moves_only_its_own_vips() -> None:
    nodes = [f"node-{i}" for i in range(10)]
    wanted = [Wanted(ip(f"198.18.{i // 250}.{i % 250 + 1}")) for i in range(1000)]
    owners = assign(wanted, [Member(n) for n in nodes])
    counts = Counter(owners.values())
    assert min(counts.values()) > 60 and max(counts.values()) < 140, counts  # about 100 each
    after = assign(wanted, [Member(n) for n in nodes if n != "node-3"])
    moved = {v for v in owners if owners[v] != after[v]}
    assert moved == {v for v, o in owners.items() if o == "node-3"}


def test_eligibility_selectors_unready_and_local_endpoints() -> None:
    edge = LabelSelector(match_labels=(("role", "edge"),))
    members = [
        Member("a", {"role": "edge"}),
        Member("b", {"role": "edge"}, unready=frozenset({V4})),
        Member("c", {"role": "core"}),
    ]
    assert elect(V4, []) is None
    assert assign([Wanted(V4, (edge,))], members)[V4] == "a"  # b cannot serve it, c not edge
    assert assign([Wanted(V4, (), frozenset({"c"}))], members)[V4] == "c"  # Local: endpoint
    assert assign([Wanted(V4, (edge,), frozenset({"c"}))], members)[V4] is None


@settings(max_examples=50, deadline=None)
@given(st.sets(st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=8))
def test_exactly_one_winner_among_any_members(names: set[str]) -> None:
    members = [Member(n) for n in names]
    winners = [n for n in names if V4 in mine(n, [Wanted(V4)], members)]
    assert len(winners) == 1 and winners[0] == elect(V4, names)


# ------------------------------------------------------------------ liveness from Leases


def record(node: str, renewed: str, duration: float = 2.0, **kw: Any) -> LeaseRecord:
    return LeaseRecord(node, node, duration, renewed, **kw)


def test_a_lease_is_alive_until_its_duration_passed_since_this_node_saw_it_change() -> None:
    live = Liveness()
    live.observe([record("a", "t1"), record("b", "t1")], now=100.0)
    assert [m.node for m in live.alive(101.9)] == ["a", "b"]
    live.observe([record("a", "t2"), record("b", "t1")], now=101.5)  # a renewed, b did not
    assert [m.node for m in live.alive(102.1)] == ["a"]
    assert live.next_expiry(102.1) == pytest.approx(103.5)
    assert [m.node for m in live.stale(102.1)] == ["b"]
    live.observe([record("a", "t2")], now=102.2)  # b's Lease deleted: gone at once
    assert [m.node for m in live.alive(102.2)] == ["a"]
    assert live.stale(102.2) == [], "no Lease is neither alive nor stale"
    assert [m.node for m in live.stale(103.5)] == ["a"]


def test_a_lagging_observer_declares_nobody_dead_before_it_sees_its_own_later_renewal() -> None:
    """A watch delivers in commit order: a renewal of this node's own written after another
    Lease's deadline proves that the other did not renew in time. Until then (a throttled
    CPU, a lagging watch) the other stays alive, and this node renews at once to find out."""
    written = {"a1": 99.9, "a2": 101.4, "a3": 101.9, "a4": 102.3}  # when node a wrote each
    live = Liveness(me="a")
    live.observe([record("a", "a1"), record("b", "b1")], now=100.0, written=written.get)
    live.observe([record("a", "a2"), record("b", "b1")], now=101.5, written=written.get)
    assert [m.node for m in live.alive(102.5)] == ["a", "b"]  # b past 102.0, unproven
    assert live.stale(102.5) == []
    assert live.awaiting_proof(102.5)
    # Seen late: written before b's deadline, it proves nothing.
    live.observe([record("a", "a3"), record("b", "b1")], now=102.6, written=written.get)
    assert [m.node for m in live.alive(102.6)] == ["a", "b"]
    # Written after b's deadline: had b renewed in time, that would have come first.
    live.observe([record("a", "a4"), record("b", "b1")], now=102.7, written=written.get)
    assert [m.node for m in live.alive(102.7)] == ["a"]
    assert [m.node for m in live.stale(102.7)] == ["b"]
    assert not live.awaiting_proof(102.7)
    # This node's own Lease goes stale on its own clock alone (it is then blind).
    assert [m.node for m in live.alive(104.8)] == []


def test_time_this_node_could_not_see_counts_against_nobody() -> None:
    live = Liveness()
    live.observe([record("a", "t1"), record("b", "t1")], now=100.0)
    live.observe([record("a", "t1"), record("b", "t2")], now=101.0)
    live.unseen(since=102.5, now=110.0)  # a was stale (102.0) when the view was lost, b not
    live.observe([record("a", "t1"), record("b", "t2")], now=110.0)
    assert ([m.node for m in live.alive(110.0)], [m.node for m in live.stale(110.0)]) == (
        ["b"],
        ["a"],
    )
    assert live.next_expiry(110.0) == pytest.approx(110.5)


def test_the_lease_carries_labels_and_unready_vips_and_reads_back() -> None:
    body = lease_body("ipvs-system", "node-a", 2.0, {"zone": "x"}, {V6, V4}, "2026-12-03T00:00Z")
    assert body["metadata"]["annotations"][ANNOTATION_UNREADY] == "192.0.2.50,2001:db8::50"
    assert body["metadata"]["annotations"][ANNOTATION_LABELS] == '{"zone": "x"}'
    got = read_lease(body)
    assert got == LeaseRecord(
        "node-a", "node-a", 2.0, "2026-12-03T00:00Z", {"zone": "x"}, frozenset({V4, V6})
    )
    assert read_lease({"spec": {}}) is None, "no holder: released"


# ------------------------------------------------------------------ inputs from a pass


def pool(name: str, layer2: dict[str, Any] | None = None) -> Any:
    spec: dict[str, Any] = {"addresses": ["192.0.2.0/24"]}
    if layer2 is not None:
        spec["layer2"] = layer2
    return load.address_pool(
        {"apiVersion": "ipvs.io/v1alpha1", "kind": "AddressPool", "metadata": {"name": name},
         "spec": spec}
    )  # fmt: skip


def vs(name: str, address: str, pool_name: str, **spec: Any) -> Any:
    return load.virtual_server(
        {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "VirtualServer",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "ports": [{"port": 80}],
                "backends": {"static": [{"address": "198.51.100.11"}]},
                **spec,
            },
            "status": {"address": address, "addressPool": pool_name},
        }
    )


NICS = {
    "lo": [ipaddress.ip_interface("127.0.0.1/8")],
    "eth0": [ipaddress.ip_interface("192.0.2.1/24"), ipaddress.ip_interface("fe80::1/64")],
    "eth1": [ipaddress.ip_interface("198.51.100.1/24")],
    "ipvs0": [ipaddress.ip_interface("192.0.2.50/32")],
}


def test_inputs_list_only_pools_with_layer2_and_mark_what_this_node_cannot_serve() -> None:
    pools = {
        "l2": pool("l2", {"nodeSelector": {"matchLabels": {"role": "edge"}}}),
        "bgp": pool("bgp"),
    }
    vss = [vs("a", "192.0.2.50", "l2"), vs("b", "192.0.2.51", "l2"), vs("c", "192.0.2.52", "bgp")]
    outcomes = {
        "ns/a": Outcome(State.PROGRAMMED),
        "ns/b": Outcome(State.FAILED, "KernelError"),
        "ns/c": Outcome(State.PROGRAMMED),
    }
    inputs = layer2_inputs(vss, {}, pools, outcomes, {"role": "edge"}, NICS, ready=True)
    assert [w.vip for w in inputs.wanted] == [ip("192.0.2.50"), ip("192.0.2.51")]
    assert inputs.unready == {ip("192.0.2.51")}, "programmed here, or not announced from here"
    other = layer2_inputs(vss, {}, pools, outcomes, {"role": "core"}, NICS, ready=True)
    assert other.unready == frozenset(), "not selected: nothing to be unready for"


def test_interfaces_are_the_vips_lan_unless_named() -> None:
    assert interfaces_for(V4, (), NICS) == ("eth0",)  # its subnet; never lo or ipvs0
    assert interfaces_for(ip("203.0.113.9"), (), NICS) == ()
    assert interfaces_for(V4, ("eth*",), NICS) == ("eth0", "eth1")
    assert interfaces_for(V4, ("eth1",), NICS) == ("eth1",)


class FakeResponder:
    def __init__(self) -> None:
        self.current: dict[Any, tuple[str, ...]] = {}
        self.errors: dict[str, str] = {}
        self.claimed: Counter[Any] = Counter()

    def set(self, wanted: Any) -> None:
        self.current = dict(wanted)

    def announced(self) -> dict[Any, tuple[str, ...]]:
        return dict(self.current)

    def claims(self) -> dict[Any, int]:
        return dict(self.claimed)


class FakeLeases:
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self._items = items
        self.synced = threading.Event()
        self.synced.set()

    def items(self) -> list[dict[str, Any]]:
        return self._items


def test_the_speaker_answers_for_its_share_and_hands_over_when_a_lease_goes() -> None:
    clock = [100.0]
    pools = {"l2": pool("l2", {})}
    vss = [vs(f"v{i}", f"192.0.2.{60 + i}", "l2") for i in range(12)]
    outcomes = {v.key: Outcome(State.PROGRAMMED) for v in vss}
    leases = FakeLeases([lease_body("s", n, 2.0, {}, (), "t1") for n in ("node-a", "node-b")])
    speakers = {}
    for node in ("node-a", "node-b"):
        speaker = Speaker(
            node, None, leases, FakeResponder(), threading.Event(), clock=lambda: clock[0]
        )
        speaker.update(layer2_inputs(vss, {}, pools, outcomes, {}, NICS, ready=True))
        speaker.step()
        speakers[node] = speaker
    a = set(speakers["node-a"].responder.announced())
    b = set(speakers["node-b"].responder.announced())
    assert a and b and not a & b and a | b == {v.address for v in vss}
    # node-b's agent stops: it leaves first, then its Lease is gone; node-a takes everything.
    speakers["node-b"].leave()
    assert speakers["node-b"].responder.announced() == {}
    leases._items = leases._items[:1]
    speakers["node-a"].step()
    assert set(speakers["node-a"].responder.announced()) == a | b
    # node-a's Lease goes: its VIPs go with it (another node elects without it).
    leases._items = []
    speakers["node-a"].step()
    assert speakers["node-a"].responder.announced() == {}


def renewed(leases: FakeLeases, nodes: tuple[str, ...], at: str) -> None:
    leases._items = [lease_body("s", n, 2.0, {}, (), at) for n in nodes]


def test_a_node_that_cannot_see_its_own_lease_keeps_its_vips_until_another_claims_them() -> None:
    """An API outage leaves every node blind at once: nobody may drop its VIPs. A node cut
    off alone yields each VIP as soon as the node that took it over announces it."""
    clock = [100.0]
    pools = {"l2": pool("l2", {})}
    vss = [vs(f"v{i}", f"192.0.2.{60 + i}", "l2") for i in range(12)]
    outcomes = {v.key: Outcome(State.PROGRAMMED) for v in vss}
    seen_by = {"node-a": FakeLeases([]), "node-b": FakeLeases([])}
    responders = {"node-a": FakeResponder(), "node-b": FakeResponder()}
    speakers = {}
    for node, leases in seen_by.items():
        renewed(leases, ("node-a", "node-b"), "t1")
        speaker = Speaker(
            node, None, leases, responders[node], threading.Event(), clock=lambda: clock[0]
        )
        speaker.update(layer2_inputs(vss, {}, pools, outcomes, {}, NICS, ready=True))
        speaker.step()
        speakers[node] = speaker
    a, b = responders["node-a"], responders["node-b"]
    share_a, share_b = set(a.announced()), set(b.announced())
    # The API server is away: no Lease changes anywhere; both keep answering, for minutes.
    for _ in range(100):
        clock[0] += 3.0
        for speaker in speakers.values():
            speaker.step()
    assert (set(a.announced()), set(b.announced())) == (share_a, share_b)
    # It is back and both renew (each sees the other's renewal within one duration).
    clock[0] += 0.5
    seen_by["node-a"]._items[0] = lease_body("s", "node-a", 2.0, {}, (), "t2")  # its own first
    speakers["node-a"].step()
    assert set(a.announced()) == share_a  # node-b gets a duration to show its renewal
    renewed(seen_by["node-a"], ("node-a", "node-b"), "t2")
    renewed(seen_by["node-b"], ("node-a", "node-b"), "t2")
    clock[0] += 1.0
    for speaker in speakers.values():
        speaker.step()
    assert (set(a.announced()), set(b.announced())) == (share_a, share_b)
    # Only node-a is cut off: node-b sees node-a's Lease go stale and takes everything...
    clock[0] += 2.5
    renewed(seen_by["node-b"], ("node-a", "node-b"), "t2")
    seen_by["node-b"]._items[1] = lease_body("s", "node-b", 2.0, {}, (), "t3")
    speakers["node-b"].step()
    speakers["node-a"].step()
    assert set(b.announced()) == share_a | share_b
    assert set(a.announced()) == share_a  # node-a cannot know yet
    # ...and announces it; node-a hears the gratuitous ARP for each VIP and yields it.
    first = sorted(share_a)[0]
    a.claimed[first] += 1
    speakers["node-a"].step()
    assert set(a.announced()) == share_a - {first}
    a.claimed.update(share_a)
    speakers["node-a"].step()
    assert a.announced() == {}


def run_bpf(program: bytes, frame: bytes) -> int:
    """A classic BPF interpreter for the instructions our filters use (ld abs, jeq, ret)."""
    insns = [struct.unpack("HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x28:  # ldh [k]
            acc = int.from_bytes(frame[k : k + 2], "big") if k + 2 <= len(frame) else -1
        elif code == 0x30:  # ldb [k]
            acc = frame[k] if k < len(frame) else -1
        elif code == 0x15:  # jeq #k
            pc += jt if acc == k else jf
        elif code == 0x06:  # ret #k
            return int(k)
        else:
            raise AssertionError(f"instruction {code:#x} not interpreted")
        if acc == -1:
            return 0  # a load past the frame ends the program with 0 (the kernel's rule)
        pc += 1


# ------------------------------------------------------------------ frames


def golden(name: str, frame: bytes) -> None:
    path = GOLDEN / f"{name}.hex"
    text = frame.hex(" ", 2) + "\n"
    if os.environ.get("IPVS_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; see the module docstring to update"


def test_arp_reply_and_gratuitous_arp_frames() -> None:
    request = packets.arp_frame(
        packets.ARP_REQUEST, CLIENT_MAC, ip("192.0.2.101"), packets.ZERO_MAC, V4,
        packets.BROADCAST,
    )  # fmt: skip
    asked = packets.parse_arp(request)
    assert asked is not None and asked.target_ip == V4 and asked.op == packets.ARP_REQUEST
    reply = packets.arp_reply(asked, MAC)
    golden("arp-reply", reply)
    parsed = packets.parse_arp(reply)
    assert parsed is not None
    assert (parsed.op, parsed.sender_mac, parsed.sender_ip) == (packets.ARP_REPLY, MAC, V4)
    assert reply[:6] == CLIENT_MAC  # unicast back to the asker
    garp_request, garp_reply = packets.gratuitous_arp(V4, MAC)
    golden("garp-request", garp_request)
    golden("garp-reply", garp_reply)
    for frame in (garp_request, garp_reply):
        g = packets.parse_arp(frame)
        assert g is not None and g.sender_ip == g.target_ip == V4 and frame[:6] == b"\xff" * 6


def test_neighbour_solicitation_and_advertisement_frames() -> None:
    client = ip("2001:db8::101")
    probe = packets.solicitation(V6, CLIENT_MAC, client)
    golden("ns-multicast", probe)
    asked = packets.parse_solicitation(probe)
    assert asked is not None
    assert (asked.target, asked.source, asked.link_layer) == (V6, client, CLIENT_MAC)
    assert asked.destination == ip("ff02::1:ff00:50")  # the solicited-node group
    assert probe[:6] == bytes.fromhex("3333ff000050")
    source = ip("fe80::1")
    answer = packets.answer(asked, MAC, source)
    golden("na-solicited", answer)
    target, mac, flags = packets.parse_advertisement(answer) or (None, b"", 0)
    assert (target, mac) == (V6, MAC)
    assert flags & packets.SOLICITED and flags & packets.OVERRIDE
    assert answer[:6] == CLIENT_MAC
    unsolicited = packets.unsolicited_advertisement(V6, MAC, source)
    golden("na-unsolicited", unsolicited)
    _, _, flags = packets.parse_advertisement(unsolicited) or (None, b"", 0)
    assert flags & packets.OVERRIDE and not flags & packets.SOLICITED
    assert unsolicited[:6] == bytes.fromhex("333300000001")  # all nodes
    dad = packets.Solicitation(ip("::"), asked.destination, V6, CLIENT_MAC, None)
    assert packets.answer(dad, MAC, source)[:6] == bytes.fromhex("333300000001")


def test_icmpv6_checksums_verify() -> None:
    frame = packets.unsolicited_advertisement(V6, MAC, ip("fe80::1"))
    header = frame[14:54]
    body = frame[54:]
    pseudo = header[8:24] + header[24:40] + len(body).to_bytes(4, "big") + b"\x00\x00\x00\x3a"
    assert packets._checksum(pseudo + body) == 0  # a correct checksum sums to zero


def test_the_ndp_filter_passes_solicitations_and_advertisements_only() -> None:
    program = packets.bpf_neighbour_discovery()
    source = ip("fe80::c1")
    solicitation = packets.solicitation(V6, CLIENT_MAC, source)
    advertisement = packets.unsolicited_advertisement(V6, MAC, ip("fe80::1"))
    assert run_bpf(program, solicitation) > 0
    assert run_bpf(program, advertisement) > 0
    echo = bytearray(solicitation)
    echo[54] = 128  # an echo request: same headers, another ICMPv6 type
    assert run_bpf(program, bytes(echo)) == 0
    udp = bytearray(solicitation)
    udp[20] = 17
    assert run_bpf(program, bytes(udp)) == 0
    arp = packets.gratuitous_arp(V4, MAC)[0]
    assert run_bpf(program, arp) == 0
    assert run_bpf(program, solicitation[:40]) == 0


def test_a_failed_interface_read_is_logged_and_the_speaker_goes_on() -> None:
    """The interface scan reads addresses with host.rtnl, which raises HostError: the speaker
    thread must survive it (it would otherwise stop answering for every VIP)."""
    stop = threading.Event()
    calls: list[int] = []

    def nics() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise HostError("address dump refused: EBUSY")
        stop.set()
        return NICS

    leases = FakeLeases([])
    speaker = Speaker("node-a", None, leases, FakeResponder(), threading.Event(), nics=nics)
    thread = threading.Thread(target=speaker.run, args=(stop,), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and len(calls) == 2


def test_the_interface_poll_leaves_out_host_addresses_and_links_that_are_down() -> None:
    """``responder.read_nics``: the VIPs (host addresses on the agent's device) never make an
    interface a candidate, so the poll every second does not turn thousands into objects."""
    from ipvs_agent.announce.responder import IFF_LOWER_UP, IFF_UP, read_nics
    from ipvs_agent.host.rtnl import AddressRecord

    class Link(dict[str, Any]):
        def get_attr(self, name: str) -> str:
            return str(self["name"])

    up = IFF_UP | IFF_LOWER_UP
    links = [Link(index=2, flags=up, name="eth0"), Link(index=3, flags=up, name="ipvs0"),
             Link(index=4, flags=IFF_UP, name="eth1")]  # fmt: skip

    class Rtnl:
        def link(self, command: str) -> list[Link]:
            return links

    records = [
        AddressRecord(2, ipaddress.ip_address("192.0.2.10"), 24, 0, 0),
        AddressRecord(2, ipaddress.ip_address("2001:db8::10"), 64, 0, 0),
        AddressRecord(2, ipaddress.ip_address("198.51.100.7"), 32, 0, 0),
        *(AddressRecord(3, ipaddress.ip_address(f"203.0.113.{i}"), 32, 0, 0) for i in range(200)),
        AddressRecord(4, ipaddress.ip_address("198.18.0.1"), 24, 0, 0),
    ]

    class Reader:
        def dump(self) -> list[AddressRecord]:
            return records

    nics = read_nics(Rtnl(), Reader())  # type: ignore[arg-type]
    assert nics == {
        "eth0": [
            ipaddress.ip_interface("192.0.2.10/24"),
            ipaddress.ip_interface("2001:db8::10/64"),
        ],
        "ipvs0": [],
    }
    assert interfaces_for(ipaddress.ip_address("192.0.2.99"), ["*"], nics) == ("eth0",)
