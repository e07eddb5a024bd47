"""VirtualServer status: real-server counts, director aggregation, conditions and Events."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from typing import Any

from ipvs_api import conditions, load
from ipvs_api.endpoints import endpoints_from_slices
from ipvs_operator import backends, status, views
from ipvs_operator.status import Address, DirectorReport

GOT = Address(
    True,
    conditions.ALLOCATED,
    "192.0.2.1 from AddressPool p",
    ipaddress.ip_address("192.0.2.1"),
    "p",
)
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"


def vs(**spec: Any) -> Any:
    body = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "shop", "generation": 2},
        "spec": {
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            "backends": {"service": {"name": "web"}},
            **spec,
        },
    }
    return load.virtual_server(body)


def endpoint_slice(family: str, *endpoints: tuple[str, bool, bool], port: str = "http") -> Any:
    return {
        "addressType": family,
        "ports": [{"name": port, "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": r, "serving": r or t, "terminating": t}}
            for a, r, t in endpoints
        ],
    }


def test_counts_ready_and_draining_of_the_right_family_and_port() -> None:
    eps = endpoints_from_slices(
        [
            endpoint_slice(
                "IPv4",
                ("10.0.0.1", True, False),
                ("10.0.0.2", False, True),
                ("10.0.0.3", False, False),
            ),
            endpoint_slice("IPv6", ("fd00::1", True, False)),
            endpoint_slice("IPv4", ("10.0.0.9", True, False), port="metrics"),
        ]
    )
    counts = backends.count(vs(), eps)
    assert (counts.ready, counts.total, counts.summary) == (1, 2, "1/2")
    tun = vs(forwarding={"method": "TUN"}, ports=[{"port": 80}])
    assert backends.count(tun, eps).total == 4  # TUN crosses families; port 80 needs no name


def test_counts_static_real_servers_by_weight() -> None:
    static = vs(
        ports=[{"port": 80}],
        backends={
            "static": [{"address": "198.51.100.1"}, {"address": "198.51.100.2", "weight": 0}]
        },
    )
    assert backends.count(static, []) == backends.Counts(1, 2)


def test_programmed_needs_every_director_at_this_generation() -> None:
    done = DirectorReport("a", "Programmed", 2)
    stale = DirectorReport("b", "Programmed", 1)
    assert status.programmed(2, set(), {})[:2] == (False, status.NO_DIRECTORS)
    assert status.programmed(2, {"a"}, {"a": done})[:2] == (True, conditions.ALL_PROGRAMMED)
    pending = status.programmed(2, {"a", "b"}, {"a": done, "b": stale})
    assert pending[:2] == (False, conditions.PENDING) and pending[3] == 1
    assert "waiting for b" in pending[2]
    failed = DirectorReport("b", "Failed", 2, "AddressConflict", "taken by shop/old")
    result = status.programmed(2, {"a", "b"}, {"a": done, "b": failed})
    assert result[:2] == (False, "AddressConflict") and "taken by shop/old" in result[2]
    unsupported = DirectorReport("b", "Unsupported", 2, "Unsupported", "no twos")
    assert status.programmed(2, {"a", "b"}, {"b": unsupported})[1] == conditions.UNSUPPORTED


def compute(
    old: dict[str, Any],
    *,
    ready: int = 1,
    desired: set[str] | None = None,
    address: Address = GOT,
    at: str = T0,
) -> dict[str, Any]:
    nodes = {"a"} if desired is None else desired
    return status.compute(
        generation=2,
        old=old,
        address=address,
        counts=backends.Counts(ready, 2),
        desired=nodes,
        reports={n: DirectorReport(n, "Programmed", 2) for n in nodes},
        now=at,
    )


def test_ready_status_and_summaries() -> None:
    st = compute({})
    assert st["address"] == "192.0.2.1" and st["addressPool"] == "p"
    assert st["observedGeneration"] == 2
    assert st["nodes"] == {"desired": 1, "programmed": 1, "summary": "1/1"}
    assert st["realServers"] == {"ready": 1, "total": 2, "summary": "1/2"}
    assert [(c["type"], c["status"]) for c in st["conditions"]] == [
        ("AddressAllocated", "True"),
        ("Programmed", "True"),
        ("Ready", "True"),
    ]
    assert all(c["observedGeneration"] == 2 for c in st["conditions"])


def test_not_ready_says_why_and_transition_times_are_stable() -> None:
    first = compute({}, ready=0, at=T0)
    ready = status.condition(first, conditions.READY)
    assert (ready["status"], ready["reason"]) == ("False", conditions.NO_BACKENDS)
    again = compute(first, ready=0, at=T1)
    assert again == first  # nothing changed: nothing to write
    up = compute(first, ready=1, at=T1)
    assert status.condition(up, conditions.READY)["lastTransitionTime"] == T1
    assert status.condition(up, conditions.ADDRESS_ALLOCATED)["lastTransitionTime"] == T0
    exhausted = Address(False, conditions.POOL_EXHAUSTED, "no free IPv4 address left")
    none = compute({}, address=exhausted)
    assert "address" not in none
    assert status.condition(none, conditions.READY)["reason"] == conditions.POOL_EXHAUSTED


def test_events_on_transitions_only() -> None:
    first = compute({}, ready=0)
    assert [(e.type, e.reason) for e in status.events({}, first)] == [
        ("Normal", "AddressAllocated")
    ]
    up = compute(first, at=T1)
    assert [(e.type, e.reason) for e in status.events(first, up)] == [("Normal", "Ready")]
    assert status.events(up, compute(up, at=T1)) == []
    down = compute(up, ready=0, at=T1)
    assert [(e.type, e.reason) for e in status.events(up, down)] == [("Warning", "NotReady")]
    conflict = compute({}, address=Address(False, conditions.ADDRESS_CONFLICT, "taken"))
    assert [(e.type, e.reason) for e in status.events({}, conflict)] == [
        ("Warning", conditions.ADDRESS_CONFLICT)
    ]
    assert status.events(conflict, compute(conflict, address=conflict_address())) == []


def conflict_address() -> Address:
    return Address(False, conditions.ADDRESS_CONFLICT, "taken")


def test_an_admitted_firewall_mark_is_in_status_and_announced() -> None:
    marked = Address(
        True,
        conditions.FIREWALL_MARK_ADMITTED,
        "firewall mark 16 (0x10) granted by AddressPool marks",
        pool="marks",
        firewall_mark=16,
    )
    st = compute({}, address=marked)
    assert (st["firewallMark"], st["addressPool"]) == (16, "marks")
    assert "address" not in st
    ready = status.condition(st, conditions.READY)
    assert ready["message"] == "serving firewall mark 16 to 1 real server(s)"
    assert [(e.type, e.reason) for e in status.events({}, st)] == [
        ("Normal", conditions.FIREWALL_MARK_ADMITTED),
        ("Normal", "Ready"),
    ]
    refused = compute(
        st, address=Address(False, conditions.FIREWALL_MARK_NOT_ADMITTED, "no AddressPool ...")
    )
    assert "firewallMark" not in refused and "addressPool" not in refused
    assert [(e.type, e.reason) for e in status.events(st, refused)] == [
        ("Warning", conditions.FIREWALL_MARK_NOT_ADMITTED),
        ("Warning", "NotReady"),
    ]


def test_a_kept_address_stays_ready_and_warns_once() -> None:
    first = compute({})
    kept = Address(
        True,
        conditions.ADDRESS_RETAINED,
        "AddressPool p does not exist: keeping 192.0.2.1 until it exists again",
        ipaddress.ip_address("192.0.2.1"),
        "p",
    )
    held = compute(first, address=kept, at=T1)
    assert held["address"] == "192.0.2.1" and held["addressPool"] == "p"
    for type_ in (conditions.ADDRESS_ALLOCATED, conditions.READY):
        before, after = status.condition(first, type_), status.condition(held, type_)
        assert after["status"] == "True"
        assert after["lastTransitionTime"] == before["lastTransitionTime"]
    assert status.condition(held, conditions.ADDRESS_ALLOCATED)["reason"] == "AddressRetained"
    assert [(e.type, e.reason) for e in status.events(first, held)] == [
        ("Warning", conditions.ADDRESS_RETAINED)
    ]
    assert status.events(held, compute(held, address=kept, at=T1)) == []
    back = compute(held, at=T1)
    assert [(e.type, e.reason) for e in status.events(held, back)] == [
        ("Normal", "AddressAllocated")
    ]


def test_index_entries_keep_only_what_is_read() -> None:
    node = {
        "metadata": {"name": "node-a", "managedFields": [{"big": True}]},
        "status": {
            "virtualServers": [
                {
                    "namespace": "shop",
                    "name": "web",
                    "state": "Programmed",
                    "observedGeneration": 2,
                    "roles": ["Director"],
                },
                {"namespace": "shop", "name": "dr", "state": "Programmed", "roles": ["RealServer"]},
            ]
        },
    }
    assert views.report_entries(node) == {
        ("shop", "web"): DirectorReport("node-a", "Programmed", 2)
    }
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "managedFields": [{}],
            "annotations": {"ipvs.io/scheduler": "rr", "kubectl.kubernetes.io/x": "y"},
        },
        "spec": {"type": "ClusterIP", "ports": [{"port": 80}]},
    }
    (kept,) = views.service_entry(svc).values()
    assert "managedFields" not in kept["metadata"]
    assert kept["metadata"]["annotations"] == {"ipvs.io/scheduler": "rr"}
    assert kept["spec"] == {"type": "ClusterIP"}


def test_report_entries_of_many_nodes_share_their_strings() -> None:
    """The operator holds an entry per (node, VirtualServer): two million at 20 000 x 100.
    Each node's parsed report must not bring its own copy of the same names and states."""

    def parsed(node: str) -> dict[str, Any]:
        entry = {
            "namespace": "shop",
            "name": "web",
            "state": "Failed",
            "reason": "AddressConflict",
            "message": "the kernel already has TCP 192.0.2.10:80",
            "observedGeneration": 2,
            "roles": ["Director"],
            "announcement": {"mode": "Layer2"},
        }
        body = {"metadata": {"name": node}, "status": {"virtualServers": [entry]}}
        fresh: dict[str, Any] = json.loads(json.dumps(body))  # fresh strings, as served
        return fresh

    ((key_a, a),) = views.report_entries(parsed("n-a")).items()
    ((key_b, b),) = views.report_entries(parsed("n-b")).items()
    assert a == replace(b, node="n-a")
    assert all(x is y for x, y in zip(key_a, key_b, strict=True))
    # kopf keeps the index key of every entry: one string per VirtualServer for all nodes
    index_a, index_b = (views.ipvs_node_entries(parsed(n)) for n in ("n-a", "n-b"))
    (report_a,) = (k for k in index_a if isinstance(k, str))
    (report_b,) = (k for k in index_b if isinstance(k, str))
    assert report_a is report_b and views.virtual_server_of(report_a) == ("shop", "web")
    for field in ("state", "reason", "message", "announcement"):
        assert getattr(a, field) is getattr(b, field), field
    assert not hasattr(a, "__dict__")  # slots: no per-entry dict


def test_entries_that_say_the_same_share_one_report_and_read_as_before() -> None:
    """A node reports most VirtualServers alike; the operator keeps an entry per (node,
    VirtualServer), so alike entries are one object. Any difference, or health, is its own."""
    programmed: dict[str, Any] = {
        "state": "Programmed",
        "observedGeneration": 2,
        "roles": ["Director"],
    }
    announced = {**programmed, "announcement": {"mode": "Layer2"}}
    health: dict[str, Any] = {
        "realServerHealth": [{"address": "198.51.100.7", "port": 80, "state": "Down"}]
    }
    entries = {
        "a": programmed,
        "b": programmed,
        "newer": {**programmed, "observedGeneration": 3},
        "failed": {**programmed, "state": "Failed", "reason": "KernelError", "message": "EBUSY"},
        "failed-too": {
            **programmed,
            "state": "Failed",
            "reason": "KernelError",
            "message": "EBUSY",
        },
        "other-reason": {**programmed, "state": "Failed", "reason": "Unsupported"},
        "other-message": {**programmed, "state": "Failed", "reason": "KernelError"},
        "announced": announced,
        "announced-too": announced,
        "sick": {**programmed, **health},
        "sick-too": {**programmed, **health},
        "no-generation": {"state": "Programmed", "roles": ["Director"]},
    }
    body = {
        "metadata": {"name": "n1"},
        "status": {
            "virtualServers": [{"namespace": "shop", "name": n, **e} for n, e in entries.items()]
        },
    }
    read = {name: r for (_, name), r in views.report_entries(json.loads(json.dumps(body))).items()}
    # Each reads as it did when built on its own ...
    for name, entry in entries.items():
        alone = {
            **body,
            "status": {"virtualServers": [{"namespace": "shop", "name": name, **entry}]},
        }
        assert read[name] == views.report_entries(alone)[("shop", name)], name
    # ... and the alike are one object, the rest distinct.
    assert read["a"] is read["b"]
    assert read["failed"] is read["failed-too"]
    assert read["announced"] is read["announced-too"]
    assert read["sick"] is not read["sick-too"] and read["sick"] == read["sick-too"]
    distinct = ["a", "newer", "failed", "other-reason", "other-message", "announced", "sick"]
    assert len({id(read[n]) for n in [*distinct, "no-generation"]}) == len(distinct) + 1


def report_parses(monkeypatch: Any) -> list[int]:
    """The ids of the bodies :func:`views.report_entries` parses from now on, in order."""
    parsed: list[int] = []
    real = views.report_entries

    def counting(body: Any) -> Any:
        parsed.append(id(body))
        return real(body)

    monkeypatch.setattr(views, "report_entries", counting)
    return parsed


def test_the_report_reader_parses_each_object_once_and_holds_it_only_until_taken(
    monkeypatch: Any,
) -> None:
    """kopf hands one event's body to the index handler, then to the event handler, which
    takes it: each body is parsed once, by identity, and not held after. Bodies never taken
    are held up to a bound."""
    parsed = report_parses(monkeypatch)
    entry = {"namespace": "shop", "name": "web", "roles": ["Director"], "state": "Programmed"}
    bodies = [
        {"metadata": {"name": f"n{i}"}, "status": {"virtualServers": [entry]}} for i in range(5)
    ]
    reader = views.ReportReader(size=3)
    first = [reader(b) for b in bodies[1:4]]  # n1, n2, n3 between index and event handler
    assert len(parsed) == 3 and len(reader) == 3
    assert all(reader(b) is was for b, was in zip(bodies[1:4], first, strict=True))
    assert reader.take(bodies[2]) is first[1] and len(parsed) == 3 and len(reader) == 2
    assert reader.take(bodies[2]) == first[1] and len(parsed) == 4  # taken: read again
    equal = json.loads(json.dumps(bodies[3]))  # equal, but another event's body
    assert reader.take(equal) == first[2] and len(parsed) == 5 and len(reader) == 2
    reader(bodies[4])  # n4; then n0 makes room: n1 goes, never taken
    reader(bodies[0])
    assert len(reader) == 3 and len(parsed) == 7
    assert reader.take(bodies[1]) == first[0] and len(parsed) == 8
    assert reader.take(bodies[0])[("shop", "web")].node == "n0" and len(parsed) == 8


def test_the_announcing_node_is_in_status_and_every_move_is_an_event() -> None:
    def with_announcer(node: str | None) -> dict[str, Any]:
        reports = {
            n: DirectorReport(n, "Programmed", 2, announcement="Layer2" if n == node else None)
            for n in ("n1", "n2")
        }
        return status.compute(
            generation=2,
            old={},
            address=GOT,
            counts=backends.Counts(1, 1),
            desired={"n1", "n2"},
            reports=reports,
            now=T0,
        )

    first, moved, gone = with_announcer("n1"), with_announcer("n2"), with_announcer(None)
    assert first["announcement"] == {"mode": "Layer2", "nodes": ["n1"]}
    assert "announcement" not in gone
    events = [(e.reason, e.message) for e in status.events(first, moved)]
    assert ("Announced", "192.0.2.1 announced on layer 2 by n2 (was on layer 2 by n1)") in events
    (lost,) = [e for e in status.events(moved, gone) if e.reason == "NotAnnounced"]
    assert lost.type == "Warning"
    assert not [e for e in status.events(moved, moved) if "Announced" in e.reason]
    entry = {
        "namespace": "shop",
        "name": "web",
        "roles": ["Director"],
        "state": "Programmed",
        "observedGeneration": 2,
        "announcement": {"mode": "Layer2", "interfaces": ["eth0"]},
    }
    report = views.report_entries(
        {"metadata": {"name": "n1"}, "status": {"virtualServers": [entry]}}
    )
    assert report[("shop", "web")].announcement == "Layer2"
