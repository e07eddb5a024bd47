"""The agents' Leases in the operator: which parts of a node's report stand, and which
VirtualServers are reconciled again when an agent comes, stops or dies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ipvs_agent.announce.members import lease_body
from ipvs_api import conditions
from ipvs_api.leases import lease_name
from ipvs_operator import backends, status
from ipvs_operator.agent_leases import AgentLeases
from ipvs_operator.controller import Controller, Settings
from ipvs_operator.events import EventPoster
from ipvs_operator.health import RealServerReport
from ipvs_operator.status import Address, DirectorReport
from ipvs_operator.workqueue import VS

DOWN = RealServerReport("10.1.0.1", 8080, "Down", "refused")
DRAIN = RealServerReport("10.1.0.2", 8080, "Drain")


def report(node: str, announcement: str | None, *out: RealServerReport) -> DirectorReport:
    return DirectorReport(node, "Programmed", 1, health=out, announcement=announcement)


# ------------------------------------------------------------------ the rule (pure)


def test_a_stale_lease_takes_every_announcement_and_verdict_no_lease_only_layer2() -> None:
    reports = {
        "fresh-l2": report("fresh-l2", "Layer2", DOWN),
        "stale-l2": report("stale-l2", "Layer2", DOWN),
        "stale-bgp": report("stale-bgp", "BGP", DRAIN),
        "none-l2": report("none-l2", "Layer2", DOWN),
        "none-bgp": report("none-bgp", "BGP", DRAIN),
    }
    got = status.live_reports(
        reports, frozenset({"fresh-l2"}), frozenset({"stale-l2", "stale-bgp"})
    )
    assert {n: (r.announcement, r.health) for n, r in got.items()} == {
        "fresh-l2": ("Layer2", (DOWN,)),
        "stale-l2": (None, ()),
        "stale-bgp": (None, ()),
        "none-l2": (None, (DOWN,)),  # layer 2 is elected through the Leases: needs a fresh one
        "none-bgp": ("BGP", (DRAIN,)),  # layer 2 off keeps no Lease: nothing is known
    }
    # The programming state stays: the node's kernel keeps its table when the agent dies.
    assert all((r.state, r.generation) == ("Programmed", 1) for r in got.values())


def test_until_the_leases_are_known_every_report_stands() -> None:
    reports = {"a": report("a", "Layer2", DOWN), "b": report("b", "BGP", DRAIN)}
    assert status.live_reports(reports, None) == reports


def test_a_dead_directors_verdicts_and_announcement_leave_status_its_programming_not() -> None:
    """What status shows for one director with a stale Lease and one with none, both over BGP
    and both having taken a real server out."""
    reports = {"a": report("a", "BGP", DOWN), "b": report("b", "BGP", DRAIN)}
    got = Address(True, conditions.ALLOCATED, "ok", None, "p", 7)

    def computed(stale: frozenset[str]) -> dict[str, Any]:
        return status.compute(
            generation=1,
            old={},
            address=got,
            counts=backends.Counts(2, 2),
            desired={"a", "b"},
            reports=status.live_reports(reports, frozenset(), stale),
            now="2026-01-01T00:00:00Z",
        )

    both = computed(frozenset())
    assert both["announcement"] == {"mode": "BGP", "nodes": ["a", "b"]}
    assert (both["realServers"]["ready"], both["realServers"]["down"]) == (0, 2)
    dead = computed(frozenset({"a"}))
    assert dead["announcement"] == {"mode": "BGP", "nodes": ["b"]}
    assert (dead["realServers"]["ready"], dead["realServers"]["down"]) == (1, 1)
    assert [u["address"] for u in dead["realServers"]["unhealthy"]] == ["10.1.0.2"]
    assert dead["nodes"] == {"desired": 2, "programmed": 2, "summary": "2/2"}
    events = [(e.reason, e.message) for e in status.events(both, dead)]
    assert ("RealServerUp", "real server 10.1.0.1:8080 is back in") in events
    # Back in only because its one director died: the Event says so.
    set_aside = status.set_aside_health(reports, frozenset({"a"}))
    assert set_aside == {("10.1.0.1", 8080)}
    events = [(e.reason, e.message) for e in status.events(both, dead, set_aside)]
    assert (
        "RealServerUp",
        "real server 10.1.0.1:8080 is back in: only directors whose agent stopped (a stale"
        " Lease) had taken it out, and no live director has",
    ) in events
    assert all(reason != "NotAnnounced" for reason, _ in events)
    gone = computed(frozenset({"a", "b"}))
    assert "announcement" not in gone and "down" not in gone["realServers"]


# ------------------------------------------------------------------ the Leases (shell)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LeaseApi:
    """A list of the agents' Leases, then a watch that brings ``events`` and ends."""

    def __init__(self, items: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        self.items = items
        self.events = events

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        assert method == "GET"
        return {"metadata": {"resourceVersion": "1"}, "items": self.items}

    async def stream(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        for event in self.events:
            yield event


def lease(node: str, renewed: str, duration: float = 2.0) -> dict[str, Any]:
    return lease_body("ipvs-system", node, duration, {}, (), renewed)


def test_agent_leases_tell_the_live_and_the_stale_agents_as_they_move() -> None:
    told: list[tuple[frozenset[str], frozenset[str]]] = []
    clock = Clock()
    api = LeaseApi(
        [lease("a", "t1"), lease("b", "t1")],
        [
            {"type": "MODIFIED", "object": lease("a", "t2")},
            {"type": "DELETED", "object": {"metadata": {"name": lease_name("c")}}},
        ],
    )
    leases = AgentLeases(api, "ipvs-system", lambda *s: told.append(s), clock)  # type: ignore[arg-type]
    leases.evaluate()
    assert told == [], "nothing is told before the first list"
    asyncio.run(leases._list_and_watch())
    assert told == [(frozenset({"a", "b"}), frozenset())], "judged once per change only"
    clock.now += 2.5  # neither renewed for longer than its duration: both stale
    leases.evaluate()
    assert told[-1] == (frozenset(), frozenset({"a", "b"}))
    api.items, api.events = [lease("a", "t3")], []  # a renewed; b deleted (a clean stop)
    asyncio.run(leases._list_and_watch())
    assert told[-1] == (frozenset({"a"}), frozenset())
    leases.evaluate()
    assert len(told) == 3


def test_time_the_operator_could_not_see_the_leases_counts_against_nobody() -> None:
    """An API server away for longer than a Lease lasts must not make every agent look dead
    (and take their BGP announcements and verdicts out of status until they renew): while
    blind nothing is told, and on the next list each Lease has the time it had left."""
    told: list[tuple[frozenset[str], frozenset[str]]] = []
    clock = Clock()
    api = LeaseApi([lease("a", "t1"), lease("b", "t1")], [])
    leases = AgentLeases(api, "ipvs-system", lambda *s: told.append(s), clock)  # type: ignore[arg-type]
    asyncio.run(leases._list_and_watch())
    clock.now = 1001.0
    api.items = [lease("a", "t1"), lease("b", "t2")]  # b renewed, a did not
    asyncio.run(leases._list_and_watch())
    clock.now = 1002.5
    leases.evaluate()
    assert told[-1] == (frozenset({"b"}), frozenset({"a"})), "a died"
    clock.now = 1002.6
    leases.blind()  # as run() does when the list or watch fails
    clock.now = 1010.0
    leases.evaluate()
    assert len(told) == 2, "nothing is judged while the Leases cannot be seen"
    asyncio.run(leases._list_and_watch())  # back before any agent could renew
    assert len(told) == 2, "b had 0.5 s left when the view was lost, a stays stale"
    clock.now = 1010.5
    leases.evaluate()
    assert told[-1] == (frozenset(), frozenset({"a", "b"}))


# ------------------------------------------------------------------ re-queueing


class NoObjects:
    """Views with no VirtualServer: only the queue is looked at."""

    def virtual_server_keys(self) -> list[tuple[str, str]]:
        return []


def queued(controller: Controller) -> set[tuple[str, str, str]]:
    async def drain() -> set[tuple[str, str, str]]:
        found = set()
        while len(controller.queue):
            key = await controller.queue.get()
            controller.queue.done(key)
            found.add(key)
        return found

    return asyncio.run(drain())


def test_a_node_moving_between_alive_stale_and_no_lease_requeues_its_virtual_servers() -> None:
    controller = Controller(
        Settings(),
        NoObjects(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        EventPoster(None, "t"),  # type: ignore[arg-type]
    )
    controller.report_changed("a", "a", {("shop", "web"): report("a", None)}, gone=False)
    controller.report_changed("b", "b", {("shop", "api"): report("b", None)}, gone=False)
    queued(controller)
    none: frozenset[str] = frozenset()
    controller.agents_changed(frozenset({"a"}), none)  # first word: every report is judged
    assert queued(controller) == {(VS, "shop", "web"), (VS, "shop", "api")}
    controller.agents_changed(none, frozenset({"a"}))  # a died
    assert queued(controller) == {(VS, "shop", "web")}
    controller.agents_changed(none, none)  # a's stale Lease deleted: its report stands again
    assert queued(controller) == {(VS, "shop", "web")}
    controller.agents_changed(none, frozenset({"b"}))  # b had no Lease; now a stale one
    assert queued(controller) == {(VS, "shop", "api")}
    controller.agents_changed(none, frozenset({"b"}))
    assert queued(controller) == set()


def test_a_rewritten_report_object_reconciles_only_the_entries_that_changed() -> None:
    """An agent rewrites a whole object for one entry's change; the other entries it lists
    cost no reconcile (else one change on N nodes is N times the object's entries)."""
    controller = Controller(
        Settings(),
        NoObjects(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        EventPoster(None, "t"),  # type: ignore[arg-type]
    )
    entries = {("shop", f"vs-{i}"): report("a", None) for i in range(50)}
    controller.report_changed("a", "a", {}, gone=False)
    controller.report_changed("a", "a.1", entries, gone=False, part=True)
    assert len(queued(controller)) == 50  # a new object: everything it lists
    moved = {**entries, ("shop", "vs-7"): DirectorReport("a", "Failed", 2, "KernelError")}
    del moved[("shop", "vs-9")]
    moved[("shop", "vs-new")] = report("a", None)
    controller.report_changed("a", "a.1", moved, gone=False, part=True)
    assert queued(controller) == {
        (VS, "shop", "vs-7"),
        (VS, "shop", "vs-9"),
        (VS, "shop", "vs-new"),
    }
    controller.report_changed("a", "a.1", moved, gone=False, part=True)
    assert queued(controller) == set()
    controller.report_changed("a", "a.1", {}, gone=True, part=True)
    assert len(queued(controller)) == 50
