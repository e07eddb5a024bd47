#!/usr/bin/env python3
"""Reporting at scale: V VirtualServers x N nodes reported and aggregated on a real API server.

Issue 13 §3. Starts the API-server test bed, runs ``ipvs-operator run`` as its ServiceAccount,
creates ``--nodes`` Nodes and ``--count`` VirtualServers that every node directs, and waits
until the operator has given each an address. Then ``--nodes`` simulated agents report every
VirtualServer programmed through the agent's own :class:`ipvs_agent.report.NodeReporter`
(real HTTP writes, the agent's slicing), and the bench waits until every VirtualServer is
Programmed on all N directors. It reports:

- the largest IPVSNode and IPVSNodeReport (bytes of JSON as the API server returns them) and
  how many there are, against etcd's 1.5 MiB limit;
- the writes one spec change costs: the agents' report writes, and the operator's status
  writes to that VirtualServer (counted on a watch), until it is Programmed at the new
  generation on every node and for a quiet period after;
- the reconcile passes an agent's VirtualServer mirror would have woken meanwhile (its own
  ``Mirror`` with the agent's fingerprint): the spec change only, none for status writes.

Simulated agents do not program a kernel; what they report is what a real agent reports for a
programmed VirtualServer. Command (results in docs/benchmarks.md, "Reports at scale")::

    .venv/bin/python bench/bench_reports.py --count 20000 --nodes 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kubernetes import watch  # noqa: E402

from bench.bench_operator import (  # noqa: E402
    PRODUCTION_LEASE,
    BenchError,
    cpu_seconds,
    load_average,
    machine,
    memory_mib,
)
from ipvs_agent.cluster import mirrors  # noqa: E402
from ipvs_agent.desired import Outcome, Role, State  # noqa: E402
from ipvs_agent.report import NodeReporter  # noqa: E402
from ipvs_agent.status import node_status  # noqa: E402
from ipvs_api import conditions  # noqa: E402
from tests.apiserver.cluster import LocalApiServer  # noqa: E402
from tests.operator import harness  # noqa: E402
from tests.unit.agent_helpers import CountingEvent  # noqa: E402
from tests.vm.qemu import exit_on_signals  # noqa: E402

NAMESPACE = "bench"
#: etcd's default request limit, which bounds any object.
ETCD_LIMIT = 1536 * 1024


def wait(what: str, done: Callable[[], bool], timeout: float, interval: float = 2.0) -> float:
    """Seconds until ``done()`` (the tests' bounded poll, timed)."""
    started = time.monotonic()
    harness.wait_for(what, done, timeout, interval)
    return time.monotonic() - started


def list_raw(api: Any, plural: str, namespace: str = "", **kw: Any) -> list[dict[str, Any]]:
    """Every object of a resource, read in pages (whole lists of reports are hundreds of MB)."""
    custom = harness.custom(api)
    items: list[dict[str, Any]] = []
    token = None
    while True:
        args = {"limit": 500, "_continue": token, **kw} if token else {"limit": 500, **kw}
        if namespace:
            resp = custom.list_namespaced_custom_object(
                harness.GROUP, harness.VERSION, namespace, plural, _preload_content=False, **args
            )
        else:
            resp = custom.list_cluster_custom_object(
                harness.GROUP, harness.VERSION, plural, _preload_content=False, **args
            )
        page = json.loads(resp.data)
        items += page["items"]
        token = page["metadata"].get("continue")
        if not token:
            return items


def sizes(api: Any, plural: str) -> list[int]:
    """JSON bytes of each object of a cluster-scoped resource, as the API server returns it."""
    return [len(json.dumps(o, separators=(",", ":"))) for o in list_raw(api, plural)]


def programmed_everywhere(api: Any, nodes: int, generation_of: dict[str, int]) -> int:
    """How many of the named VirtualServers are Programmed on ``nodes`` directors."""
    done = 0
    for vs in list_raw(api, "virtualservers", NAMESPACE):
        name = vs["metadata"]["name"]
        want = generation_of.get(name)
        if want is None or vs["metadata"].get("generation") != want:
            continue
        status = vs.get("status") or {}
        cond = harness.condition(vs, "Programmed")
        if (
            cond.get("status") == "True"
            and cond.get("observedGeneration") == want
            and (status.get("nodes") or {}).get("programmed") == nodes
        ):
            done += 1
    return done


def outcomes(generations: dict[str, int]) -> dict[str, Outcome]:
    return {
        f"{NAMESPACE}/{name}": Outcome(
            State.PROGRAMMED, roles=frozenset({Role.DIRECTOR}), generation=g, real_servers=1
        )
        for name, g in generations.items()
    }


def report_all(reporters: list[NodeReporter], generations: dict[str, int]) -> int:
    """Every simulated agent reports ``generations``; the writes it cost."""
    status = node_status(outcomes(generations), None, "bench", conditions.now())
    before = sum(r.writes for r in reporters)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda r: r.report(status), reporters))
    return sum(r.writes for r in reporters) - before


class StatusWrites:
    """Counts the writes to one VirtualServer on a watch (each MODIFIED event is one)."""

    def __init__(self, api: Any, name: str) -> None:
        custom = harness.custom(api)
        self.api = api
        self._lister = custom.list_namespaced_custom_object
        self._args = (harness.GROUP, harness.VERSION, NAMESPACE, "virtualservers")
        self._selector = f"metadata.name={name}"
        listed = self._lister(*self._args, field_selector=self._selector)
        self._version = str(listed["metadata"]["resourceVersion"])
        self.modified = 0
        self.generations: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for event in watch.Watch().stream(
                self._lister,
                *self._args,
                field_selector=self._selector,
                resource_version=self._version,
                timeout_seconds=1,
            ):
                obj = event["object"]
                self._version = obj["metadata"]["resourceVersion"]
                if event["type"] == "MODIFIED":
                    self.modified += 1
                    self.generations.append(int(obj["metadata"]["generation"]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def run(args: argparse.Namespace, tmp: Path, bed: LocalApiServer) -> dict[str, Any]:
    bed.install_crds(sorted((REPO / "crds").glob("*.yaml")))
    out: dict[str, Any] = {"count": args.count, "nodes": args.nodes}
    with bed.api_client() as api, contextlib.ExitStack() as clients:
        core = harness.core(api)
        custom = harness.custom(api)
        for name in (harness.OPERATOR_NAMESPACE, NAMESPACE):
            core.create_namespace({"metadata": {"name": name}})
        for name in ("operator.yaml", "agent.yaml"):
            harness.apply_manifests(api, REPO / "rbac" / name)
        custom.create_cluster_custom_object(
            harness.GROUP,
            harness.VERSION,
            "addresspools",
            harness.address_pool("bench", ["10.64.0.0/16"]),
        )
        node_names = [f"node-{i:03d}" for i in range(args.nodes)]
        uids = {}
        for name in node_names:
            uids[name] = core.create_node({"metadata": {"name": name}}).metadata.uid
        kubeconfig = harness.service_account_kubeconfig(
            bed, harness.OPERATOR_NAMESPACE, harness.OPERATOR_SA, tmp / "kubeconfig"
        )
        operator = harness.Operator(
            kubeconfig, tmp / "operator.log", "bench", ["--workers", "8", *PRODUCTION_LEASE]
        )
        with harness.running(operator):
            harness.wait_for("the operator to lead", lambda: harness.lease_holder(api) == "bench")
            names = [f"vs-{i:05d}" for i in range(args.count)]
            started = time.monotonic()

            def create(name: str) -> None:
                response = custom.create_namespaced_custom_object(
                    harness.GROUP,
                    harness.VERSION,
                    NAMESPACE,
                    "virtualservers",
                    harness.virtual_server(name),
                    _preload_content=False,
                )
                response.data  # noqa: B018  # read it all: the connection is reused
                response.release_conn()  # else each keeps its socket until collected

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(create, names))
            out["create_seconds"] = time.monotonic() - started

            def allocated() -> bool:
                if not operator.alive():
                    raise BenchError(f"the operator exited:\n{operator.tail()}")
                listed = list_raw(api, "virtualservers", NAMESPACE)
                return sum(1 for v in listed if (v.get("status") or {}).get("address")) == len(
                    names
                )

            out["allocate_seconds"] = wait("addresses", allocated, args.timeout)

            # The agents report every VirtualServer programmed.
            apis = [clients.enter_context(bed.api_client()) for _ in range(4)]
            reporters = [NodeReporter(apis[i % len(apis)], n) for i, n in enumerate(node_names)]
            generations = dict.fromkeys(names, 1)
            cpu_before = cpu_seconds(operator.pid)
            started = time.monotonic()
            out["initial_report_writes"] = report_all(reporters, generations)
            out["report_seconds"] = time.monotonic() - started

            def aggregated() -> bool:
                if not operator.alive():
                    raise BenchError(f"the operator exited:\n{operator.tail()}")
                return programmed_everywhere(api, args.nodes, generations) == len(names)

            out["aggregate_seconds"] = (
                wait("Programmed everywhere", aggregated, args.timeout) + (out["report_seconds"])
            )
            out["operator_cpu_seconds"] = cpu_seconds(operator.pid) - cpu_before
            rss, peak = memory_mib(operator.pid)
            out["operator_rss_mib"], out["operator_peak_mib"] = rss, peak
            node_sizes = sizes(api, "ipvsnodes")
            slice_sizes = sizes(api, "ipvsnodereports")
            out["ipvsnodes"] = len(node_sizes)
            out["ipvsnodereports"] = len(slice_sizes)
            out["largest_ipvsnode_bytes"] = max(node_sizes)
            out["largest_ipvsnodereport_bytes"] = max(slice_sizes, default=0)
            out["report_bytes_total"] = sum(node_sizes) + sum(slice_sizes)

            # One spec change: what it costs.
            changed = CountingEvent()
            mirror = mirrors(api, node_names[0], changed)[0]
            stop = threading.Event()
            threading.Thread(target=mirror.run, args=(stop,), daemon=True).start()
            wait("the agent's mirror", mirror.synced.is_set, args.timeout, 0.5)
            target = names[len(names) // 2]
            writes = StatusWrites(api, target)
            raised_before = changed.sets
            custom.patch_namespaced_custom_object(
                harness.GROUP,
                harness.VERSION,
                NAMESPACE,
                "virtualservers",
                target,
                {"spec": {"ports": [{"port": 81}]}},
            )
            wait("generation 2", lambda: 2 in writes.generations, args.timeout, 0.2)
            writes_before_reports = writes.modified
            generations[target] = 2
            started = time.monotonic()
            out["change_report_writes"] = report_all(reporters, generations)

            def target_done() -> bool:
                return programmed_everywhere(api, args.nodes, {target: 2}) == 1

            wait("the change Programmed", target_done, args.timeout, 0.5)
            out["change_seconds"] = time.monotonic() - started
            # Writes still in flight: wait for the count to hold still for a few seconds.
            last, quiet_since = writes.modified, time.monotonic()
            while time.monotonic() - quiet_since < args.quiet:
                time.sleep(0.5)
                if writes.modified != last:
                    last, quiet_since = writes.modified, time.monotonic()
            writes.stop()
            stop.set()
            mirror.stop()
            out["change_status_writes"] = writes.modified
            out["change_status_writes_after_reports"] = writes.modified - writes_before_reports
            out["agent_wakes"] = changed.sets - raised_before
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="VirtualServers")
    parser.add_argument("--nodes", type=int, default=20, help="simulated agents")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--quiet", type=float, default=5.0, help="seconds with no more writes")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    exit_on_signals()  # SIGTERM too stops what the run started (see qemu.exit_on_signals)
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-reports-") as tmp, LocalApiServer() as bed:
        out = run(args, Path(tmp), bed)
    out["machine"] = machine()
    out["load_average"] = f"{before} -> {load_average()}"
    print(
        f"command: .venv/bin/python bench/bench_reports.py --count {args.count} "
        f"--nodes {args.nodes}"
    )
    for key, value in out.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    limit_ok = max(out["largest_ipvsnode_bytes"], out["largest_ipvsnodereport_bytes"])
    print(f"largest object: {limit_ok} bytes = {limit_ok / ETCD_LIMIT:.1%} of etcd's limit")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
