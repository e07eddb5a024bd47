"""Stopping the operator's tasks for good (ipvs_operator.tasks)."""

from __future__ import annotations

import asyncio

from ipvs_operator.tasks import cancelled


def test_a_task_that_swallows_a_cancellation_is_cancelled_again_until_it_ends() -> None:
    """As ``asyncio.wait_for`` does on Python 3.11 when its inner call completes as the
    cancellation comes (the Lease keeper renews in one): the task goes on after the first."""

    async def scenario() -> None:
        swallowed: list[int] = []

        async def keeper() -> None:
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed.append(1)  # the first is lost, the loop goes on

        async def plain() -> None:
            await asyncio.sleep(3600)

        tasks = [asyncio.create_task(keeper()), asyncio.create_task(plain())]
        await asyncio.sleep(0)
        await asyncio.wait_for(cancelled(*tasks, every=0.01), timeout=10)
        assert swallowed == [1] and all(t.cancelled() for t in tasks)
        await cancelled()  # nothing to stop
        await cancelled(*tasks)  # already ended

    asyncio.run(scenario())


def test_a_task_renewing_through_wait_for_in_a_loop_always_ends() -> None:
    """The Lease keeper's shape: on Python 3.11 one cancellation of it is often lost (more
    than half the time in a tight loop); stopped by ``cancelled`` it always ends."""

    async def scenario() -> None:
        async def quick() -> bool:
            await asyncio.sleep(0)
            return True

        async def hold() -> None:
            while True:
                await asyncio.wait_for(quick(), timeout=3)

        for i in range(50):
            task = asyncio.create_task(hold())
            for _ in range(i % 5):
                await asyncio.sleep(0)
            await asyncio.wait_for(cancelled(task, every=0.01), timeout=10)
            assert task.done()

    asyncio.run(scenario())
