"""The fewest kernel operations, graceful drain, and never a foreign entry touched."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs_agent.diff import diff
from ipvs_agent.model import (
    DesiredService,
    Dest,
    DestKey,
    DestStats,
    ForwardingMethod,
    ObservedDest,
    ObservedService,
    Protocol,
    Service,
    ServiceFlag,
    ServiceKey,
)
from ipvs_agent.ops import OpKind
from tests.unit.agent_helpers import apply_ops, observed_from

VIP = ipaddress.ip_address("192.0.2.1")
HTTP = ServiceKey.for_address(VIP, Protocol.TCP, 80)
DNS = ServiceKey.for_address(VIP, Protocol.UDP, 53)


def svc(key: ServiceKey = HTTP, **kw: object) -> Service:
    return Service(key, **kw)  # type: ignore[arg-type]


def dest(addr: str, weight: int = 1, port: int = 80) -> Dest:
    return Dest(DestKey(addr, port), ForwardingMethod.MASQ, weight)


def table(key: ServiceKey, *dests: Dest, **kw: object) -> dict[ServiceKey, DesiredService]:
    return {key: DesiredService(svc(key, **kw), {d.key: d for d in dests})}


def everything(_: ServiceKey) -> bool:
    return True


def test_empty_kernel_gets_every_service_then_its_real_servers() -> None:
    want = table(HTTP, dest("198.51.100.11"), dest("198.51.100.12", 2))
    d = diff(want, {}, everything, {}, {}, now=0)
    assert [op.kind for op in d.ops] == [OpKind.ADD_SERVICE, OpKind.ADD_DEST, OpKind.ADD_DEST]


def test_nothing_changed_means_no_operation() -> None:
    want = table(HTTP, dest("198.51.100.11"), scheduler="mh", flags=ServiceFlag.SCHED1)
    have = observed_from(want)
    # The kernel adds its own HASHED bit; that is no reason to edit.
    have[HTTP] = replace(
        have[HTTP],
        service=replace(have[HTTP].service, flags=ServiceFlag.SCHED1 | ServiceFlag.HASHED),
    )
    assert diff(want, have, everything, {}, {}, now=0).ops == []


def test_a_weight_change_is_one_edit() -> None:
    have = observed_from(table(HTTP, dest("198.51.100.11"), dest("198.51.100.12")))
    want = table(HTTP, dest("198.51.100.11"), dest("198.51.100.12", 5))
    (op,) = diff(want, have, everything, {}, {}, now=0).ops
    assert op.kind is OpKind.EDIT_DEST and op.dest == dest("198.51.100.12", 5)


def test_a_scheduler_change_edits_the_service_in_place() -> None:
    have = observed_from(table(HTTP, dest("198.51.100.11"), scheduler="rr"))
    want = table(HTTP, dest("198.51.100.11"), scheduler="wrr")
    (op,) = diff(want, have, everything, {}, {}, now=0).ops
    assert op.kind is OpKind.EDIT_SERVICE and op.service.scheduler == "wrr"


def _with_conns(
    have: dict[ServiceKey, ObservedService], key: ServiceKey, addr: str, active: int
) -> None:
    dk = next(k for k in have[key].dests if k.address == addr)
    dests = dict(have[key].dests)
    dests[dk] = ObservedDest(dests[dk].dest, DestStats(active_connections=active))
    have[key] = replace(have[key], dests=dests)


def test_a_removed_tcp_real_server_drains_then_goes() -> None:
    want = table(HTTP, dest("198.51.100.11"))
    have = observed_from(table(HTTP, dest("198.51.100.11"), dest("198.51.100.12")))
    _with_conns(have, HTTP, "198.51.100.12", active=3)
    drain = {HTTP: 60}

    first = diff(want, have, everything, drain, {}, now=100)
    (op,) = first.ops
    assert op.kind is OpKind.EDIT_DEST and op.dest is not None and op.dest.weight == 0
    have = apply_ops(have, first.ops)
    _with_conns(have, HTTP, "198.51.100.12", active=3)

    waiting = diff(want, have, everything, drain, first.draining, now=130)
    assert waiting.ops == [], "connections still open and time left: wait"
    assert waiting.draining == first.draining

    late = diff(want, have, everything, drain, waiting.draining, now=160)
    assert [op.kind for op in late.ops] == [OpKind.DEL_DEST]
    assert late.draining == {}


def test_a_drained_real_server_goes_as_soon_as_its_connections_end() -> None:
    want = table(HTTP, dest("198.51.100.11"))
    have = observed_from(table(HTTP, dest("198.51.100.11"), dest("198.51.100.12", 0)))
    d = diff(
        want, have, everything, {HTTP: 600}, {(HTTP, DestKey("198.51.100.12", 80)): 1.0}, now=2
    )
    assert [op.kind for op in d.ops] == [OpKind.DEL_DEST]


def test_a_removed_udp_real_server_goes_at_once() -> None:
    want = table(DNS, dest("198.51.100.11", port=53))
    have = observed_from(table(DNS, dest("198.51.100.11", port=53), dest("198.51.100.12", port=53)))
    _with_conns(have, DNS, "198.51.100.12", active=9)
    (op,) = diff(want, have, everything, {DNS: 0}, {}, now=0).ops
    assert op.kind is OpKind.DEL_DEST


def test_a_real_server_that_returns_while_draining_gets_its_weight_back() -> None:
    want = table(HTTP, dest("198.51.100.11"), dest("198.51.100.12"))
    have = observed_from(table(HTTP, dest("198.51.100.11"), dest("198.51.100.12", 0)))
    d = diff(
        want, have, everything, {HTTP: 60}, {(HTTP, DestKey("198.51.100.12", 80)): 5.0}, now=10
    )
    (op,) = d.ops
    assert op.kind is OpKind.EDIT_DEST and op.dest is not None and op.dest.weight == 1
    assert d.draining == {}


def test_foreign_services_are_never_touched() -> None:
    foreign_key = ServiceKey.for_address(ipaddress.ip_address("203.0.113.7"), Protocol.TCP, 22)
    have = observed_from(
        {**table(foreign_key, dest("198.51.100.99", port=22)), **table(HTTP, dest("198.51.100.11"))}
    )

    def ours(k: ServiceKey) -> bool:
        return k == HTTP

    ops = diff({}, have, ours, {}, {}, now=0).ops
    assert [(op.kind, op.service.key) for op in ops] == [(OpKind.DEL_SERVICE, HTTP)]


def test_a_desired_service_held_by_a_foreign_program_is_a_conflict() -> None:
    have = observed_from(table(HTTP, dest("198.51.100.99")))
    want = table(HTTP, dest("198.51.100.11"))
    d = diff(want, have, lambda _: False, {}, {}, now=0)
    assert d.ops == [] and d.conflicts == {HTTP}


# Property: whatever the kernel holds, applying the diff yields exactly the desired table and a
# second diff is empty (idle real servers, so nothing waits on a drain).

addresses = st.sampled_from([f"198.51.100.{i}" for i in range(1, 7)])
dests_st = st.dictionaries(addresses, st.integers(0, 5), max_size=5)
keys_st = st.sampled_from([HTTP, DNS, ServiceKey.for_address(VIP, Protocol.TCP, 443)])
sched_st = st.sampled_from(["rr", "wrr", "wlc", "sh", "mh"])
tables_st = st.dictionaries(
    keys_st, st.tuples(sched_st, st.integers(0, 0x3F), dests_st), max_size=3
)


def build(
    spec: dict[ServiceKey, tuple[str, int, dict[str, int]]],
) -> dict[ServiceKey, DesiredService]:
    return {
        k: DesiredService(
            svc(k, scheduler=s, flags=f & ~ServiceFlag.HASHED),
            {DestKey(a, k.port): Dest(DestKey(a, k.port), weight=w) for a, w in ds.items()},
        )
        for k, (s, f, ds) in spec.items()
    }


@settings(max_examples=300, deadline=None)
@given(tables_st, tables_st)
def test_applying_the_diff_converges_in_one_step(want_spec: dict, have_spec: dict) -> None:  # type: ignore[type-arg]
    want, have = build(want_spec), observed_from(build(have_spec))
    drain = dict.fromkeys(want, 300)
    first = diff(want, have, everything, drain, {}, now=0)
    after = apply_ops(have, first.ops)
    assert diff(want, after, everything, drain, {}, now=0).ops == []
    assert {
        k: (s.service.scheduler, {dk: d.dest.weight for dk, d in s.dests.items()})
        for k, s in after.items()
    } == {
        k: (s.service.scheduler, {dk: d.weight for dk, d in s.dests.items()})
        for k, s in want.items()
    }


@settings(max_examples=300, deadline=None)
@given(tables_st, tables_st, tables_st, st.sets(keys_st))
def test_what_the_last_diff_agreed_on_changes_no_judgement(
    first_spec: dict,  # type: ignore[type-arg]
    have_spec: dict,  # type: ignore[type-arg]
    next_spec: dict,  # type: ignore[type-arg]
    kept: set[ServiceKey],
) -> None:
    """``agreed`` skips only the very mappings found equal before: with any mix of the last
    pass's objects (``kept``: desired services the plan memo handed back) and new ones, and
    the kernel's table before or after the last diff's operations, the operations are
    those of a diff without it."""
    first, have = build(first_spec), observed_from(build(have_spec))
    last = diff(first, have, everything, {}, {}, now=0)
    after = apply_ops(have, last.ops)
    fresh = build(next_spec)
    want = {k: first[k] if k in kept and k in first else v for k, v in fresh.items()}
    for kernel in (have, after, {**after, **{k: have[k] for k in have if k in kept}}):
        plain = diff(want, kernel, everything, {}, {}, now=0)
        memo = diff(want, kernel, everything, {}, {}, now=0, agreed=last.agreed)
        assert memo.ops == plain.ops
        assert memo.agreed == plain.agreed


def test_an_agreed_service_is_not_compared_again_and_a_new_reading_is() -> None:
    want = table(HTTP, dest("198.51.100.11"), dest("198.51.100.12"))
    have = observed_from(want)
    last = diff(want, have, everything, {}, {}, now=0)
    assert last.agreed == {HTTP: (want[HTTP].dests, have[HTTP].dests)}
    # The same objects: found equal without looking at a real server (none is compared).
    poisoned = {HTTP: (want[HTTP].dests, have[HTTP].dests)}
    assert diff(want, have, everything, {}, {}, now=0, agreed=poisoned).ops == []
    # A new reading of the kernel (someone changed a weight) is compared.
    changed = observed_from(table(HTTP, dest("198.51.100.11"), dest("198.51.100.12", 9)))
    (op,) = diff(want, changed, everything, {}, {}, now=0, agreed=last.agreed).ops
    assert op.kind is OpKind.EDIT_DEST and op.dest == dest("198.51.100.12")


def test_operations_come_in_key_order_whatever_the_table_order() -> None:
    https = ServiceKey.for_address(VIP, Protocol.TCP, 443)
    want = {
        **table(https, dest("198.51.100.13")),
        **table(HTTP, dest("198.51.100.11")),
        **table(DNS, dest("198.51.100.12")),
    }
    have = observed_from(table(https, dest("198.51.100.13", 4)))
    d = diff(want, have, everything, {}, {}, now=0)
    assert list(dict.fromkeys(op.service.key for op in d.ops)) == [HTTP, https, DNS]


@settings(max_examples=200, deadline=None)
@given(tables_st, tables_st)
def test_foreign_entries_survive_any_diff(want_spec: dict, foreign_spec: dict) -> None:  # type: ignore[type-arg]
    foreign = {k: v for k, v in observed_from(build(foreign_spec)).items() if k not in want_spec}
    want = build(want_spec)
    d = diff(want, foreign, lambda _: False, {}, {}, now=0)
    assert all(op.service.key not in foreign for op in d.ops)


# Hashing schedulers (sh, dh, mh) fill their tables in the kernel's list order, so every director
# keeps its list in one canonical order, whatever happened to its table before.


def order(table: dict[ServiceKey, ObservedService], key: ServiceKey = HTTP) -> list[str]:
    return [k.address for k in table[key].dests]


def test_a_real_server_that_belongs_in_the_middle_moves_only_those_before_it() -> None:
    three = [dest("198.51.100.11"), dest("198.51.100.13"), dest("198.51.100.15")]
    have = apply_ops({}, diff(table(HTTP, *three, scheduler="mh"), {}, everything, {}, {}, 0).ops)
    assert order(have) == ["198.51.100.15", "198.51.100.13", "198.51.100.11"]
    want = table(HTTP, *three, dest("198.51.100.12"), scheduler="mh")
    ops = diff(want, have, everything, {}, {}, now=0).ops
    assert [(op.kind, op.dest.key.address) for op in ops if op.dest] == [
        (OpKind.DEL_DEST, "198.51.100.15"),
        (OpKind.DEL_DEST, "198.51.100.13"),
        (OpKind.ADD_DEST, "198.51.100.12"),
        (OpKind.ADD_DEST, "198.51.100.13"),
        (OpKind.ADD_DEST, "198.51.100.15"),
    ]
    after = apply_ops(have, ops)
    assert order(after) == ["198.51.100.15", "198.51.100.13", "198.51.100.12", "198.51.100.11"]
    # One that sorts first is just added at the head; rr never reorders.
    head = table(HTTP, *three, dest("198.51.100.19"), scheduler="mh")
    assert [op.kind for op in diff(head, have, everything, {}, {}, 0).ops] == [OpKind.ADD_DEST]
    rr = table(HTTP, *three, dest("198.51.100.12"), scheduler="rr")
    have_rr = apply_ops(
        {}, diff(table(HTTP, *three, scheduler="rr"), {}, everything, {}, {}, 0).ops
    )
    assert [op.kind for op in diff(rr, have_rr, everything, {}, {}, 0).ops] == [OpKind.ADD_DEST]


def test_a_draining_real_server_out_of_order_comes_back_quiesced() -> None:
    busy = DestStats(active_connections=1)
    have = {HTTP: ObservedService(svc(HTTP, scheduler="sh"), {
        DestKey("198.51.100.11", 80): ObservedDest(dest("198.51.100.11")),
        DestKey("198.51.100.15", 80): ObservedDest(dest("198.51.100.15"), busy),
    })}  # fmt: skip
    want = table(HTTP, dest("198.51.100.11"), dest("198.51.100.13"), scheduler="sh")
    d = diff(want, have, everything, {HTTP: 300}, {}, now=0)
    after = apply_ops(have, d.ops)
    assert order(after) == ["198.51.100.15", "198.51.100.13", "198.51.100.11"]
    assert after[HTTP].dests[DestKey("198.51.100.15", 80)].dest.weight == 0
    assert d.draining == {(HTTP, DestKey("198.51.100.15", 80)): 0}


histories = st.lists(st.dictionaries(addresses, st.integers(0, 3), max_size=5), min_size=1,
                     max_size=5)  # fmt: skip


def _replay(steps: list[dict[str, int]], scheduler: str) -> dict[ServiceKey, ObservedService]:
    have: dict[ServiceKey, ObservedService] = {}
    for step in steps:
        want = build({HTTP: (scheduler, 0, step)})
        have = apply_ops(have, diff(want, have, everything, {}, {}, now=0).ops)
    return have


@settings(max_examples=300, deadline=None)
@given(histories, histories, st.sampled_from(["sh", "dh", "mh"]))
def test_directors_with_different_histories_hold_the_same_list(
    one: list[dict[str, int]], other: list[dict[str, int]], scheduler: str
) -> None:
    """Whatever each director went through (restarts count: a new agent diffs the kernel's
    list as it finds it), once both apply the same desired state their lists are equal."""
    last = other[-1]
    a, b = _replay([*one, last], scheduler), _replay(other, scheduler)
    assert order(a) == order(b) == sorted(order(a), reverse=True)
    assert diff(build({HTTP: (scheduler, 0, last)}), a, everything, {}, {}, 0).ops == []


@settings(max_examples=200, deadline=None)
@given(st.permutations([f"198.51.100.{i}" for i in range(1, 7)]), st.sampled_from(["sh", "mh"]))
def test_a_list_in_any_order_is_put_in_canonical_order(found: list[str], scheduler: str) -> None:
    """A table the agent finds after a restart or from an older agent, in any order."""
    have = {HTTP: ObservedService(
        svc(HTTP, scheduler=scheduler), {DestKey(a, 80): ObservedDest(dest(a)) for a in found}
    )}  # fmt: skip
    want = build({HTTP: (scheduler, 0, dict.fromkeys(found, 1))})
    after = apply_ops(have, diff(want, have, everything, {}, {}, 0).ops)
    assert order(after) == sorted(found, reverse=True)
