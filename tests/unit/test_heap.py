"""``heap.collector_paused``: the pass and the drift audit's reading (two threads) pause the
collector; it resumes when the last of them ends, and only if it was on before."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from ipvs_agent.heap import collector_paused


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_nested_blocks_resume_only_at_the_outermost() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_as_a_decorator_and_through_an_exception() -> None:
    gc.enable()

    @collector_paused()
    def fails() -> None:
        assert not gc.isenabled()
        raise ValueError("planner bug")

    with pytest.raises(ValueError):
        fails()
    assert gc.isenabled()


def test_two_threads_overlapping_resume_when_the_last_ends() -> None:
    gc.enable()
    inside, release = threading.Event(), threading.Event()
    seen: list[bool] = []

    def reading() -> None:
        with collector_paused():
            inside.set()
            assert release.wait(10)
        seen.append(gc.isenabled())

    other = threading.Thread(target=reading)
    with collector_paused():
        other.start()
        assert inside.wait(10)
    assert not gc.isenabled(), "the other thread's block is still going on"
    release.set()
    other.join(10)
    assert seen == [True] and gc.isenabled()
