"""The address allocator, without a cluster: every rule of docs/operator.md "Addresses"."""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ipvs_api import conditions
from ipvs_api.types import AddressPool, AddressRange, IPFamily, LabelSelector
from ipvs_operator.allocator import Allocator, Claim

V4, V6 = IPFamily.IPV4, IPFamily.IPV6


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def pool(
    name: str,
    *ranges: str,
    auto: bool = True,
    namespaces: frozenset[str] = frozenset(),
    selector: LabelSelector | None = None,
) -> AddressPool:
    parsed = []
    for r in ranges:
        first, _, last = r.partition("-")
        parsed.append(AddressRange(ip(first), ip(last or first)))
    return AddressPool(name, tuple(parsed), auto, namespaces, selector)


def claim(
    name: str,
    *,
    ns: str = "shop",
    created: str = "2026-01-01T00:00:00Z",
    family: IPFamily = V4,
    ports: tuple[tuple[str, int], ...] = (("TCP", 80),),
    key: str | None = None,
    requested: str | None = None,
    pool_name: str | None = None,
    labels: dict[str, str] | None = None,
) -> Claim:
    return Claim(
        key=f"{ns}/{name}",
        namespace=ns,
        age=(created, ns, name),
        family=family,
        ports=frozenset(ports),
        sharing_key=key,
        requested=ip(requested) if requested else None,
        pool=pool_name,
        namespace_labels=labels or {},
    )


def allocator(*pools: AddressPool, unusable: dict[str, str] | None = None) -> Allocator:
    a = Allocator()
    a.set_pools(pools, unusable or {})
    return a


def test_allocates_in_order_and_keeps_what_it_gave() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.2"))
    first = a.ensure(claim("a"))
    assert (first.reason, str(first.address), first.pool) == (
        conditions.ALLOCATED,
        "192.0.2.0",
        "p",
    )
    assert str(a.ensure(claim("b")).address) == "192.0.2.1"
    # Reconciling again changes nothing: a holder keeps its address.
    assert str(a.ensure(claim("a")).address) == "192.0.2.0"
    assert a.allocated_in("p") == 2


def test_exhausted_pool_fails_until_an_address_is_released() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.1"))
    a.ensure(claim("a"))
    a.ensure(claim("b"))
    out = a.ensure(claim("c"))
    assert not out.ok and out.reason == conditions.POOL_EXHAUSTED
    assert "AddressPool p" in out.message
    a.release("shop/a")
    assert str(a.ensure(claim("c")).address) == "192.0.2.0"  # the freed one, found again


def test_requested_address_in_a_pool_is_honoured_even_without_auto_assign() -> None:
    a = allocator(pool("manual", "192.0.2.10-192.0.2.20", auto=False))
    out = a.ensure(claim("a", requested="192.0.2.15"))
    assert (str(out.address), out.pool) == ("192.0.2.15", "manual")
    # ... but nothing is allocated from it automatically.
    assert a.ensure(claim("b")).reason == conditions.POOL_NOT_FOUND


def test_requested_address_outside_every_pool_is_refused() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    out = a.ensure(claim("a", requested="198.51.100.1"))
    assert out.reason == conditions.ADDRESS_NOT_IN_POOL and out.address is None
    out = a.ensure(claim("b", requested="192.0.2.1", pool_name="p"))
    assert out.ok
    a.set_pools([pool("p", "192.0.2.0-192.0.2.9"), pool("q", "198.51.100.0-198.51.100.9")], {})
    out = a.ensure(claim("c", requested="192.0.2.2", pool_name="q"))
    assert out.reason == conditions.ADDRESS_NOT_IN_POOL and "AddressPool q" in out.message


def test_named_pool_must_exist_be_ready_and_admit_the_namespace() -> None:
    a = allocator(
        pool("team", "192.0.2.0-192.0.2.9", namespaces=frozenset({"team"})),
        unusable={"broken": "range 192.0.2.9-192.0.2.1 starts after it ends"},
    )
    assert "does not exist" in a.ensure(claim("a", pool_name="nope")).message
    assert "not ready" in a.ensure(claim("a", pool_name="broken")).message
    assert "does not admit" in a.ensure(claim("a", pool_name="team")).message
    assert a.ensure(claim("a", ns="team", pool_name="team")).ok


def test_namespace_selector_admits_by_label() -> None:
    selector = LabelSelector(match_labels=(("lb", "ipvs"),))
    a = allocator(pool("p", "192.0.2.0-192.0.2.9", selector=selector))
    assert a.ensure(claim("a")).reason == conditions.POOL_NOT_FOUND
    assert a.ensure(claim("a", labels={"lb": "ipvs"})).ok


def test_families_come_from_their_own_ranges() -> None:
    a = allocator(pool("dual", "192.0.2.0-192.0.2.3", "2001:db8::10-2001:db8::1f"))
    assert str(a.ensure(claim("a", family=V6)).address) == "2001:db8::10"
    assert str(a.ensure(claim("a-v4", family=V4)).address) == "192.0.2.0"
    only4 = allocator(pool("p", "192.0.2.0-192.0.2.3"))
    out = only4.ensure(claim("a", family=V6))
    assert out.reason == conditions.POOL_NOT_FOUND and "IPv6" in out.message


def test_sharing_key_shares_an_address_on_different_ports() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    web = a.ensure(claim("web", key="k", ports=(("TCP", 80),)))
    dns = a.ensure(claim("dns", key="k", ports=(("UDP", 53),)))
    assert web.address == dns.address
    assert a.allocated_in("p") == 1
    # Same key but the same port: a different address, not a conflict.
    other = a.ensure(claim("web2", key="k", ports=(("TCP", 80),)))
    assert other.ok and other.address != web.address
    # Another namespace never joins, even with the same key.
    far = a.ensure(claim("web3", ns="other", key="k", ports=(("TCP", 8080),)))
    assert far.address != web.address


def test_an_edit_that_ends_sharing_moves_the_edited_object_not_its_partners() -> None:
    """The older object drops its key while a younger one shares its live address: the
    younger did nothing and keeps the address; the older moves (hypothesis found the old rule
    evicting the younger by age)."""
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    old = claim("old", key="k", ports=(("TCP", 80),), created="2026-01-01T00:00:00Z")
    young = claim("young", key="k", ports=(("UDP", 53),), created="2026-01-02T00:00:00Z")
    shared = a.ensure(old).address
    assert shared is not None and a.ensure(young).address == shared
    a.published("shop/old", shared)
    a.published("shop/young", shared)
    moved = a.ensure(replace(old, sharing_key=None))
    assert moved.ok and moved.address != shared and moved.evicted == ()
    held = a.holding("shop/young")
    assert held is not None and held.address == shared
    # Asking for the shared address by name now is a conflict naming the partner.
    asked = a.ensure(replace(old, sharing_key=None, requested=shared))
    assert asked.reason == conditions.ADDRESS_CONFLICT
    assert "VirtualServer shop/young" in asked.message


def test_requesting_a_shared_address_needs_the_key_and_free_ports() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    a.ensure(claim("web", key="k", requested="192.0.2.5", created="2026-01-01T00:00:00Z"))
    ok = a.ensure(
        claim(
            "dns",
            key="k",
            ports=(("UDP", 53),),
            requested="192.0.2.5",
            created="2026-01-02T00:00:00Z",
        )
    )
    assert ok.ok
    clash = a.ensure(claim("api", key="k", requested="192.0.2.5", created="2026-01-03T00:00:00Z"))
    assert clash.reason == conditions.ADDRESS_CONFLICT
    assert "port 80/TCP is already used by VirtualServer shop/web" in clash.message
    nokey = a.ensure(
        claim("x", ports=(("TCP", 81),), requested="192.0.2.5", created="2026-01-03T00:00:00Z")
    )
    assert nokey.reason == conditions.ADDRESS_CONFLICT and "sharingKey" in nokey.message


def test_a_live_holder_keeps_its_address_against_an_older_claimant() -> None:
    old = claim("old", requested="192.0.2.5", created="2026-01-01T00:00:00Z")
    new = claim("new", requested="192.0.2.5", created="2026-02-01T00:00:00Z")
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    assert a.ensure(new).ok
    a.published("shop/new", ip("192.0.2.5"))  # its status shows it: the agents may serve it
    lost = a.ensure(old)
    assert lost.reason == conditions.ADDRESS_CONFLICT and lost.address is None
    assert "port 80/TCP is already used by VirtualServer shop/new" in lost.message
    assert a.ensure(new).ok  # and it stays with its holder
    # A holder whose status already showed the address when it was read is live as well.
    b = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    assert b.ensure(replace(new, current=ip("192.0.2.5"))).ok
    assert b.ensure(old).reason == conditions.ADDRESS_CONFLICT


def test_simultaneous_first_claims_go_to_the_older_object_whatever_the_order() -> None:
    """Before either status shows the address, age decides, as the agents would."""
    old = claim("old", requested="192.0.2.5", created="2026-01-01T00:00:00Z")
    new = claim("new", requested="192.0.2.5", created="2026-02-01T00:00:00Z")
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    assert a.ensure(new).ok  # alone, the newer one gets it ...
    took = a.ensure(old)  # ... but it was never published, so the older one takes it
    assert took.ok and took.evicted == ("shop/new",)
    lost = a.ensure(new)
    assert lost.reason == conditions.ADDRESS_CONFLICT and "shop/old" in lost.message
    b = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    assert b.ensure(old).ok
    assert b.ensure(new).reason == conditions.ADDRESS_CONFLICT


def test_a_conflict_names_the_holder_only_inside_its_namespace() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    holder = claim("web", ns="tenant-a", requested="192.0.2.5", created="2026-02-01T00:00:00Z")
    assert a.ensure(holder).ok
    a.published("tenant-a/web", ip("192.0.2.5"))
    far = a.ensure(claim("x", ns="tenant-b", requested="192.0.2.5"))
    assert far.message == "192.0.2.5 port 80/TCP is in use by an object in another namespace"
    unshared = a.ensure(claim("y", ns="tenant-b", ports=(("TCP", 81),), requested="192.0.2.5"))
    assert "tenant-a" not in unshared.message and "web" not in unshared.message
    assert "another namespace" in unshared.message
    near = a.ensure(claim("z", ns="tenant-a", requested="192.0.2.5"))
    assert "VirtualServer tenant-a/web" in near.message


def test_an_unpublished_automatic_holder_moves_a_live_one_stays() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    auto = claim("auto", created="2026-02-01T00:00:00Z")
    assert str(a.ensure(auto).address) == "192.0.2.0"
    asked = a.ensure(claim("asked", requested="192.0.2.0", created="2026-01-01T00:00:00Z"))
    assert asked.evicted == ("shop/auto",)
    assert str(a.ensure(auto).address) == "192.0.2.1"
    a.published("shop/auto", ip("192.0.2.1"))
    again = a.ensure(claim("late", requested="192.0.2.1", created="2025-01-01T00:00:00Z"))
    assert again.reason == conditions.ADDRESS_CONFLICT
    assert str(a.ensure(auto).address) == "192.0.2.1"


def test_changing_the_requested_address_releases_the_old_one() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    a.ensure(claim("a", requested="192.0.2.3"))
    a.ensure(claim("a", requested="192.0.2.4"))
    assert [str(h.address) for h in a.holdings()] == ["192.0.2.4"]


def test_an_address_no_longer_in_a_pool_is_replaced() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    assert str(a.ensure(claim("a")).address) == "192.0.2.0"
    a.set_pools([pool("p", "192.0.2.5-192.0.2.9")], {})
    assert str(a.ensure(claim("a")).address) == "192.0.2.5"
    # Moving to a named pool moves the address too.
    a.set_pools([pool("p", "192.0.2.5-192.0.2.9"), pool("q", "198.51.100.0-198.51.100.9")], {})
    assert str(a.ensure(claim("a", pool_name="q")).address) == "198.51.100.0"


def test_restore_rebuilds_the_table_and_settles_duplicates_by_age() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    younger = claim("younger", created="2026-02-01T00:00:00Z")
    older = claim("older", created="2026-01-01T00:00:00Z")
    dropped = a.restore([(younger, ip("192.0.2.4"), "p"), (older, ip("192.0.2.4"), "p")])
    assert dropped == ["shop/younger"]
    # Restored holders keep their addresses; new claims get others.
    assert str(a.ensure(older).address) == "192.0.2.4"
    assert str(a.ensure(claim("fresh")).address) == "192.0.2.0"
    assert str(a.ensure(younger).address) == "192.0.2.1"


def test_large_ipv6_pool_allocates_quickly_and_saturates_nothing() -> None:
    a = allocator(pool("big", "2001:db8::-2001:db8::ffff:ffff:ffff:ffff"))
    got = {a.ensure(claim(f"s{i}", family=V6)).address for i in range(2000)}
    assert len(got) == 2000


def test_holders_reconciled_again_do_not_make_the_search_for_a_free_address_start_over() -> None:
    """In a burst every holder is reconciled again (its own status write comes back as an
    event) between new allocations; keeping its address must not rewind the search for a free
    one, or n allocations look at n²/2 addresses."""
    looked: list[object] = []

    class Counting(dict[Any, Any]):
        def __contains__(self, key: object) -> bool:
            looked.append(key)
            return super().__contains__(key)

    a = allocator(pool("p", "10.0.0.0-10.0.255.255"))
    a._by_address = Counting()
    for i in range(300):
        assert a.ensure(claim(f"s{i}")).ok
        assert str(a.ensure(claim("s0")).address) == "10.0.0.0"  # the oldest holder again
    assert len({a.holding(f"shop/s{i}").address for i in range(300)}) == 300  # type: ignore[union-attr]
    assert len(looked) < 2 * 300


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 11),  # object
            st.sampled_from(["ensure", "release", "request", "publish"]),
            st.integers(0, 5),  # requested address offset
            st.sampled_from([None, "k"]),
            st.integers(1, 3),  # port
        ),
        max_size=60,
    )
)
def test_no_address_is_ever_held_twice_on_one_port(
    ops: list[tuple[int, str, int, str | None, int]],
) -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.5"))
    for obj, op, offset, key, port in ops:
        name = f"o{obj}"
        if op == "release":
            a.release(f"shop/{name}")
            continue
        if op == "publish":
            held = a.holding(f"shop/{name}")
            if held is not None:
                a.published(held.claim.key, held.address)
            continue
        requested = f"192.0.2.{offset}" if op == "request" else None
        live = {h.claim.key: h.address for h in a.holdings() if h.live}
        live.pop(f"shop/{name}", None)
        a.ensure(
            claim(
                name,
                created=f"2026-01-{obj + 1:02d}T00:00:00Z",
                key=key,
                ports=(("TCP", port),),
                requested=requested,
            )
        )
        after = {h.claim.key: h.address for h in a.holdings()}
        assert {k: after.get(k) for k in live} == live, "a live holder lost its address"
        seen = Counter((h.address, p) for h in a.holdings() for p in h.claim.ports)
        assert max(seen.values(), default=1) == 1
        by_address: dict[object, list[Claim]] = {}
        for h in a.holdings():
            by_address.setdefault(h.address, []).append(h.claim)
        for holders in by_address.values():
            if len(holders) > 1:
                assert len({(c.namespace, c.sharing_key) for c in holders}) == 1
                assert holders[0].sharing_key is not None
    # A rebuilt allocator keeps every holding as it was.
    b = allocator(pool("p", "192.0.2.0-192.0.2.5"))
    assert b.restore([(h.claim, h.address, h.pool) for h in a.holdings()]) == []
    assert {(h.claim.key, h.address) for h in b.holdings()} == {
        (h.claim.key, h.address) for h in a.holdings()
    }


def test_an_address_the_object_already_shows_is_kept_when_free() -> None:
    """A status written just before a restart, but missed by the rebuild, is adopted."""
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    shown = replace(claim("late", created="2026-01-01T00:00:00Z"), current=ip("192.0.2.7"))
    assert str(a.ensure(shown).address) == "192.0.2.7"
    # Live in an older object's status too: the older keeps it, as restore() would decide.
    b = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    b.ensure(claim("old", requested="192.0.2.7", created="2025-01-01T00:00:00Z"))
    b.published("shop/old", ip("192.0.2.7"))
    assert str(b.ensure(shown).address) == "192.0.2.0"
    # Only asked for by the older object, never published: the status that shows it wins.
    d = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    d.ensure(claim("old", requested="192.0.2.7", created="2025-01-01T00:00:00Z"))
    assert str(d.ensure(shown).address) == "192.0.2.7"
    assert d.ensure(claim("old", requested="192.0.2.7", created="2025-01-01T00:00:00Z")).reason == (
        conditions.ADDRESS_CONFLICT
    )
    # Outside every pool it may use: ignored.
    c = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    stray = replace(claim("stray"), current=ip("198.51.100.1"))
    assert str(c.ensure(stray).address) == "192.0.2.0"


def test_a_missing_pool_keeps_its_addresses_with_their_holders() -> None:
    """Deleted and applied again (a GitOps prune): the same addresses, never released."""
    p = pool("p", "192.0.2.0-192.0.2.9")
    a = allocator(p)
    auto, asked = claim("auto"), claim("asked", requested="192.0.2.5")
    assert str(a.ensure(auto).address) == "192.0.2.0"
    assert a.ensure(asked).ok
    a.set_pools([], {})
    for c, address in ((auto, "192.0.2.0"), (asked, "192.0.2.5")):
        out = a.ensure(c)
        assert (out.ok, out.reason, str(out.address), out.pool) == (
            True,
            conditions.ADDRESS_RETAINED,
            address,
            "p",
        )
        assert (
            out.message == f"AddressPool p does not exist: keeping {address} until it exists again"
        )
    assert a.ensure(claim("new")).reason == conditions.POOL_NOT_FOUND  # nothing new from it
    a.set_pools([p], {})
    assert (a.ensure(auto).reason, str(a.ensure(auto).address)) == (
        conditions.ALLOCATED,
        "192.0.2.0",
    )
    assert str(a.ensure(asked).address) == "192.0.2.5"
    assert str(a.ensure(claim("new")).address) == "192.0.2.1"


def test_a_pool_that_is_not_ready_hands_out_nothing_but_takes_nothing_back() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    named = claim("named", pool_name="p")
    assert str(a.ensure(named).address) == "192.0.2.0"
    a.published("shop/named", ip("192.0.2.0"))
    a.set_pools([], {"p": "192.0.2.0-192.0.2.9 overlaps 192.0.2.8/29 of AddressPool q"})
    kept = a.ensure(named)
    assert (kept.reason, str(kept.address)) == (conditions.ADDRESS_RETAINED, "192.0.2.0")
    assert kept.message == (
        "AddressPool p is not ready (192.0.2.0-192.0.2.9 overlaps 192.0.2.8/29 of AddressPool q): "
        "keeping 192.0.2.0 until it is ready"
    )
    assert a.allocated_in("p") == 1
    other = a.ensure(claim("other", pool_name="p"))
    assert other.reason == conditions.POOL_NOT_FOUND and "not ready" in other.message
    # Nobody else gets the kept address meanwhile, even from a pool that has it.
    a.set_pools([pool("q", "192.0.2.0-192.0.2.1")], {"p": "overlap"})
    assert a.ensure(claim("grab", requested="192.0.2.0")).reason == conditions.ADDRESS_CONFLICT
    assert str(a.ensure(claim("auto")).address) == "192.0.2.1"


def test_a_deliberate_edit_or_another_pool_takes_the_address_away() -> None:
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    held = claim("held")
    assert str(a.ensure(held).address) == "192.0.2.0"
    a.set_pools([pool("p", "192.0.2.5-192.0.2.9")], {})  # p still usable, without 192.0.2.0
    assert (a.ensure(held).reason, str(a.ensure(held).address)) == (
        conditions.ALLOCATED,
        "192.0.2.5",
    )
    # Asking for another pool while the old one is gone moves the address, too.
    a.set_pools([pool("q", "198.51.100.0-198.51.100.9")], {})
    moved = a.ensure(replace(held, pool="q"))
    assert (moved.reason, str(moved.address)) == (conditions.ALLOCATED, "198.51.100.0")


def test_after_a_restart_a_missing_pool_still_keeps_what_status_shows() -> None:
    a = allocator()
    shown = replace(claim("web"), current=ip("192.0.2.7"), current_pool="p")
    assert a.restore([(shown, ip("192.0.2.7"), "p")]) == []
    out = a.ensure(shown)
    assert (out.reason, str(out.address), out.pool) == (
        conditions.ADDRESS_RETAINED,
        "192.0.2.7",
        "p",
    )
    # Missed by the rebuild, shown in status all the same: kept too.
    b = allocator()
    assert b.ensure(shown).reason == conditions.ADDRESS_RETAINED


def test_the_address_a_status_shows_beats_one_never_published() -> None:
    """A write refused (409) because a previous leader wrote another address meanwhile: the
    retry keeps the address that is in use, not the one this replica failed to publish."""
    a = allocator(pool("p", "192.0.2.0-192.0.2.9"))
    web = claim("web")
    assert str(a.ensure(web).address) == "192.0.2.0"  # computed from a stale view, not written
    shown = replace(web, current=ip("192.0.2.3"), current_pool="p")
    assert str(a.ensure(shown).address) == "192.0.2.3"
    assert [str(h.address) for h in a.holdings()] == ["192.0.2.3"]
