"""The agent's /metrics page at S services x D real servers, on the host (no kernel needed).

Times prometheus_client writing the kernel table's families (what every scrape cost before)
against ``TableCollector.render``: cold, with the same services in a new table (an idle node
after a resync), and with every service's counters changed (a busy one)::

    .venv/bin/python bench/bench_metrics.py [--services 2000] [--dests 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(CHECKOUT / "api"), str(CHECKOUT / "node-agent")]

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from ipvs_agent.metrics import TableCollector  # noqa: E402
from ipvs_agent.model import (  # noqa: E402
    AddressFamily,
    Dest,
    DestKey,
    DestStats,
    ObservedDest,
    ObservedService,
    ObservedTable,
    Service,
    ServiceKey,
    ServiceStats,
)


def table(services: int, dests: int) -> tuple[ObservedTable, dict[ServiceKey, str]]:
    observed: dict[ServiceKey, ObservedService] = {}
    owners: dict[ServiceKey, str] = {}
    for i in range(services):
        key = ServiceKey(AddressFamily.INET, 6, f"198.18.{i // 250}.{i % 250}", 80)
        reals = {
            DestKey(f"198.19.{(i * dests + j) // 250 % 256}.{(i * dests + j) % 250}", 80): j
            for j in range(dests)
        }
        observed[key] = ObservedService(
            Service(key),
            {d: ObservedDest(Dest(d), DestStats(1, 2, 0, 3, 4, 5, 6, 7)) for d in reals},
            ServiceStats(1, 2, 3, 4, 5),
        )
        owners[key] = f"bench/vs{i}"
    return observed, owners


def timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--dests", type=int, default=10)
    args = parser.parse_args(argv)
    observed, owners = table(args.services, args.dests)
    collector = TableCollector()
    collector.update(observed, owners)
    registry = CollectorRegistry()
    registry.register(collector)
    reference = generate_latest(registry)
    result: dict[str, object] = {
        "services": args.services,
        "dests": args.dests,
        "page bytes": len(reference),
        "prometheus_client": timed(lambda: generate_latest(registry)),
        "render, cold": timed(collector.render),
        "render, same table": timed(collector.render),
    }
    if collector.render() != reference:
        raise SystemExit("render differs from prometheus_client's text")
    collector.update(dict(observed), owners)
    result["render, new table of unchanged services"] = timed(collector.render)
    busy = {k: replace(v, stats=ServiceStats(2, 2, 3, 4, 5)) for k, v in observed.items()}
    collector.update(busy, owners)
    result["render, every service changed"] = timed(collector.render)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
