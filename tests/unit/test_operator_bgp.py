"""BGP session Events from the agents' IPVSNode reports: the pure decision and its call site."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipvs_operator import bgp, views
from ipvs_operator.controller import Controller, Settings
from ipvs_operator.events import CLUSTER_EVENTS_NAMESPACE, EventPoster
from ipvs_operator.workqueue import SESSIONS
from ipvs_operator.writer import NotLeading

STATES = ("Connecting", "Connected", "Established", "Down", "ConfigError")


def report(*sessions: tuple[str, str, str] | tuple[str, str, str, str]) -> dict[str, Any]:
    """An IPVSNode ``status.bgp`` with (peer, address, state[, message]) sessions."""
    listed = []
    for peer, address, state, *message in sessions:
        entry: dict[str, Any] = {"peer": peer, "state": state, "prefixes": 2}
        if address:
            entry["address"] = address
        if message:
            entry["message"] = message[0]
        listed.append(entry)
    return {"sessions": listed, "announced": ["192.0.2.10/32"]}


def events(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[tuple[str, ...]]:
    found = bgp.events("node-a", bgp.sessions(old), bgp.sessions(new))
    return [(e.peer, e.type, e.reason, e.message) for e in found]


def test_a_session_coming_up_is_a_normal_event_on_its_peer() -> None:
    before = report(("tor-a", "192.0.2.1", "Connected"), ("tor-b", "2001:db8::1", "Connecting"))
    after = report(("tor-a", "192.0.2.1", "Established"), ("tor-b", "2001:db8::1", "Connecting"))
    assert events(before, after) == [
        (
            "tor-a",
            "Normal",
            "SessionEstablished",
            "node node-a: session with 192.0.2.1 is Established",
        )
    ]


def test_a_session_going_down_is_a_warning_with_its_new_state_and_why() -> None:
    before = report(("tor-a", "192.0.2.1", "Established"))
    after = report(("tor-a", "192.0.2.1", "Down", "hold timer expired"))
    assert events(before, after) == [
        (
            "tor-a",
            "Warning",
            "SessionDown",
            "node node-a: session with 192.0.2.1 is Down: hold timer expired",
        )
    ]


def test_an_established_session_that_leaves_the_report_is_down() -> None:
    """The BGPPeer no longer selects the node, the agent stopped BGP, or the IPVSNode went."""
    up = report(("tor-a", "192.0.2.1", "Established"), ("tor-b", "192.0.2.2", "Connecting"))
    expected = [
        (
            "tor-a",
            "Warning",
            "SessionDown",
            "node node-a: session with 192.0.2.1 is no longer reported",
        )
    ]
    assert events(up, report(("tor-b", "192.0.2.2", "Connecting"))) == expected
    assert events(up, {}) == expected
    assert events(up, None) == expected


def test_a_new_address_for_a_peer_is_a_new_session() -> None:
    """An edited BGPPeer: the old session's end is not hidden by the new one coming up."""
    before = report(("tor-a", "192.0.2.1", "Established"))
    after = report(("tor-a", "192.0.2.9", "Established"))
    assert [(e[2], e[3]) for e in events(before, after)] == [
        ("SessionDown", "node node-a: session with 192.0.2.1 is no longer reported"),
        ("SessionEstablished", "node node-a: session with 192.0.2.9 is Established"),
    ]


def test_no_event_while_a_session_stays_on_one_side() -> None:
    """Retrying against an unreachable router is no storm; an established session that
    announces more routes is no news."""
    for old in STATES:
        for new in STATES:
            if "Established" not in (old, new):
                before = report(("tor-a", "192.0.2.1", old))
                after = report(("tor-a", "192.0.2.1", new, "connection refused"))
                assert events(before, after) == [], (old, new)
    up = report(("tor-a", "192.0.2.1", "Established"))
    assert events(up, up) == []
    assert events(None, None) == []
    gone_quietly = report(("tor-a", "", "ConfigError", "Secret bgp-tor-a not found"))
    assert events(gone_quietly, {}) == []


def test_sessions_ignore_what_is_not_one() -> None:
    status = {
        "sessions": [
            {"state": "Established"},
            "tor-z",
            {"peer": "tor-a", "address": "192.0.2.1", "state": "Down"},
            {"peer": "tor-a", "address": "192.0.2.1", "state": "Established"},
        ]
    }
    assert bgp.sessions(status) == {
        ("tor-a", "192.0.2.1"): bgp.Session("tor-a", "192.0.2.1", "Established")
    }
    assert bgp.sessions({"announced": []}) == {}


@given(st.lists(st.sampled_from((None, *STATES)), max_size=12))
def test_events_follow_every_crossing_of_established_and_only_those(
    seen: list[str | None],
) -> None:
    """Over any run of reports of one session (None: not reported), the Events alternate
    and there is one per change between established and not."""
    reports = [None, *(None if s is None else report(("tor-a", "192.0.2.1", s)) for s in seen)]
    found = [e[2] for old, new in itertools.pairwise(reports) for e in events(old, new)]
    up = [s == "Established" for s in [None, *seen]]
    crossings = sum(a != b for a, b in itertools.pairwise(up))
    assert len(found) == crossings
    assert found == ["SessionEstablished", "SessionDown"] * (len(found) // 2) + (
        ["SessionEstablished"] if len(found) % 2 else []
    )


def test_the_peer_index_keeps_only_its_identity() -> None:
    peer = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "BGPPeer",
        "metadata": {"name": "tor-a", "uid": "u-1", "resourceVersion": "7", "labels": {"a": "b"}},
        "spec": {"address": "192.0.2.1", "asn": 64512, "localASN": 64513},
    }
    assert views.peer_entry(peer) == {
        "tor-a": {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "BGPPeer",
            "metadata": {"name": "tor-a", "uid": "u-1"},
        }
    }


# -- the call site -------------------------------------------------------------------------


class FakeKube:
    """Records the Events posted."""

    timeout = 30.0

    def __init__(self) -> None:
        self.posted: list[tuple[str, dict[str, Any]]] = []

    async def request(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        assert method == "POST"
        self.posted.append((path, body))
        return {}


class Peers:
    """Views with BGPPeers only (the controller reads nothing else for sessions)."""

    def __init__(self, *names: str) -> None:
        self.bodies: dict[str, dict[str, Any]] = {
            n: {
                "apiVersion": "ipvs.io/v1alpha1",
                "kind": "BGPPeer",
                "metadata": {"name": n, "uid": f"uid-{n}"},
            }
            for n in names
        }

    def peer(self, name: str) -> dict[str, Any] | None:
        return self.bodies.get(name)

    def pools(self) -> list[dict[str, Any]]:
        return []

    def virtual_servers(self) -> list[dict[str, Any]]:
        return []


def controller(api: FakeKube, time_left: float = 1e9) -> Controller:
    return Controller(
        Settings(workers=1),
        Peers("tor-a"),  # type: ignore[arg-type]
        api,  # type: ignore[arg-type]
        EventPoster(api, "t"),  # type: ignore[arg-type]
        lambda: time_left,
    )


def posted(api: FakeKube) -> list[tuple[str, str, str | None, str]]:
    """(namespace path, reason, involved uid, involved name) of each Event posted."""
    return [
        (
            path,
            body["reason"],
            body["involvedObject"].get("uid"),
            body["involvedObject"]["name"],
        )
        for path, body in api.posted
    ]


def test_a_restart_that_sees_the_same_sessions_posts_nothing() -> None:
    """The first report of each node in kopf's listing is only remembered; what changes after
    is an Event on the BGPPeer, in the namespace for cluster-scoped objects."""

    async def scenario() -> None:
        api = FakeKube()
        c = controller(api)
        up = report(("tor-a", "192.0.2.1", "Established"))
        await c.sessions_changed("node-a", up, listing=True, gone=False)
        await c.sessions_changed("node-a", up, listing=False, gone=False)
        assert api.posted == []
        await c.sessions_changed(
            "node-a", report(("tor-a", "192.0.2.1", "Down")), listing=False, gone=False
        )
        events_path = f"/api/v1/namespaces/{CLUSTER_EVENTS_NAMESPACE}/events"
        assert posted(api) == [(events_path, "SessionDown", "uid-tor-a", "tor-a")]
        involved = api.posted[0][1]["involvedObject"]
        assert (involved["kind"], involved["apiVersion"]) == ("BGPPeer", "ipvs.io/v1alpha1")
        assert "namespace" not in involved
        # A relisting (after the watch expired) compares with what was seen before.
        await c.sessions_changed("node-a", up, listing=True, gone=False)
        assert [p[1] for p in posted(api)] == ["SessionDown", "SessionEstablished"]

    asyncio.run(scenario())


def test_a_node_that_appears_or_goes_while_running_is_compared_with_no_sessions() -> None:
    async def scenario() -> None:
        api = FakeKube()
        c = controller(api)
        await c.sessions_changed("node-b", None, listing=False, gone=False)  # ADDED, no status
        up = report(("tor-a", "192.0.2.1", "Established"), ("tor-x", "192.0.2.7", "Established"))
        await c.sessions_changed("node-b", up, listing=False, gone=False)
        await c.sessions_changed("node-b", up, listing=False, gone=True)
        # tor-x is not in the index (deleted meanwhile): its Events go by name alone.
        assert posted(api) == [
            ("/api/v1/namespaces/default/events", "SessionEstablished", "uid-tor-a", "tor-a"),
            ("/api/v1/namespaces/default/events", "SessionEstablished", None, "tor-x"),
            ("/api/v1/namespaces/default/events", "SessionDown", "uid-tor-a", "tor-a"),
            ("/api/v1/namespaces/default/events", "SessionDown", None, "tor-x"),
        ]
        assert "no longer reported" in api.posted[-1][1]["message"]

    asyncio.run(scenario())


def test_without_lease_time_left_the_event_is_dropped_not_raised() -> None:
    """kopf does not retry an event handler: a post refused for want of Lease time is lost,
    and the sessions are remembered all the same (the next report is compared with them)."""

    async def scenario() -> None:
        api, left = FakeKube(), [0.1]
        c = Controller(
            Settings(workers=1),
            Peers("tor-a"),  # type: ignore[arg-type]
            api,  # type: ignore[arg-type]
            EventPoster(api, "t"),  # type: ignore[arg-type]
            lambda: left[0],
        )
        await c.sessions_changed("node-a", {}, listing=True, gone=False)
        up = report(("tor-a", "192.0.2.1", "Established"))
        await c.sessions_changed("node-a", up, listing=False, gone=False)
        with pytest.raises(NotLeading):
            c.writer.timeout()
        left[0] = 1e9
        await c.sessions_changed("node-a", up, listing=False, gone=False)
        assert api.posted == []
        await c.sessions_changed("node-a", {}, listing=False, gone=False)
        assert [p[1] for p in posted(api)] == ["SessionDown"]

    asyncio.run(scenario())


async def work_off(c: Controller) -> list[tuple[str, str, str]]:
    """Run what the controller queued, as its workers would; the keys run."""
    ran = []
    while len(c.queue):
        key = await c.queue.get()
        try:
            await c.reconcile(key)
        finally:
            c.queue.done(key)
        ran.append(key)
    return ran


def test_sessions_of_an_agent_whose_lease_went_stale_are_presumed_down_until_it_is_fresh() -> None:
    """A BGP speaker dies with its agent, and a stale Lease says the agent died: each session
    it had established is a SessionDown that says why. Its IPVSNode still reads Established,
    and reports while it is stale tell nothing; a fresh Lease brings them back."""

    async def scenario() -> None:
        api = FakeKube()
        c = controller(api)
        none: frozenset[str] = frozenset()
        up = report(("tor-a", "192.0.2.1", "Established"), ("tor-b", "192.0.2.2", "Connecting"))
        await c.sessions_changed("node-a", up, listing=True, gone=False)
        c.agents_changed(frozenset({"node-a"}), none)
        assert await work_off(c) == [] and api.posted == []

        c.agents_changed(none, frozenset({"node-a"}))  # its agent died
        assert await work_off(c) == [(SESSIONS, "", "node-a")]
        assert [(b["reason"], b["message"]) for _, b in api.posted] == [
            ("SessionDown", f"node node-a: session with 192.0.2.1 {bgp.STALE_LEASE}")
        ]
        await c.sessions_changed("node-a", up, listing=False, gone=False)  # still says so
        c.agents_changed(none, none)  # its stale Lease deleted: no word of it
        assert await work_off(c) == [] and len(api.posted) == 1

        c.agents_changed(frozenset({"node-a"}), none)  # back, with a fresh Lease
        await work_off(c)
        assert [p[1] for p in posted(api)] == ["SessionDown", "SessionEstablished"]
        # Nothing is told twice, and what it reports is told again.
        c.agents_changed(frozenset({"node-a"}), none)
        await c.sessions_changed("node-a", up, listing=False, gone=False)
        assert await work_off(c) == [] and len(api.posted) == 2

    asyncio.run(scenario())


def test_a_restarted_operator_that_finds_a_stale_lease_posts_nothing() -> None:
    """The first word on the Leases only sets what is presumed (the replica before posted the
    Events), whether the IPVSNode was listed before it or after."""

    async def scenario() -> None:
        api = FakeKube()
        c = controller(api)
        none: frozenset[str] = frozenset()
        up = report(("tor-a", "192.0.2.1", "Established"))
        await c.sessions_changed("node-a", up, listing=True, gone=False)
        c.agents_changed(none, frozenset({"node-a", "node-b"}))
        await c.sessions_changed("node-b", up, listing=True, gone=False)
        assert await work_off(c) == [] and api.posted == []
        await c.sessions_changed("node-b", up, listing=False, gone=False)
        assert api.posted == []
        c.agents_changed(frozenset({"node-a", "node-b"}), none)
        await work_off(c)
        assert [(p[1], p[3]) for p in posted(api)] == [("SessionEstablished", "tor-a")] * 2

    asyncio.run(scenario())
