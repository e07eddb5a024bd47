"""Leader election rules (pure) and the elector against an in-memory Lease API."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from ipvs_operator import kube, lease
from ipvs_operator.leader import LeaderElector, LeaseSettings


def test_free_own_and_expired_leases_may_be_taken() -> None:
    held = {"holderIdentity": "a", "leaseDurationSeconds": 15}
    assert lease.may_take({}, "b", observed_at=0, now=0)
    assert lease.may_take(held, "a", observed_at=0, now=0)
    assert not lease.may_take(held, "b", observed_at=100, now=114.9)
    assert lease.may_take(held, "b", observed_at=100, now=115)
    assert lease.may_take({"holderIdentity": "", "leaseDurationSeconds": 1}, "b", 100, 100)


def test_claimed_counts_transitions_and_keeps_acquire_time_on_renewal() -> None:
    first = lease.claimed({}, "a", 15, "T1")
    assert first["leaseTransitions"] == 0 and first["acquireTime"] == "T1"
    renewed = lease.claimed(first, "a", 15, "T2")
    assert (renewed["acquireTime"], renewed["renewTime"]) == ("T1", "T2")
    taken = lease.claimed(renewed, "b", 15, "T3")
    assert (taken["holderIdentity"], taken["leaseTransitions"], taken["acquireTime"]) == (
        "b",
        1,
        "T3",
    )
    assert "holderIdentity" not in lease.released(taken, "T4")


class FakeLeases:
    """Just enough of the API server: GET, POST and PUT with resourceVersion checks."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.version = 0

    async def get(self, path: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.obj)

    async def request(self, method: str, path: str, body: Any = None, **_: Any) -> dict[str, Any]:
        if method == "POST":
            if self.obj is not None:
                raise kube.ApiError(409, "AlreadyExists", "exists")
        elif method == "PUT":
            assert self.obj is not None
            if body["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
                raise kube.ApiError(409, "Conflict", "changed")
        self.version += 1
        self.obj = copy.deepcopy(body)
        self.obj["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(self.obj)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def elector(api: FakeLeases, me: str, clock: Clock) -> LeaderElector:
    settings = LeaseSettings("ns", "ipvs-operator", me, duration=15, renew_deadline=10)
    return LeaderElector(api, settings, clock=clock)  # type: ignore[arg-type]


def test_one_leader_then_takeover_after_expiry_or_release() -> None:
    async def scenario() -> None:
        api, clock = FakeLeases(), Clock()
        a, b = elector(api, "a", clock), elector(api, "b", clock)
        assert await a.try_acquire_or_renew() and a.leading()
        assert not await b.try_acquire_or_renew()
        clock.now += 14
        assert not await b.try_acquire_or_renew()  # b first saw the record 14 s ago... at 1000
        assert not a.leading()  # a has not renewed for 14 s > renew deadline: it stops acting
        clock.now += 1.5
        assert await b.try_acquire_or_renew()  # 15.5 s without a change: expired
        assert api.obj is not None and api.obj["spec"]["leaseTransitions"] == 1
        assert not await a.try_acquire_or_renew()
        await b.release()
        assert not b.leading()
        assert await a.try_acquire_or_renew()  # released: no need to wait

    asyncio.run(scenario())


def test_renewals_keep_the_standby_waiting() -> None:
    async def scenario() -> None:
        api, clock = FakeLeases(), Clock()
        a, b = elector(api, "a", clock), elector(api, "b", clock)
        assert await a.try_acquire_or_renew()
        for _ in range(10):
            clock.now += 5
            assert await a.try_acquire_or_renew()
            assert not await b.try_acquire_or_renew()

    asyncio.run(scenario())


@pytest.mark.parametrize("holder", ["", "gone"])
def test_takes_a_free_or_stale_lease(holder: str) -> None:
    async def scenario() -> None:
        api, clock = FakeLeases(), Clock()
        api.obj = lease.lease(
            "ns", "ipvs-operator", {"holderIdentity": holder, "leaseDurationSeconds": 1}
        )
        api.obj["metadata"]["resourceVersion"] = "0"
        b = elector(api, "b", clock)
        first = await b.try_acquire_or_renew()
        if not first:
            clock.now += 2
            assert await b.try_acquire_or_renew()

    asyncio.run(scenario())


def test_time_left_runs_down_from_the_last_renewal() -> None:
    assert lease.time_left(None, now=5, renew_deadline=10) == 0
    assert lease.time_left(100, now=104, renew_deadline=10) == 6
    assert lease.time_left(100, now=110, renew_deadline=10) == 0
    assert lease.time_left(100, now=130, renew_deadline=10) == 0


def test_a_write_gets_the_time_left_capped_by_the_client_and_none_below_the_floor() -> None:
    assert lease.write_timeout(6, cap=30, floor=0.5) == 6
    assert lease.write_timeout(45, cap=30, floor=0.5) == 30
    assert lease.write_timeout(float("inf"), cap=30, floor=0.5) == 30
    assert lease.write_timeout(0.5, cap=30, floor=0.5) == 0.5
    assert lease.write_timeout(0.49, cap=30, floor=0.5) is None
    assert lease.write_timeout(0, cap=30, floor=0.5) is None


def test_the_elector_knows_how_long_it_may_still_act() -> None:
    async def scenario() -> None:
        api, clock = FakeLeases(), Clock()
        a = elector(api, "a", clock)
        assert a.time_left() == 0 and not a.leading()
        assert await a.try_acquire_or_renew()
        assert a.time_left() == 10
        clock.now += 7.5
        assert a.time_left() == 2.5 and a.leading()
        assert await a.try_acquire_or_renew()
        assert a.time_left() == 10  # renewed
        clock.now += 10
        assert a.time_left() == 0 and not a.leading()

    asyncio.run(scenario())
