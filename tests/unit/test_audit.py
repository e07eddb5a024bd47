"""The drift auditor (``ipvs_agent.audit``): it finds exactly what a full pass would change,
judges a reading only where no pass wrote meanwhile, and in the loop it takes the periodic
resync, so endpoint changes go on while it reads and drift still gets repaired."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from ipvs_agent.agent import Agent, Settings
from ipvs_agent.audit import Auditor, Expected, HostReading, host_drift
from ipvs_agent.host.nftables import LiveTable, Ruleset
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.model import DesiredTable, ObservedTable, ServiceKey
from ipvs_agent.ops import Op, OpKind
from tests.unit.agent_helpers import CountingEvent, FakeHost
from tests.unit.test_change_pass import Bed, virtual_server
from tests.unit.test_interest import endpoint_slice


def key_of(kernel: FakeKernel, vip: str) -> ServiceKey:
    return next(k for k in kernel.dump() if k.address == vip)


def behind_the_agents_back(kernel: FakeKernel, *ops: Op) -> None:
    assert all(r.ok for r in kernel.apply(list(ops)))


def audit(bed: Bed, expected: Expected | None = None) -> Any:
    agent = bed.agent
    assert agent.expected is not None
    return Auditor(bed.kernel, None).audit(expected or agent.expected, agent.written_since)


def test_a_table_as_the_last_pass_left_it_audits_clean_with_one_dump_and_no_write() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    dumps = bed.kernel.dumps
    finding = audit(bed)
    assert not finding and finding.ops == () and finding.host == ()
    assert bed.kernel.dumps == dumps + 1


def test_drift_is_what_the_next_full_pass_repairs() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    gone = bed.kernel.dump()[key_of(bed.kernel, "192.0.2.1")].service
    changed = bed.kernel.dump()[key_of(bed.kernel, "192.0.2.2")]
    dest = next(iter(changed.dests.values())).dest
    behind_the_agents_back(
        bed.kernel,
        Op(OpKind.DEL_SERVICE, gone),
        Op(OpKind.EDIT_DEST, changed.service, replace(dest, weight=7)),
    )
    finding = audit(bed)
    assert finding
    repaired = bed.agent.run_once("resync")
    assert set(finding.ops) == set(repaired.ops)
    assert "192.0.2.1" in finding.summary()
    assert not audit(bed), "repaired"


def test_services_the_agent_does_not_own_are_not_its_drift() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    ours = bed.kernel.dump()[key_of(bed.kernel, "192.0.2.1")].service
    foreign = replace(ours, key=replace(ours.key, address="192.0.2.200"))
    behind_the_agents_back(bed.kernel, Op(OpKind.ADD_SERVICE, foreign))
    assert not audit(bed)


def test_a_reading_is_judged_only_where_no_pass_wrote_during_it() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    expected = bed.agent.expected
    assert expected is not None
    # A change pass for s1 runs while the auditor reads: its service is left out ...
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.7"))
    bed.agent.run_once("change")
    assert bed.agent.last_kind == "change"
    finding = audit(bed, expected)
    assert not finding, "the new real server of s1 is the change pass's, not drift"
    # ... and every other service is still judged.
    service = bed.kernel.dump()[key_of(bed.kernel, "192.0.2.3")].service
    behind_the_agents_back(bed.kernel, Op(OpKind.EDIT_SERVICE, replace(service, scheduler="rr")))
    assert audit(bed, expected)
    # A full pass meanwhile makes the reading moot: that pass read everything itself.
    bed.agent.run_once("resync")
    assert audit(bed, expected) is None


def test_drain_steps_under_way_are_not_drift() -> None:
    bed = Bed()
    bed.agent.run_once("change")
    key = key_of(bed.kernel, "192.0.2.2")
    dest = next(iter(bed.kernel.dump()[key].dests))
    bed.kernel.set_dest_stats(key, dest, replace(
        bed.kernel.dump()[key].dests[dest].stats, active_connections=3))  # fmt: skip
    bed.slices.put(endpoint_slice("s1-1", "s1", "203.0.113.7"))
    bed.agent.run_once("resync")
    assert bed.agent.memory.draining, "the old real server drains"
    assert bed.agent.expected is not None
    later = replace(bed.agent.expected, drain_seconds={key: 0})  # its drain is over: a delete
    assert not audit(bed, later)


def test_host_drift_the_tables_and_the_addresses() -> None:
    vip = ipaddress.ip_address("192.0.2.1")
    ruleset = Ruleset.of(vips=[vip])
    expected = Expected(0, {}, frozenset(), {}, {}, ruleset=ruleset, addresses=frozenset({vip}))
    live = LiveTable(ruleset, "digest")

    def same(r: Ruleset, t: LiveTable | None) -> bool:
        return t is live

    assert host_drift(expected, HostReading(live, frozenset({vip})), same) == ()
    assert host_drift(expected, None, same) == (), "a host the auditor cannot read"
    assert host_drift(expected, HostReading(None, frozenset({vip})), same) == (
        "the nftables tables ipvs-operator are gone",
    )
    other = ipaddress.ip_address("198.51.100.9")
    assert host_drift(expected, HostReading(live, frozenset({other})), same) == (
        "1 virtual addresses missing, 1 addresses not the agent's on the agent's interface",
    )


class Second:
    """The auditor's own view of the fake kernel (the real one opens a second socket)."""

    def __init__(self, kernel: FakeKernel, hold: threading.Event | None = None) -> None:
        self.kernel = kernel
        self.hold = hold
        self.dumps = 0
        #: The table the last reading was handed (it lends its Dests: no third copy of each)
        self.lent: DesiredTable | None = None

    def dump(self, expected: DesiredTable | None = None) -> ObservedTable:
        self.dumps += 1
        self.lent = expected
        if self.hold is not None:
            assert self.hold.wait(10), "the test never let the reading finish"
        return self.kernel.dump(expected)

    def close(self) -> None:
        pass


def until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.01)


def looping(bed: Bed, auditor: Auditor, resync: float = 0.05) -> tuple[threading.Event, Any]:
    bed.agent.settings = replace(bed.agent.settings, resync_seconds=resync)
    bed.agent.auditor = auditor
    stop = threading.Event()
    thread = threading.Thread(target=bed.agent.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def test_in_the_loop_the_auditor_takes_the_resync_and_drift_gets_a_full_pass() -> None:
    bed = Bed()
    second = Second(bed.kernel)
    stop, thread = looping(bed, Auditor(second, None))  # type: ignore[arg-type]
    try:
        until(lambda: bed.passes("full") == 1, "the first pass")
        until(lambda: second.dumps >= 3, "three audits")
        assert bed.passes("full") == 1, "clean audits run no pass"
        assert bed.agent.expected is not None and second.lent is bed.agent.expected.table
        audits = bed.agent.metrics.registry.get_sample_value
        assert (audits("ipvs_agent_audits_total", {"result": "clean"}) or 0) >= 2
        service = bed.kernel.dump()[key_of(bed.kernel, "192.0.2.1")].service
        behind_the_agents_back(bed.kernel, Op(OpKind.DEL_SERVICE, service))
        until(lambda: "192.0.2.1" in {k.address for k in bed.kernel.dump()}, "the repair")
        assert bed.passes("full") == 2
        assert bed.agent.metrics.registry.get_sample_value("ipvs_agent_drift_repairs_total")
    finally:
        stop.set()
        thread.join(10)


def test_endpoint_changes_go_on_while_the_auditor_reads() -> None:
    bed = Bed()
    hold = threading.Event()
    second = Second(bed.kernel, hold)
    stop, thread = looping(bed, Auditor(second, None))  # type: ignore[arg-type]
    try:
        until(lambda: second.dumps == 1, "an audit that reads for as long as the test says")
        for n in range(3):  # changes applied by change passes, the reading still under way
            bed.slices.put(endpoint_slice("s1-1", "s1", f"203.0.113.{n + 1}"))
            bed.agent.changed.set()
            new = {f"203.0.113.{n + 1}"}
            until(partial(lambda new: bed.real_servers("192.0.2.2") == new, new), "the change")
        assert bed.passes("change") == 3 and second.dumps == 1, "while the reading was held"
        # Resyncs fall due meanwhile: a reading still under way takes them, until it has
        # taken three periods; then the loop runs the full pass itself (a stuck auditor
        # never hides drift).
        until(lambda: bed.passes("full") >= 2, "the loop's own full pass")
        hold.set()
        judged = bed.agent.metrics.registry.get_sample_value
        until(lambda: bool(judged("ipvs_agent_audits_total", {"result": "overtaken"})), "moot")
    finally:
        hold.set()
        stop.set()
        thread.join(10)


def test_without_an_auditor_every_resync_is_a_full_pass() -> None:
    bed = Bed()
    stop, thread = looping(bed, None)  # type: ignore[arg-type]
    try:
        until(lambda: bed.passes("full") >= 3, "full passes at each resync")
    finally:
        stop.set()
        thread.join(10)


def test_the_agent_made_from_a_plain_host_builds_its_expectation() -> None:
    """The expectation after a pass holds what the pass left: owned services, ruleset, VIPs."""
    agent = Agent(
        Settings("n1", admitted_only=False),
        FakeKernel(),
        FakeHost(),
        Bed().agent.mirrors,
        CountingEvent(),
    )
    result = agent.run_once("change")
    expected = agent.expected
    assert expected is not None and expected.generation == agent.generation == 1
    assert expected.owned == frozenset(result.plan.table)
    assert expected.ruleset is not None and expected.ruleset.owned == frozenset(result.plan.table)
    assert expected.addresses == result.plan.addresses
    _ = virtual_server  # the same builders as the change-pass tests
