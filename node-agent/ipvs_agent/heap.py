"""The cyclic garbage collector, paused while the agent builds a table.

A pass (validation, plan, dump, diff) makes tens of thousands of small acyclic objects per
thousand services. With the collector on, each few hundred allocations trigger a collection,
and the older generations' collections rescan the whole long-lived heap (the mirrors, the
validated objects, the last tables): a third of a plan from nothing, half of a dump. Nothing a
pass builds needs the collector (no cycles), and whatever garbage a paused stretch leaves is
collected by the first collection after it.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the collector for the block. Nested and concurrent blocks (the loop's pass and
    the drift audit's reading run in two threads) resume it only when the last one ends,
    and only if it was on before the first began."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
