"""BGP announcement without a router: the policy, ExaBGP's text, the speaker against a fake
ExaBGP, and the connection sync daemons' plan. The real thing (ExaBGP against BIRD, in the VM)
is tests/kernel/test_bgp.py."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipvs_agent.announce.bgp import exabgp
from ipvs_agent.announce.bgp.exabgp import Ack, SessionState, StateChange
from ipvs_agent.announce.bgp.inputs import Secrets, plan_from_pass
from ipvs_agent.announce.bgp.policy import Plan, Route, Session, router_id
from ipvs_agent.announce.bgp.speaker import BGPSpeaker
from ipvs_agent.desired import Node, plan
from ipvs_agent.host.state import State
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.model import KernelInfo, SyncDaemon, SyncState
from ipvs_agent.snapshot import take
from ipvs_agent.syncd import SyncDaemons, SyncSettings, plan_daemons
from ipvs_api import load

GOLDEN = Path(__file__).parent / "golden" / "bgp"
ip = ipaddress.ip_address


def peer(name: str, address: str, **spec: Any) -> Any:
    return load.bgp_peer(
        {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "BGPPeer",
            "metadata": {"name": name},
            "spec": {"address": address, "asn": 64512, "localASN": 64513, **spec},
        }
    )


def pool(**bgp: Any) -> Any:
    return load.address_pool(
        {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "AddressPool",
            "metadata": {"name": "anycast"},
            "spec": {"addresses": ["203.0.113.0/24", "2001:db8:f::/120"], "bgp": bgp},
        }
    )


def vs(name: str, address: str, weights: tuple[int, ...] = (1,), **spec: Any) -> dict[str, Any]:
    six = ":" in address
    static = [
        {"address": f"2001:db8:1::{i + 11}" if six else f"192.0.2.{i + 11}", "weight": w}
        for i, w in enumerate(weights)
    ]
    body: dict[str, Any] = {"ports": [{"port": 80}], "backends": {"static": static}, **spec}
    if "backends" in spec:
        body["backends"] = spec["backends"]
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {"address": address, **body},
        "status": {"address": address, "addressPool": "anycast"},
    }


NODE = Node("n1", {"rack": "a"}, None, frozenset({ip("192.0.2.1"), ip("2001:db8:1::1")}))
PEERS = [
    peer("r4", "192.0.2.254"),
    peer("r6", "2001:db8:1::fe"),
    peer("other-rack", "192.0.2.253", nodeSelector={"matchLabels": {"rack": "b"}}),
]


def bgp_plan_of(
    objects: list[dict[str, Any]],
    the_pool: Any = None,
    node: Node = NODE,
    peers: list[Any] = PEERS,
    slices: list[dict[str, Any]] | None = None,
    passwords: dict[tuple[str, str], str] | None = None,
) -> Plan:
    snap = take(objects, slices or [], node, admitted_only=False)
    table = plan(snap.virtual_servers, snap.endpoints, node)
    p = the_pool or pool()
    return plan_from_pass(
        snap.virtual_servers,
        snap.endpoints,
        {p.name: p},
        {**table.outcomes, **snap.rejected},
        table,
        node,
        peers,
        passwords or {},
    )


def test_every_vip_goes_to_the_peers_of_its_family_from_the_peers_that_select_the_node() -> None:
    p = bgp_plan_of([vs("a", "203.0.113.10"), vs("b", "2001:db8:f::10")])
    assert [s.peer for s in p.sessions] == ["r4", "r6"]  # not the other rack's router
    assert p.routes == {
        "r4": frozenset({Route("203.0.113.10/32")}),
        "r6": frozenset({Route("2001:db8:f::10/128")}),
    }
    assert p.sessions[0].router_id == "192.0.2.1" and p.withheld == {}
    assert p.announced_to(ip("203.0.113.10")) == ("r4",)


def test_communities_and_local_preference_for_internal_peers_only() -> None:
    internal = peer("ibgp", "192.0.2.252", localASN=64512)
    p = bgp_plan_of(
        [vs("a", "203.0.113.10")],
        pool(communities=["64512:7", "no-export"], localPreference=300),
        peers=[PEERS[0], internal],
    )
    assert p.routes["r4"] == frozenset({Route("203.0.113.10/32", ("64512:7", "no-export"))})
    assert p.routes["ibgp"] == frozenset({Route("203.0.113.10/32", ("64512:7", "no-export"), 300)})
    only = bgp_plan_of([vs("a", "203.0.113.10")], pool(peers=["ibgp"]), peers=[PEERS[0], internal])
    assert only.routes["r4"] == frozenset() and len(only.routes["ibgp"]) == 1


@pytest.mark.parametrize(
    ("objects", "node", "reason"),
    [
        ([vs("a", "203.0.113.10", (0, 0))], NODE, "NoRealServers"),
        (
            [vs("a", "203.0.113.10", scheduler={"name": "mh"})],
            Node("n1", {}, KernelInfo("1.2.1", 4096, "6.1.0", ("rr", "wlc")), NODE.addresses),
            "NotProgrammed",
        ),
        (
            [vs("a", "203.0.113.10")],
            Node(
                "n1",
                {"node.kubernetes.io/exclude-from-external-load-balancers": ""},
                None,
                NODE.addresses,
            ),
            "NodeExcluded",
        ),
        (
            [
                vs(
                    "a",
                    "203.0.113.10",
                    trafficPolicy="Local",
                    backends={"service": {"name": "web"}},
                )
            ],
            NODE,
            "NoLocalEndpoint",
        ),
    ],
    ids=["no-real-servers", "not-programmed", "excluded", "local-elsewhere"],
)
def test_a_node_that_cannot_serve_a_vip_withholds_it(
    objects: list[dict[str, Any]], node: Node, reason: str
) -> None:
    elsewhere = [
        {
            "addressType": "IPv4",
            "ports": [{"port": 80, "protocol": "TCP"}],
            "metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [
                {"addresses": ["192.0.2.50"], "nodeName": "n2", "conditions": {"ready": True}}
            ],
        }
    ]
    p = bgp_plan_of(objects, node=node, slices=elsewhere)
    assert p.withheld == {ip("203.0.113.10"): reason}
    assert all(not routes for routes in p.routes.values())


def test_a_missing_password_secret_keeps_that_session_closed() -> None:
    guarded = peer("r4", "192.0.2.254", passwordSecret={"name": "bgp"})
    p = bgp_plan_of([vs("a", "203.0.113.10")], peers=[guarded])
    assert p.sessions == () and "not found" in p.problems["r4"]
    p = bgp_plan_of(
        [vs("a", "203.0.113.10")], peers=[guarded], passwords={("bgp", "password"): "s3cr;et"}
    )
    assert p.sessions[0].password == "s3cr;et"


def test_router_id_of_an_ipv6_only_node_is_stable() -> None:
    assert router_id("n1", [ip("2001:db8::1")]) == router_id("n1", [])
    assert router_id("n1", []) != router_id("n2", [])
    assert router_id("n1", [ip("2001:db8::1"), ip("198.51.100.7")]) == "198.51.100.7"


def test_secrets_are_read_by_name_and_again_after_their_ttl() -> None:
    reads: list[str] = []
    now = [0.0]

    def get(name: str) -> dict[str, str] | None:
        reads.append(name)
        return {"password": "czNjcmV0"} if name == "bgp" else None

    secrets = Secrets(get, ttl=30, clock=lambda: now[0])
    peers = [
        peer("a", "192.0.2.254", passwordSecret={"name": "bgp"}),
        peer("b", "192.0.2.253", passwordSecret={"name": "gone"}),
    ]
    assert secrets.passwords(peers) == {("bgp", "password"): "s3cret"}
    secrets.passwords(peers)
    now[0] = 31
    secrets.passwords(peers)
    assert reads == ["bgp", "gone", "bgp", "gone"]


# --- ExaBGP's text ----------------------------------------------------------------------------

SESSIONS = (
    Session(
        "tor-a",
        ip("192.0.2.254"),
        64512,
        64513,
        hold_time=9,
        password='s3cr;e"t',
        router_id="192.0.2.1",
    ),
    Session(
        "tor-a-v6",
        ip("2001:db8:1::fe"),
        64512,
        64513,
        port=1179,
        local_address=ip("2001:db8:1::1"),
        router_id="192.0.2.1",
    ),
)


def test_exabgp_configuration_matches_the_golden_file() -> None:
    text = exabgp.render_config(SESSIONS, ["/usr/bin/python3", "-I", "/x/relay.py", "/run/s"])
    golden = GOLDEN / "two-sessions.conf"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    with pytest.raises(ValueError):
        exabgp.render_config(SESSIONS, ["/path with space/python"])


def test_exabgp_api_lines_and_answers() -> None:
    route = Route("203.0.113.10/32", ("64512:7", "no-export"), 200)
    assert exabgp.announce(SESSIONS[0], route) == (
        "neighbor 192.0.2.254 announce route 203.0.113.10/32 next-hop self "
        "community [ 64512:7 no-export ] local-preference 200"
    )
    assert exabgp.withdraw(SESSIONS[1], Route("2001:db8:f::10/128")) == (
        "neighbor 2001:db8:1::fe withdraw route 2001:db8:f::10/128"
    )
    assert exabgp.parse("done\n") == Ack(True) and exabgp.parse("error") == Ack(False)
    state = (
        '{ "exabgp": "5.0.0", "type": "state", "neighbor": { "address": { "local": '
        '"192.0.2.1", "peer": "192.0.2.254" }, "state": "down", "reason": "hold timer" } }'
    )
    assert exabgp.parse(state) == StateChange("192.0.2.254", SessionState.DOWN, "hold timer")
    assert exabgp.parse('{"type": "update"}') is None and exabgp.parse("noise") is None


# --- the speaker against a fake ExaBGP ---------------------------------------------------------


class FakeExaBGP:
    def __init__(
        self,
        sessions: tuple[Session, ...],
        on_event: Callable[[Any], None],
        log: list[Any],
        fail: bool = False,
    ) -> None:
        self.sessions, self.on_event, self.log, self.fail = sessions, on_event, log, fail
        self.running = False

    def start(self) -> None:
        if self.fail:
            raise OSError("no exabgp")
        self.running = True
        self.log.append(("start", [s.peer for s in self.sessions]))
        for s in self.sessions:
            self.on_event(StateChange(str(s.address), SessionState.ESTABLISHED))

    def stop(self, timeout: float = 5.0) -> None:
        self.running = False
        self.log.append(("stop",))

    def send(self, lines: list[str], timeout: float = 30.0) -> list[bool]:
        self.log.extend(("send", line) for line in lines)
        return [True] * len(lines)

    @property
    def alive(self) -> bool:
        return self.running


def _speaker(log: list[Any], fail: list[bool]) -> BGPSpeaker:
    now = [0.0]

    def factory(sessions: tuple[Session, ...], on_event: Callable[[Any], None]) -> FakeExaBGP:
        return FakeExaBGP(sessions, on_event, log, fail[0])

    speaker = BGPSpeaker(factory, clock=lambda: now[0])
    speaker.clock_value = now  # type: ignore[attr-defined]
    return speaker


def test_the_speaker_sends_only_differences_and_restarts_exabgp_for_new_sessions() -> None:
    log: list[Any] = []
    speaker = _speaker(log, [False])
    r1, r2 = Route("203.0.113.10/32"), Route("203.0.113.11/32")
    speaker.update(Plan(SESSIONS[:1], {"tor-a": frozenset({r1})}))
    speaker.step()
    assert log == [
        ("start", ["tor-a"]),
        ("send", "neighbor 192.0.2.254 announce route 203.0.113.10/32 next-hop self"),
    ]
    assert speaker.announced() == {ip("203.0.113.10"): ("tor-a",)}
    log.clear()
    speaker.update(Plan(SESSIONS[:1], {"tor-a": frozenset({r2})}))
    speaker.step()
    assert log == [
        ("send", "neighbor 192.0.2.254 withdraw route 203.0.113.10/32"),
        ("send", "neighbor 192.0.2.254 announce route 203.0.113.11/32 next-hop self"),
    ]
    log.clear()
    speaker.update(Plan(SESSIONS, {"tor-a": frozenset({r2})}))
    speaker.step()
    assert log[:2] == [("stop",), ("start", ["tor-a", "tor-a-v6"])]
    status = speaker.status()
    assert [s["state"] for s in status["sessions"]] == ["Established", "Established"]
    assert status["announced"] == ["203.0.113.11/32"]
    log.clear()
    speaker.leave(settle=0)
    assert log == [("send", "neighbor 192.0.2.254 withdraw route 203.0.113.11/32"), ("stop",)]
    speaker.update(Plan(SESSIONS, {"tor-a": frozenset({r1})}))
    speaker.step()  # nothing after leave
    assert log[-1] == ("stop",)


def test_an_exabgp_that_fails_to_start_is_retried_later() -> None:
    log: list[Any] = []
    fail = [True]
    speaker = _speaker(log, fail)
    speaker.update(Plan(SESSIONS[:1], {}))
    speaker.step()
    assert log == [] and speaker.status()["sessions"][0]["state"] == "Connecting"
    fail[0] = False
    speaker.step()  # too early
    assert log == []
    speaker.clock_value[0] = 10  # type: ignore[attr-defined]
    speaker.step()
    assert log == [("start", ["tor-a"])]


# --- connection sync daemons -------------------------------------------------------------------

MASTER, BACKUP = SyncSettings("eth0", sync_id=5).daemons()


def test_the_agent_starts_its_daemons_and_leaves_other_programs_alone() -> None:
    assert plan_daemons([MASTER, BACKUP], [], []).start == (MASTER, BACKUP)
    foreign = SyncDaemon(SyncState.MASTER, "eth1", 9)
    p = plan_daemons([MASTER, BACKUP], [foreign], [])
    assert p.start == (BACKUP,) and p.foreign == (foreign,) and p.stop == ()
    moved = SyncDaemon(SyncState.MASTER, "eth1", 5)
    p = plan_daemons([MASTER, BACKUP], [moved, BACKUP], [moved, BACKUP])
    assert p.stop == (SyncState.MASTER,) and p.start == (MASTER,)
    assert plan_daemons([], [MASTER, BACKUP], [MASTER, BACKUP]).stop == (
        SyncState.MASTER,
        SyncState.BACKUP,
    )


class Store:
    def __init__(self) -> None:
        self.state = State()

    def load(self) -> State:
        return self.state

    def save(self, state: State) -> None:
        self.state = state


def test_sync_daemons_are_recorded_started_reported_and_cleaned_up() -> None:
    kernel, store = FakeKernel(), Store()
    sync = SyncDaemons(SyncSettings("eth0", sync_id=5), store)
    sync.ensure(kernel)
    assert {d.state for d in kernel.daemons()} == {SyncState.MASTER, SyncState.BACKUP}
    assert {d.state for d in store.state.sync_daemons} == {SyncState.MASTER, SyncState.BACKUP}
    assert [d["owner"] for d in sync.status()["daemons"]] == ["Agent", "Agent"]
    sync.ensure(kernel)  # nothing to do
    assert len(kernel.daemons()) == 2 and not sync.error
    assert SyncDaemons(None, store).stop_all(kernel) == [
        "stopped the master sync daemon",
        "stopped the backup sync daemon",
    ]
    assert kernel.daemons() == () and store.state.sync_daemons == ()
    kernel.start_daemon(SyncDaemon(SyncState.BACKUP, "eth9"))  # keepalived's, say
    sync.ensure(kernel)
    assert "another program" in sync.error
    assert SyncDaemons(None, store).stop_all(kernel) == ["stopped the master sync daemon"]
    assert [d.interface for d in kernel.daemons()] == ["eth9"]


# --- the agent's pass with BGP and sync (fakes for the kernel, the host and ExaBGP) ----------


def test_the_agent_hands_each_pass_to_the_bgp_speaker_and_reports_it() -> None:
    import threading

    from ipvs_agent.agent import Agent, Settings
    from ipvs_agent.announce.bgp.inputs import BGPAnnouncer
    from tests.unit.agent_helpers import FakeHost, StubMirror

    log: list[Any] = []
    speaker = _speaker(log, [False])
    reports: list[dict[str, Any]] = []
    pool_obj = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "AddressPool",
        "metadata": {"name": "anycast", "resourceVersion": "1"},
        "spec": {"addresses": ["203.0.113.0/24"], "bgp": {"communities": ["64512:1"]}},
    }
    peer_obj = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": "r4", "resourceVersion": "1"},
        "spec": {"address": "192.0.2.254", "asn": 64512, "localASN": 64513},
    }
    node_obj = {
        "metadata": {"name": "n1", "uid": "u1"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]},
    }
    vs_obj = vs("a", "203.0.113.10", scheduler={"name": "mh"})
    vs_obj["status"]["address"] = "203.0.113.10"
    kernel, store = FakeKernel(), Store()
    agent = Agent(
        Settings("n1", settle_seconds=0, admitted_only=False),
        kernel,
        FakeHost(),
        [
            StubMirror("virtualservers", [vs_obj]),
            StubMirror("endpointslices", []),
            StubMirror("node", [node_obj]),
            StubMirror("addresspools", [pool_obj]),
            StubMirror("bgppeers", [peer_obj]),
        ],
        threading.Event(),
        report=lambda status, uid: reports.append(status),
        bgp=BGPAnnouncer(speaker, Secrets(lambda name: None)),
        sync=SyncDaemons(SyncSettings("eth0", sync_id=3), store),
    )
    agent.run_once("change")
    speaker.step()  # the speaker's thread would do this at once
    assert (
        "send",
        "neighbor 192.0.2.254 announce route 203.0.113.10/32 next-hop self community [ 64512:1 ]",
    ) in log
    agent.run_once("change")  # the next pass: active-active, so sloppy TCP for mh
    agent.send_report()
    status = reports[-1]
    assert status["bgp"]["announced"] == ["203.0.113.10/32"]
    assert status["bgp"]["sessions"][0]["state"] == "Established"
    (entry,) = status["virtualServers"]
    assert entry["announcement"] == {"mode": "BGP", "peers": ["r4"]}
    assert [d["state"] for d in status["connectionSync"]["daemons"]] == ["Master", "Backup"]
    assert {d.state for d in kernel.daemons()} == {SyncState.MASTER, SyncState.BACKUP}
    # withdrawn when the VirtualServer loses its real servers
    vs_obj["spec"]["backends"]["static"][0]["weight"] = 0
    agent.mirrors[0]._items = [vs_obj]  # type: ignore[attr-defined]
    agent.run_once("change")
    speaker.step()
    assert log[-1] == ("send", "neighbor 192.0.2.254 withdraw route 203.0.113.10/32")
