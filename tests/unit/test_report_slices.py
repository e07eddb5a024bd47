"""A node's report spread over objects that each stay small, whatever the node directs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs_agent.desired import Outcome, Role, State
from ipvs_agent.model import KernelInfo
from ipvs_agent.status import (
    SLICE_BYTES,
    EntryMemo,
    node_status,
    slice_count,
    slice_name,
    slice_of,
    split,
)
from ipvs_api import schema
from ipvs_operator.status import DirectorReport
from ipvs_operator.views import newest, report_entries

ROOT = Path(__file__).resolve().parents[2]
KERNEL = KernelInfo("1.2.1", 4096, "6.1.0-56-amd64", ("rr", "wlc"), ("gre", "ipip"))


def outcome(generation: int = 1, message: str = "") -> Outcome:
    state = State.FAILED if message else State.PROGRAMMED
    reason = "KernelError" if message else ""
    return Outcome(state, reason, message, frozenset({Role.DIRECTOR}), generation, 10, 0)


def status_of(outcomes: dict[str, Outcome]) -> dict[str, Any]:
    return node_status(outcomes, KERNEL, "0.1.0", "2026-12-03T23:00:00Z")


def size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


def many(n: int, generation: int = 1) -> dict[str, Outcome]:
    return {f"ns{i % 7}/vs-{i}": outcome(generation) for i in range(n)}


def test_a_small_node_keeps_every_entry_in_its_ipvsnode() -> None:
    slices = split(status_of(many(50)))
    assert slices.count == 1 and slices.rest == ()
    assert len(slices.head["virtualServers"]) == 50
    assert slices.head["reportSlices"] == 1 and slices.head["virtualServerCount"] == 50


def test_20000_virtual_servers_fit_objects_well_under_the_etcd_limit() -> None:
    status = status_of(many(20_000))
    assert size(status) > 1.5 * 1024 * 1024  # one object would be refused by etcd
    slices = split(status)
    parts = [slices.head["virtualServers"], *slices.rest]
    assert max(size(list(p)) for p in parts) <= SLICE_BYTES
    assert size(slices.head) < SLICE_BYTES + 4096
    names = [(e["namespace"], e["name"]) for p in parts for e in p]
    assert len(names) == len(set(names)) == 20_000
    assert slices.head["reportSlices"] == slices.count == len(parts)


def test_one_virtual_server_changing_changes_one_slice() -> None:
    outcomes = many(8000)
    before = split(status_of(outcomes))
    outcomes["ns3/vs-1234"] = outcome(2)
    after = split(status_of(outcomes), before.count)
    assert after.count == before.count > 1
    old = [before.head["virtualServers"], *before.rest]
    new = [after.head["virtualServers"], *after.rest]
    changed = [i for i, (a, b) in enumerate(zip(old, new, strict=True)) if list(a) != list(b)]
    assert changed == [slice_of("ns3", "vs-1234", after.count)]


def test_the_count_does_not_flap_at_a_boundary_and_shrinks_when_mostly_empty() -> None:
    entries = status_of(many(3000))["virtualServers"]
    budget = size(entries) // 3  # needs 4 slices
    grown = slice_count(entries, 1, budget)
    assert grown == 4
    # A few entries fewer would fit 2 slices at a pinch, but the count holds…
    assert slice_count(entries[:2900], grown, budget) == grown
    # …until the entries would fill under a quarter of them, halving while that holds.
    assert slice_count(entries[:600], grown, budget) == 2
    assert slice_count(entries[:400], grown, budget) == 1
    assert slice_count(entries[:600], 1, budget) == 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 3000), min_size=0, max_size=300),
    st.integers(0, 4).map(lambda n: 1 << n),
    st.integers(2000, 20000),
)
def test_every_slice_fits_its_budget_and_holds_each_entry_once(
    messages: list[int], previous: int, budget: int
) -> None:
    outcomes = {f"ns/vs-{i}": outcome(1, "x" * m) for i, m in enumerate(messages)}
    slices = split(status_of(outcomes), previous, budget)
    parts = [slices.head["virtualServers"], *slices.rest]
    assert all(size(list(p)) <= budget for p in parts if len(p) > 1)
    assert sorted(e["name"] for p in parts for e in p) == sorted(n[3:] for n in outcomes)
    assert slices.count & (slices.count - 1) == 0


def test_slice_names_are_valid_object_names_even_for_long_node_names() -> None:
    assert slice_name("worker-1", 3) == "worker-1.3"
    long = "a" * 250
    name = slice_name(long, 12)
    assert len(name) <= 253 and name.endswith(".12") and name != slice_name("a" * 249, 12)


def test_an_ipvsnodereport_validates_and_reads_as_its_nodes_report() -> None:
    slices = split(status_of(many(4000)))
    assert slices.count > 1
    head = {"kind": "IPVSNode", "metadata": {"name": "n1"}, "spec": {}, "status": slices.head}
    _, errors = schema.validate("IPVSNode", head)
    assert errors == []
    read = report_entries(head)
    for index, entries in enumerate(slices.rest, start=1):
        obj = {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "IPVSNodeReport",
            "metadata": {"name": slice_name("n1", index)},
            "spec": {"node": "n1"},
            "status": {"virtualServers": list(entries)},
        }
        _, errors = schema.validate("IPVSNodeReport", obj)
        assert errors == []
        read.update(report_entries(obj))
    assert len(read) == 4000 and {r.node for r in read.values()} == {"n1"}


def test_the_entries_schema_of_both_report_kinds_is_one() -> None:
    """IPVSNodeReport carries IPVSNode's entries: the two CRD files must say the same."""

    def entries(path: str) -> Any:
        doc = yaml.safe_load((ROOT / "crds" / path).read_text())
        props = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
        return props["status"]["properties"]["virtualServers"]

    assert entries("ipvs.io_ipvsnodereports.yaml") == entries("ipvs.io_ipvsnodes.yaml")


def test_while_an_entry_moves_between_objects_the_newer_generation_counts() -> None:
    old = DirectorReport("n1", "Programmed", 3, "", "", (), None)
    new = DirectorReport("n1", "Failed", 4, "KernelError", "x", (), None)
    other = DirectorReport("n2", "Programmed", 4, "", "", (), None)
    assert newest([old, new, other]) == {"n1": new, "n2": other}
    assert newest([new, old]) == {"n1": new}


def test_a_report_reuses_the_entries_that_did_not_change_and_reads_the_same() -> None:
    """``EntryMemo``: after a change pass only the changed VirtualServer's entry is new; the
    report, and how it is split, are exactly those made without the memo."""
    memo = EntryMemo()
    outcomes = many(300)
    announced = {"ns1/vs-1": ("Layer2", ("eth0",))}
    first = node_status(outcomes, KERNEL, "0.1.0", "t", announcements=announced, memo=memo)
    assert first == node_status(outcomes, KERNEL, "0.1.0", "t", announcements=announced)
    changed = {**outcomes, "ns3/vs-3": outcome(2)}  # one new generation
    moved = {"ns1/vs-1": ("Layer2", ("eth1",))}  # one announcement moved
    second = node_status(changed, KERNEL, "0.1.0", "t", announcements=moved, memo=memo)
    assert second == node_status(changed, KERNEL, "0.1.0", "t", announcements=moved)
    new = [b for a, b in zip(first["virtualServers"], second["virtualServers"], strict=True)
           if a is not b]  # fmt: skip
    assert [(e["name"], e["observedGeneration"]) for e in new] == [("vs-1", 1), ("vs-3", 2)]
    for budget in (4096, SLICE_BYTES):
        assert split(second, 1, budget, memo.size) == split(second, 1, budget)
        assert split(second, 1, budget, memo.size) == split(second, 1, budget)  # remembered


def test_a_remembered_size_is_used_only_for_the_very_entry_it_was_measured_on() -> None:
    memo = EntryMemo()
    first = node_status({"ns/a": outcome()}, KERNEL, "0.1.0", "t", memo=memo)
    entry = first["virtualServers"][0]
    assert memo.size(entry) == size(entry)
    longer = {**entry, "message": "x" * 100}  # another dict of the same VirtualServer
    assert memo.size(longer) == size(longer)
