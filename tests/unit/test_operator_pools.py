"""AddressPool judgement (usable, Overlap, InvalidRange) and status."""

from __future__ import annotations

from typing import Any

from ipvs_api import conditions
from ipvs_operator import pools
from ipvs_operator.controller import pool_signature


def body(name: str, addresses: list[str], created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "AddressPool",
        "metadata": {"name": name, "creationTimestamp": created, "generation": 3},
        "spec": {"addresses": addresses},
    }


def test_the_younger_of_two_overlapping_pools_is_refused() -> None:
    views = pools.judge(
        [
            body("young", ["192.0.2.8/29"], created="2026-02-01T00:00:00Z"),
            body("old", ["192.0.2.0-192.0.2.9"]),
            body("apart", ["198.51.100.0/30", "2001:db8::/126"]),
        ]
    )
    by_name = {v.name: v for v in views}
    assert by_name["old"].usable and by_name["apart"].usable
    assert by_name["young"].problem is not None
    reason, message = by_name["young"].problem
    assert reason == pools.OVERLAP
    assert "192.0.2.8-192.0.2.15 overlaps 192.0.2.0-192.0.2.9 of AddressPool old" in message


def test_reversed_range_is_invalid_range() -> None:
    (view,) = pools.judge([body("bad", ["192.0.2.9-192.0.2.1"])])
    assert not view.usable and view.problem is not None
    assert view.problem[0] == pools.INVALID_RANGE
    status = pools.status(view, 0, [], now="2026-01-01T00:00:00Z")
    ready = status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "InvalidRange")
    assert status["available"] == 0


def test_size_counts_distinct_addresses_and_status_saturates() -> None:
    (view,) = pools.judge([body("p", ["192.0.2.0/30", "192.0.2.2-192.0.2.5", "2001:db8::/64"])])
    assert view.pool is not None
    assert pools.size(view.pool) == 6 + 2**64
    status = pools.status(view, 4, [])
    assert status["allocated"] == 4
    assert status["available"] == pools.MAX_INT64
    assert status["observedGeneration"] == 3
    (small,) = pools.judge([body("s", ["192.0.2.0/30"])])
    st = pools.status(small, 4, [])
    assert st["available"] == 0
    assert st["conditions"][0]["message"] == "4 of 4 addresses allocated"


def test_transition_time_moves_only_when_ready_changes() -> None:
    (view,) = pools.judge([body("p", ["192.0.2.0/30"])])
    first = pools.status(view, 0, [], now="2026-01-01T00:00:00Z")
    later = pools.status(view, 2, first["conditions"], now="2026-01-02T00:00:00Z")
    assert later["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert later["conditions"][0]["type"] == conditions.READY


def test_a_pool_of_firewall_marks_reports_marks_in_use_and_never_exhausts() -> None:
    marks = {**body("marks", []), "spec": {"firewallMarks": [{"first": 16, "last": 31}]}}
    both = body("both", ["192.0.2.0/30"], created="2026-01-02T00:00:00Z")
    both["spec"]["firewallMarks"] = [{"first": 100}]
    views = {v.name: v for v in pools.judge([marks, both])}
    assert views["marks"].usable and views["both"].usable
    st = pools.status(views["marks"], 0, [], marks_in_use=2)
    assert st["conditions"][0]["message"] == "2 firewall mark(s) in use"
    assert (st["allocated"], st["available"]) == (0, 0)
    st = pools.status(views["both"], 1, [], marks_in_use=1)
    assert st["conditions"][0]["message"] == "1 of 4 addresses allocated; 1 firewall mark(s) in use"


def test_a_pool_that_is_not_ready_says_what_its_holders_keep() -> None:
    views = pools.judge(
        [
            body("old", ["192.0.2.0/28"]),
            body("young", ["192.0.2.8/29"], created="2026-02-01T00:00:00Z"),
        ]
    )
    young = next(v for v in views if v.name == "young")
    st = pools.status(young, 3, [], marks_in_use=1)
    ready = st["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", pools.OVERLAP)
    assert ready["message"].endswith(
        "; 3 addresses and 1 firewall mark in use stay with their holders until it is ready"
    )
    assert (st["allocated"], st["available"]) == (3, 0)
    alone = pools.status(young, 0, [])["conditions"][0]["message"]
    assert "stay with their holders" not in alone


def test_a_pool_is_judged_again_for_a_new_spec_or_object_not_for_its_status() -> None:
    """The operator rewrites pool status as addresses are handed out; judging every pool again
    (and resetting the allocator's search for free addresses) on each of those would be waste."""
    body: dict[str, Any] = {
        "metadata": {
            "name": "p",
            "uid": "u1",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "generation": 1,
            "resourceVersion": "10",
        },
        "spec": {"addresses": ["192.0.2.0/24"]},
        "status": {"allocated": 1},
    }
    status_written = {
        **body,
        "metadata": {**body["metadata"], "resourceVersion": "11"},
        "status": {"allocated": 2},
    }
    assert pool_signature(status_written) == pool_signature(body)
    edited = {**body, "metadata": {**body["metadata"], "generation": 2}}
    recreated = {**body, "metadata": {**body["metadata"], "uid": "u2"}}
    assert pool_signature(edited) != pool_signature(body)
    assert pool_signature(recreated) != pool_signature(body)
