"""Firewall-mark admission, without a cluster: docs/api.md "Firewall marks"."""

from __future__ import annotations

import ipaddress

from ipvs_api import conditions
from ipvs_api.types import AddressPool, AddressRange, IPFamily, MarkRange
from ipvs_operator.marks import MarkClaim, MarkTable

V4, V6 = IPFamily.IPV4, IPFamily.IPV6


def pool(
    name: str,
    *marks: tuple[int, int],
    namespaces: frozenset[str] = frozenset(),
    addresses: tuple[AddressRange, ...] = (),
) -> AddressPool:
    return AddressPool(
        name,
        addresses,
        namespaces=namespaces,
        firewall_marks=tuple(MarkRange(f, last) for f, last in marks),
    )


def claim(
    name: str,
    mark: int = 16,
    *,
    ns: str = "shop",
    created: str = "2026-01-01T00:00:00Z",
    family: IPFamily = V4,
    current: int | None = None,
    current_pool: str | None = None,
) -> MarkClaim:
    return MarkClaim(
        key=f"{ns}/{name}",
        namespace=ns,
        age=(created, ns, name),
        family=family,
        mark=mark,
        current=current,
        current_pool=current_pool,
    )


def table(*pools: AddressPool) -> MarkTable:
    t = MarkTable()
    t.set_pools(pools, {})
    return t


def test_a_mark_no_pool_grants_is_not_admitted() -> None:
    t = table(pool("marks", (100, 199)))
    out = t.ensure(claim("a", 16))
    assert (out.ok, out.reason) == (False, conditions.FIREWALL_MARK_NOT_ADMITTED)
    assert out.message == "no AddressPool grants firewall mark 16 (0x10) to namespace shop"
    assert t.holding("shop/a") is None


def test_a_granted_mark_is_admitted_naming_the_pool() -> None:
    t = table(pool("marks", (16, 16), (100, 199)))
    out = t.ensure(claim("a", 16))
    assert (out.ok, out.reason, out.mark, out.pool) == (
        True,
        conditions.FIREWALL_MARK_ADMITTED,
        16,
        "marks",
    )
    assert out.message == "firewall mark 16 (0x10) granted by AddressPool marks"
    assert t.ensure(claim("b", 150)).ok
    assert t.in_use("marks") == 2


def test_only_pools_that_admit_the_namespace_grant() -> None:
    t = table(pool("team", (16, 16), namespaces=frozenset({"team"})))
    assert t.ensure(claim("a", ns="shop")).reason == conditions.FIREWALL_MARK_NOT_ADMITTED
    assert t.ensure(claim("a", ns="team")).ok


def test_one_holder_per_family_and_mark() -> None:
    t = table(pool("marks", (16, 16)))
    assert t.ensure(claim("first", created="2026-02-01T00:00:00Z")).ok
    t.published("shop/first", 16)
    second = t.ensure(claim("second", created="2026-01-01T00:00:00Z"))  # older, yet refused
    assert (second.ok, second.reason) == (False, conditions.ADDRESS_CONFLICT)
    assert (
        second.message
        == "firewall mark 16 (0x10) of IPv4 is already used by VirtualServer shop/first"
    )
    assert t.holding("shop/first") is not None
    # The same mark in the other family is another kernel service.
    assert t.ensure(claim("six", family=V6)).ok


def test_a_conflict_names_the_holder_only_inside_its_namespace() -> None:
    t = table(pool("marks", (16, 16)))
    assert t.ensure(claim("web", ns="tenant-a", current=16)).ok
    far = t.ensure(claim("x", ns="tenant-b"))
    assert (
        far.message == "firewall mark 16 (0x10) of IPv4 is in use by an object in another namespace"
    )


def test_unpublished_first_claims_go_to_the_older_object() -> None:
    t = table(pool("marks", (16, 16)))
    young = claim("young", created="2026-02-01T00:00:00Z")
    old = claim("old", created="2026-01-01T00:00:00Z")
    assert t.ensure(young).ok
    took = t.ensure(old)
    assert took.ok and took.evicted == ("shop/young",)
    assert t.ensure(young).reason == conditions.ADDRESS_CONFLICT


def test_a_released_mark_goes_to_the_next_claim() -> None:
    t = table(pool("marks", (16, 16)))
    assert t.ensure(claim("a", current=16)).ok
    assert not t.ensure(claim("b")).ok
    t.release("shop/a")
    assert t.ensure(claim("b")).ok


def test_a_grant_taken_away_by_a_pool_edit_takes_the_mark() -> None:
    t = table(pool("marks", (16, 16)))
    assert t.ensure(claim("a", current=16)).ok
    t.set_pools([pool("marks", (17, 17))], {})
    assert t.ensure(claim("a", current=16)).reason == conditions.FIREWALL_MARK_NOT_ADMITTED
    assert t.in_use("marks") == 0


def test_restore_keeps_the_older_of_two_statuses() -> None:
    t = table(pool("marks", (16, 16)))
    young = claim("young", created="2026-02-01T00:00:00Z", current=16)
    old = claim("old", created="2026-01-01T00:00:00Z", current=16)
    assert t.restore([(young, "marks"), (old, "marks")]) == ["shop/young"]
    assert t.ensure(old).ok
    assert t.ensure(young).reason == conditions.ADDRESS_CONFLICT


def test_a_pool_may_grant_marks_and_addresses() -> None:
    both = pool(
        "both",
        (16, 31),
        addresses=(
            AddressRange(ipaddress.ip_address("192.0.2.0"), ipaddress.ip_address("192.0.2.3")),
        ),
    )
    t = table(both)
    assert t.ensure(claim("a", 31)).pool == "both"


def test_a_granted_mark_stays_while_its_pool_is_missing_or_not_ready() -> None:
    marks = pool("marks", (16, 16))
    t = table(marks)
    assert t.ensure(claim("a", current=16)).ok
    t.set_pools([], {})
    gone = t.ensure(claim("a", current=16))
    assert (gone.ok, gone.reason, gone.mark, gone.pool) == (
        True,
        conditions.FIREWALL_MARK_RETAINED,
        16,
        "marks",
    )
    assert gone.message == (
        "AddressPool marks does not exist: keeping firewall mark 16 (0x10) until it exists again"
    )
    assert t.ensure(claim("b")).reason == conditions.FIREWALL_MARK_NOT_ADMITTED
    t.set_pools([], {"marks": "invalid"})
    assert t.ensure(claim("a", current=16)).message.startswith("AddressPool marks is not ready")
    t.set_pools([marks], {})
    assert t.ensure(claim("a", current=16)).reason == conditions.FIREWALL_MARK_ADMITTED
    # After a restart, status alone keeps it too.
    fresh = table()
    kept = fresh.ensure(claim("a", current=16, current_pool="marks"))
    assert kept.reason == conditions.FIREWALL_MARK_RETAINED
