"""A burst of Services at once (issue point 5), smaller than the benchmark's 500 to stay quick.

bench/bench_operator.py runs the same measurement with 500 and records it in
docs/benchmarks.md; here the point is correctness under a burst: every Service served, no
address twice, within a deadline generous enough for a loaded 2-core CI machine.
"""

from __future__ import annotations

import sys
from typing import Any

from tests.apiserver.cluster import REPO_ROOT
from tests.operator import harness
from tests.operator.conftest import PoolFactory

sys.path.insert(0, str(REPO_ROOT / "bench"))
import bench_operator  # type: ignore[import-not-found]

COUNT = 120


def test_a_burst_of_services_gets_distinct_addresses(
    admin: Any, ns: str, pool: PoolFactory, operator: harness.Operator
) -> None:
    pool(200)
    result = bench_operator.measure(admin, operator, ns, COUNT, "10.77.0.0/16", timeout=120)
    assert result.count == COUNT
    print(
        f"{COUNT} Services served in {result.converge_seconds:.1f}s; "
        f"operator RSS {result.rss_mib:.0f} MiB"
    )
