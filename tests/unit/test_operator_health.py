"""Real-server health in VirtualServer status and Events, from the directors' reports."""

from __future__ import annotations

from typing import Any

from ipvs_operator import backends, health, status, views
from ipvs_operator.health import RealServerReport
from ipvs_operator.status import DirectorReport
from tests.unit.test_operator_status import GOT, T0

DOWN = RealServerReport("198.51.100.11", 0, "Down", "connection refused")
DRAIN = RealServerReport("198.51.100.12", 8080, "Drain", "feedback agent said drain")
STALE = RealServerReport("198.51.100.13", 0, "FeedbackStale", "silent for 180s")


def compute(old: dict[str, Any], reports: dict[str, tuple[RealServerReport, ...]]) -> Any:
    nodes = set(reports) or {"a"}
    return status.compute(
        generation=2,
        old=old,
        address=GOT,
        counts=backends.Counts(3, 3),
        desired=nodes,
        reports={n: DirectorReport(n, "Programmed", 2, health=reports.get(n, ())) for n in nodes},
        now=T0,
    )


def test_an_ipvsnode_entry_names_its_real_servers() -> None:
    node = {
        "metadata": {"name": "node-a"},
        "status": {
            "virtualServers": [
                {
                    "namespace": "shop",
                    "name": "web",
                    "state": "Programmed",
                    "observedGeneration": 2,
                    "roles": ["Director"],
                    "downRealServers": 1,
                    "realServerHealth": [
                        {"address": "198.51.100.11", "state": "Down", "message": "refused"},
                        {"address": "198.51.100.13", "state": "FeedbackStale"},
                    ],
                }
            ]
        },
    }
    (report,) = views.report_entries(node).values()
    assert report.health == (
        RealServerReport("198.51.100.11", 0, "Down", "refused"),
        RealServerReport("198.51.100.13", 0, "FeedbackStale"),
    )


def test_status_lists_each_real_server_out_once_with_its_directors() -> None:
    st = compute({}, {"a": (DOWN, DRAIN, STALE), "b": (DOWN,), "c": ()})
    rs = st["realServers"]
    assert (rs["ready"], rs["total"], rs["down"], rs["summary"]) == (1, 3, 2, "1/3")
    assert rs["unhealthy"] == [
        {
            "address": "198.51.100.11",
            "state": "Down",
            "directors": 2,
            "message": "down on a, b: connection refused",
        },
        {
            "address": "198.51.100.12",
            "state": "Drain",
            "directors": 1,
            "port": 8080,
            "message": "drain on a: feedback agent said drain",
        },
    ]


def test_status_without_health_reports_has_no_health_fields() -> None:
    st = compute({}, {"a": (STALE,)})
    assert st["realServers"] == {"ready": 3, "total": 3, "summary": "3/3"}


def test_an_event_when_a_real_server_goes_out_changes_how_or_comes_back() -> None:
    healthy = compute({}, {"a": ()})
    down = compute(healthy, {"a": (DOWN,)})
    assert [(e.type, e.reason, e.message) for e in status.events(healthy, down)] == [
        ("Warning", "RealServerDown", "real server 198.51.100.11 down on a: connection refused")
    ]
    assert (
        [e.reason for e in status.events(down, compute(down, {"a": (DOWN,), "b": (DOWN,)}))]
        == [
            # a second director agrees: no new Event
        ]
    )
    drained = compute(down, {"a": (DOWN, DRAIN)})
    assert [(e.reason, e.message) for e in status.events(down, drained)] == [
        (
            "RealServerDrained",
            "real server 198.51.100.12:8080 drain on a: feedback agent said drain",
        )
    ]
    back = compute(drained, {"a": ()})
    assert sorted((e.type, e.reason) for e in status.events(drained, back)) == [
        ("Normal", "RealServerUp"),
        ("Normal", "RealServerUp"),
    ]


def test_events_are_bounded() -> None:
    many = [{"address": f"198.51.100.{i}", "state": "Down", "message": "x"} for i in range(30)]
    found = health.events([], many)
    assert len(found) == health.MAX_EVENTS
    assert found[-1] == ("Warning", "RealServersChanged", "21 more")


def test_the_same_reports_again_change_nothing() -> None:
    first = compute({}, {"a": (DOWN,)})
    assert compute(first, {"a": (DOWN,)}) == first
    assert status.events(first, first) == []
