"""The VirtualServer mirror reads each object as it arrives and keeps the reading, not the spec
(``cluster.kept_virtual_server``), and keeps that reading across the operator's status writes
(``cluster.kept_again``: no spec copied, no validation) while it still holds."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ipvs_agent import cluster, trim
from ipvs_agent.desired import Node, PlanMemo, plan
from ipvs_agent.snapshot import ReadVirtualServer, read_virtual_servers, take
from ipvs_api import constants
from tests.served import served, status_written
from tests.unit.test_interest import ScriptedWatch
from tests.unit.test_trim import MANIFESTS

VIRTUAL_SERVERS = [m for _, m in MANIFESTS if m["kind"] == constants.VIRTUAL_SERVER]
FIRST = VIRTUAL_SERVERS[0]
CONFIRMED = trim.VIRTUAL_SERVER_STATUS


def same_entry(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal as the mirror stores them: the kept metadata and status, and the reading."""
    assert isinstance(a, ReadVirtualServer) and isinstance(b, ReadVirtualServer)
    return a == b and a.read == b.read


def test_a_status_write_keeps_the_reading_itself() -> None:
    first = served(FIRST, 1)
    before = cluster.kept_virtual_server(first)
    later = status_written(first, "999999")
    again = cluster.kept_again(later, before)
    assert again is not None and again.read is before.read  # not validated again
    assert same_entry(again, cluster.kept_virtual_server(later))
    assert again["metadata"]["resourceVersion"] == "999999"
    assert "spec" not in again


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda o: o["metadata"].__setitem__("generation", 2), id="generation"),
        pytest.param(lambda o: o["metadata"].__setitem__("uid", "other"), id="uid (recreated)"),
        pytest.param(lambda o: o["status"].__setitem__("address", "192.0.2.99"), id="address"),
        pytest.param(lambda o: o["status"].__setitem__("firewallMark", 77), id="firewall mark"),
        pytest.param(lambda o: o["status"].__setitem__("addressPool", "p2"), id="pool"),
        pytest.param(lambda o: o["status"].clear(), id="status cleared"),
        pytest.param(
            lambda o: o["metadata"].__setitem__("deletionTimestamp", "2026-12-05T01:00:00Z"),
            id="deleted",
        ),
        pytest.param(lambda o: o["metadata"].pop("generation"), id="no generation"),
        pytest.param(lambda o: o["metadata"].__setitem__("generation", "1"), id="odd generation"),
    ],
)
def test_what_the_reading_depends_on_reads_the_object_anew(change: Any) -> None:
    first = served(FIRST, 1)
    before = cluster.kept_virtual_server(first)
    later = status_written(first, "999999")
    change(later)
    assert cluster.kept_again(later, before) is None


def test_only_a_reading_is_reused() -> None:
    """A plain dict (a mirror without readings, or a test's stub) is never taken for one."""
    first = served(FIRST, 1)
    assert cluster.kept_again(status_written(first, "999999"), trim.virtual_server(first)) is None
    assert cluster.kept_again(status_written(first, "999999"), {"metadata": "odd"}) is None


#: Values the kept fields could take in a new version (right and wrong types).
values = st.one_of(
    st.none(),
    st.sampled_from(["192.0.2.10", "2001:db8::1", "not-an-ip", "", "pool-a"]),
    st.integers(-1, 2**33),
    st.booleans(),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(VIRTUAL_SERVERS) - 1),
    other=st.integers(0, len(VIRTUAL_SERVERS) - 1),
    status=st.dictionaries(st.sampled_from(CONFIRMED), values, max_size=3),
    metadata=st.dictionaries(
        st.sampled_from(["generation", "uid", "creationTimestamp", "deletionTimestamp"]),
        values,
        max_size=2,
    ),
    spec_changed=st.booleans(),
)
def test_a_kept_reading_is_always_the_one_a_new_reading_would_give(
    index: int,
    other: int,
    status: dict[str, Any],
    metadata: dict[str, Any],
    spec_changed: bool,
) -> None:
    """Whatever the new version changes, if the last reading is kept it equals what reading
    the new version makes. Two rules are taken from the API server: a new spec comes with a
    new generation (it raises a custom object's generation on every change to its spec), and
    the status fields the agent does not read are valid (checked against the schema when
    written), as ``trim`` assumes too."""
    first = served(VIRTUAL_SERVERS[index], 1)
    before = cluster.kept_virtual_server(first)
    later = status_written(first, "999999")
    later["status"].update(status)
    later["metadata"].update(metadata)
    if spec_changed:
        later["spec"] = copy.deepcopy(VIRTUAL_SERVERS[other]["spec"])
        generation = first["metadata"]["generation"]
        later["metadata"]["generation"] = generation + 1 if type(generation) is int else 2
    again = cluster.kept_again(later, before)
    event("reading kept" if again is not None else "read anew")
    if again is not None:
        assert same_entry(again, cluster.kept_virtual_server(later))
        assert read_virtual_servers([again]) == read_virtual_servers([later])


def test_the_mirror_reads_a_spec_change_but_not_a_status_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the mirror's own watch: the operator's status write keeps the reading (and
    wakes no pass); a spec change is read anew (and wakes one)."""
    changed, stop = threading.Event(), threading.Event()
    first = served(FIRST, 1)
    first["metadata"]["name"] = "web"
    spec_change = copy.deepcopy(first)
    spec_change["metadata"]["generation"] = 2
    spec_change["metadata"]["resourceVersion"] = "5"
    spec_change["spec"]["scheduler"] = {"name": "rr"}
    readings: list[Any] = []
    woke: list[bool] = []

    def listed(**kw: Any) -> Any:
        return {"metadata": {"resourceVersion": "1"}, "items": [copy.deepcopy(first)]}

    def reading() -> Any:
        (entry,) = mirror.items()
        assert isinstance(entry, ReadVirtualServer)
        return entry.read

    def script() -> Iterator[dict[str, Any]]:
        try:
            for obj in (status_written(first, "4"), spec_change):
                readings.append(reading())
                changed.clear()
                yield {"type": "MODIFIED", "raw_object": copy.deepcopy(obj)}
                woke.append(changed.is_set())
            readings.append(reading())
        finally:
            stop.set()

    ScriptedWatch.script = script()
    monkeypatch.setattr(cluster, "watch", SimpleNamespace(Watch=ScriptedWatch))
    (mirror,) = [
        m
        for m in cluster.mirrors(None, "node-a", changed)  # type: ignore[arg-type]
        if m.name == "virtualservers"
    ]
    mirror.page = 0
    mirror._list_fn = listed
    mirror.run(stop)
    assert mirror.errors == 0
    listed_reading, after_status, after_spec = readings
    assert after_status is listed_reading, "a status write is not read again"
    assert (
        after_spec is not listed_reading
        and after_spec == cluster.kept_virtual_server(spec_change).read
    )
    assert woke == [False, True]
    assert mirror.items()[0]["metadata"]["resourceVersion"] == "5"


def test_after_a_status_write_the_plan_is_the_last_one_itself() -> None:
    """The kept reading is the very object the last pass planned from, so the plan memo
    recognises it: a pass after the operator's status writes plans nothing anew."""
    first = served(FIRST, 1)
    before = cluster.kept_virtual_server(first)
    node = Node("node-a", {})
    memo = PlanMemo()
    snap = take([before], [], node)
    assert snap.virtual_servers, "the example is valid"
    last = plan(snap.virtual_servers, snap.endpoints, node, memo=memo)
    again = cluster.kept_again(status_written(first, "999999"), before)
    assert again is not None
    snap = take([again], [], node)
    assert plan(snap.virtual_servers, snap.endpoints, node, memo=memo) is last
    # a reading made anew is an equal object, not the same one: planned again
    snap = take([cluster.kept_virtual_server(status_written(first, "999999"))], [], node)
    assert plan(snap.virtual_servers, snap.endpoints, node, memo=memo) is not last
