"""Stopping asyncio tasks for good."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancelled(*tasks: asyncio.Task[Any], every: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again as long as one runs.

    One cancellation is not always enough on Python 3.11: ``asyncio.wait_for`` swallows a
    cancellation that arrives as its inner call completes (python/cpython#86296), and the
    Lease keeper and the reconcilers spend their time in it. A swallowed cancellation left
    the operator renewing its Lease after SIGTERM, never exiting (seen once in CI)."""
    running = {t for t in tasks if not t.done()}
    while running:
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=every)
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
