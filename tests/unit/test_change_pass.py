"""The agent's change pass: when only some Services' endpoints changed (``cluster.Changes``),
the agent reads, diffs and writes only their kernel services, and the table it leaves is the
one a full pass would leave. Anything else, or any doubt, runs the full pass."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from ipvs_agent import cluster
from ipvs_agent.agent import Agent, Settings
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.ops import OpKind
from ipvs_agent.snapshot import service_of
from tests.unit.agent_helpers import CountingEvent, FakeHost, StubMirror
from tests.unit.test_interest import endpoint_slice


class JournalMirror(StubMirror):
    """A stub mirror that keeps a change journal as ``cluster.Mirror`` does: ``put`` and
    ``drop`` are its watch events, ``relist`` a relist."""

    def __init__(self, name: str, items: list[dict[str, Any]], key: Any = None) -> None:
        super().__init__(name, items)
        self.changes = cluster.Changes(key or cluster.Mirror._key)

    def put(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        before = next((o for o in self._items if o["metadata"]["name"] == name), None)
        self._items = [o for o in self._items if o is not before] + [obj]
        self.changes.note(before, obj)

    def relist(self) -> None:
        self.changes.note_all()


VERSIONS = itertools.count(1)


def virtual_server(name: str, service: str, address: str, **spec: Any) -> dict[str, Any]:
    version = str(next(VERSIONS))  # each write a new resourceVersion, as the API server's
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "ns", "generation": 1, "resourceVersion": version},
        "spec": {"address": address, "ports": [{"port": 80, "targetPort": 8080}],
                 "backends": {"service": {"name": service}}, **spec},
    }  # fmt: skip


class Bed:
    def __init__(self, services: int = 3) -> None:
        self.kernel = FakeKernel()
        self.virtual_servers = JournalMirror(
            "virtualservers",
            [virtual_server(f"v{i}", f"s{i}", f"192.0.2.{i + 1}") for i in range(services)],
        )
        self.slices = JournalMirror(
            "endpointslices",
            [endpoint_slice(f"s{i}-1", f"s{i}", f"198.51.100.{i + 1}") for i in range(services)],
            service_of,
        )
        self.node = JournalMirror("node", [{"metadata": {"name": "n1", "labels": {}}}])
        self.agent = Agent(
            Settings("n1", resync_seconds=3600, settle_seconds=0, admitted_only=False),
            self.kernel,
            FakeHost(),
            [self.virtual_servers, self.slices, self.node],
            CountingEvent(),
        )

    def passes(self, kind: str) -> float:
        return float(self.agent.metrics.passes.labels(kind=kind)._value.get())

    def real_servers(self, vip: str) -> set[str]:
        table = self.kernel.dump()
        return {str(d.address) for k, s in table.items() if k.address == vip for d in s.dests}


def test_an_endpoint_change_reads_and_writes_only_its_service_and_matches_a_full_pass() -> None:
    bed = Bed()
    bed.agent.run_once("change")  # the first pass is full
    assert (bed.passes("full"), bed.passes("change")) == (1, 0)
    dumps = bed.kernel.dumps
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.7"))
    result = bed.agent.run_once("change")
    assert (bed.passes("full"), bed.passes("change")) == (1, 1)
    assert bed.kernel.dumps == dumps, "a change pass does not dump the table"
    timed = bed.agent.metrics.registry.get_sample_value
    assert timed("ipvs_agent_change_to_kernel_seconds_count", {"kind": "change"}) == 1
    assert bed.kernel.reads == 1
    assert {str(op.service.key.address) for op in result.ops} == {"192.0.2.2"}
    assert bed.real_servers("192.0.2.2") == {"203.0.113.7"}, "the old endpoint went at once"
    assert result.outcomes["ns/v1"].real_servers == 1
    assert set(result.outcomes) == {"ns/v0", "ns/v1", "ns/v2"}
    # A full pass finds nothing left to do, and plans nothing anew.
    again = bed.agent.run_once("resync")
    assert again.ops == []
    assert (bed.agent.memory.plans.hits, bed.agent.memory.plans.misses) == (3, 0)


def test_other_changes_take_the_full_pass() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    # A VirtualServer changed, with or without endpoints.
    bed.virtual_servers.put(virtual_server("v0", "s0", "192.0.2.1", scheduler={"name": "rr"}))
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.7"))
    bed.agent.run_once("change")
    assert bed.passes("change") == 0
    # The node changed (its labels choose the VirtualServers it directs).
    bed.node.put({"metadata": {"name": "n1", "labels": {"edge": "yes"}}})
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.8"))
    bed.agent.run_once("change")
    assert bed.passes("change") == 0
    # The Node object changed in what the agent reads, even if not in its labels (a Node
    # deleted and created again: the report names its uid).
    bed.node.put({"metadata": {"name": "n1", "labels": {"edge": "yes"}, "uid": "2"}})
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.11"))
    bed.agent.run_once("change")
    assert bed.passes("change") == 0
    # The slices were relisted: which changed is not known.
    bed.slices.relist()
    bed.agent.run_once("change")
    assert bed.passes("change") == 0
    # The resync and the drain checks look at the whole table whatever changed.
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.9"))
    bed.agent.run_once("resync")
    assert bed.passes("change") == 0
    assert bed.passes("full") == 6
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.10"))
    bed.agent.run_once("change")
    assert bed.passes("change") == 1


def test_a_drain_check_reads_and_writes_only_the_services_with_real_servers_draining() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    key = next(k for k in bed.kernel.dump() if k.address == "192.0.2.2")
    dest = next(iter(bed.kernel.dump()[key].dests))
    stats = bed.kernel.dump()[key].dests[dest].stats
    bed.kernel.set_dest_stats(key, dest, replace(stats, active_connections=2))
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.7"))
    bed.agent.run_once("change")
    assert set(bed.agent.memory.draining) == {(key, dest)}, "the old real server drains"
    dumps, reads = bed.kernel.dumps, bed.kernel.reads
    assert bed.agent.run_once("drain").ops == []
    assert (bed.kernel.dumps, bed.kernel.reads) == (dumps, reads + 1), "that service read"
    assert bed.real_servers("192.0.2.2") == {"203.0.113.7", str(dest.address)}, "connections"
    bed.kernel.set_dest_stats(key, dest, stats)  # the last connection ended
    dumps = bed.kernel.dumps
    result = bed.agent.run_once("drain")
    assert bed.kernel.dumps == dumps
    assert [op.kind for op in result.ops] == [OpKind.DEL_DEST]
    assert bed.real_servers("192.0.2.2") == {"203.0.113.7"}
    assert not bed.agent.memory.draining
    assert (bed.passes("full"), bed.passes("change")) == (1, 3)


def test_a_service_someone_removed_is_put_back_by_the_full_pass() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    key = next(k for k in bed.kernel.dump() if k.address == "192.0.2.2")
    service = bed.kernel.dump()[key].service
    from ipvs_agent.ops import Op

    assert bed.kernel.apply([Op(OpKind.DEL_SERVICE, service)])[0].ok
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.7"))
    bed.agent.run_once("change")
    assert bed.passes("change") == 0 and bed.passes("full") == 2
    assert bed.real_servers("192.0.2.2") == {"203.0.113.7"}


def test_a_pass_that_failed_leaves_the_next_one_full() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    bed.virtual_servers.put(virtual_server("v0", "s0", "192.0.2.1", scheduler={"name": "rr"}))
    real_dump = bed.kernel.dump

    def broken(expected: Any = None) -> Any:
        raise OSError("netlink went away")

    bed.kernel.dump = broken  # type: ignore[method-assign]
    try:
        bed.agent.run_once("change")
        raise AssertionError("the pass should have failed")
    except OSError:
        pass
    bed.kernel.dump = real_dump  # type: ignore[method-assign]
    # The VirtualServer change was taken from the journal by the failed pass; a change pass
    # now would never apply it.
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.7"))
    bed.agent.run_once("change")
    assert bed.passes("change") == 0
    assert next(s.service.scheduler for k, s in bed.kernel.dump().items()
                if k.address == "192.0.2.1") == "rr"  # fmt: skip


def test_a_change_the_interest_filter_missed_takes_the_full_pass() -> None:
    bed = Bed()
    interest = cluster.Interest(service_of)
    bed.slices.interest = interest  # type: ignore[attr-defined]
    bed.agent.run_once("change")
    # s9 is used by no VirtualServer: its event woke nothing and is in no journal ...
    assert not interest.wants(endpoint_slice("s9-1", "s9", "203.0.113.1"))
    bed.slices._items.append(endpoint_slice("s9-1", "s9", "203.0.113.1"))
    # ... until a VirtualServer uses it: the pass that starts using it may have read the slices
    # before the event, so the journal is marked unknown and the next pass is full.
    bed.virtual_servers.put(virtual_server("v9", "s9", "192.0.2.99"))
    bed.agent.run_once("change")
    assert bed.agent.changed.is_set()
    assert bed.slices.changes.take() is None


def test_a_relist_marks_everything_changed_and_a_take_starts_anew() -> None:
    """``cluster.Mirror`` itself: after a list, which objects changed is not known."""
    page = {"metadata": {"resourceVersion": "5"}, "items": [endpoint_slice("a-1", "a", "10.0.0.1")]}
    api: Any = None  # lists are plain dicts: the client is never asked to convert one
    mirror = cluster.Mirror(
        "endpointslices", lambda **_: page, api, CountingEvent(), changes=service_of
    )
    mirror.changes.take()
    mirror._relist()
    assert mirror.changes.take() is None
    assert mirror.changes.take() == frozenset()
    mirror.changes.note(endpoint_slice("a-1", "a", "10.0.0.2"), None)
    assert mirror.changes.take() == frozenset({("ns", "a")})


def test_the_slice_mirror_finds_a_services_slices_without_reading_them_all() -> None:
    """``Mirror.items_of`` follows lists, updates that move a slice to another Service (its
    label), and deletions, exactly as a filter over every object would."""
    pages = [[endpoint_slice("a-1", "a", "10.0.0.1"), endpoint_slice("b-1", "b", "10.0.1.1")]]
    api: Any = None
    mirror = cluster.Mirror(
        "endpointslices",
        lambda **_: {"metadata": {"resourceVersion": "1"}, "items": pages[-1]},
        api,
        CountingEvent(),
        changes=service_of,
    )
    mirror._relist()

    def names(*services: tuple[str, str]) -> set[str]:
        found = {o["metadata"]["name"] for o in mirror.items_of(set(services))}
        brute = {o["metadata"]["name"] for o in mirror.items() if service_of(o) in services}
        assert found == brute
        return found

    assert names(("ns", "a")) == {"a-1"}
    with mirror._lock:  # what a watch event does under the lock
        moved = endpoint_slice("a-1", "b", "10.0.0.1")
        before = mirror._items["ns/a-1"]
        mirror._items["ns/a-1"] = moved
        mirror._group("ns/a-1", before, moved)
    assert names(("ns", "a")) == set()
    assert names(("ns", "b")) == {"a-1", "b-1"}
    with mirror._lock:
        mirror._group("ns/b-1", mirror._items.pop("ns/b-1"), None)
    assert names(("ns", "b"), ("ns", "c")) == {"a-1"}
    pages.append([endpoint_slice("c-1", "c", "10.0.2.1")])
    mirror._relist()
    assert names(("ns", "a"), ("ns", "b")) == set()
    assert names(("ns", "c")) == {"c-1"}


def test_a_stream_of_change_passes_does_not_hold_back_the_resync() -> None:
    """Every pass used to start the resync period again, and a pending change used to win
    over a due resync: right while every pass read the whole table. A change pass reads a
    few services, so endpoint changes that keep coming must not postpone the search for
    drift. Here the next change arrives during every pass (from its report)."""
    bed = Bed()
    bed.agent.settings = Settings("n1", resync_seconds=0.3, settle_seconds=0, admitted_only=False)
    count = itertools.count(1)

    def next_change(status: Any, uid: str) -> None:
        n = next(count)
        bed.slices.put(endpoint_slice("s1-1", "s1", f"203.0.113.{n % 250 + 1}"))
        bed.agent.changed.set()

    bed.agent.report = next_change
    stop = threading.Event()
    thread = threading.Thread(target=bed.agent.run, args=(stop,), daemon=True)
    thread.start()
    bed.agent.changed.set()
    try:
        deadline = time.monotonic() + 20
        while bed.passes("full") < 3 and time.monotonic() < deadline:
            stop.wait(0.05)  # poll interval
        assert bed.passes("full") >= 3, "resyncs ran while changes kept coming"
        assert bed.passes("change") >= 5
        drift = bed.agent.metrics.registry.get_sample_value("ipvs_agent_drift_repairs_total")
        assert drift == 0, "the changes a resync applied are not drift"
    finally:
        stop.set()
        bed.agent.changed.set()
        thread.join(10)


def test_a_change_pass_leaves_the_sync_daemons_alone() -> None:
    """Looking at the connection sync daemons reads the state file (a record of every owned
    service): a full pass does it, a change pass — whose endpoints never change them — not."""
    bed = Bed()
    looked: list[object] = []
    sync: Any = SimpleNamespace(settings=None, ensure=looked.append, status=dict)
    bed.agent.sync = sync
    bed.agent.run_once("change")
    assert len(looked) == 1
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.7"))
    bed.agent.run_once("change")
    assert bed.passes("change") == 1 and len(looked) == 1
    bed.agent.run_once("resync")
    assert len(looked) == 2
