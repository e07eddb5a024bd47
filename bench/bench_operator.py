#!/usr/bin/env python3
"""Operator scale benchmark: N LoadBalancer Services created at once, on a real kube-apiserver.

Starts the API-server test bed (kube-apiserver + etcd on loopback), installs the CRDs and
rbac/, runs ``ipvs-operator run`` as its ServiceAccount, creates one AddressPool and then
``--count`` Services from 16 client threads at once, and waits until every Service has its
VirtualServer with an allocated address and that address in ``status.loadBalancer.ingress``.
It then checks that no address was given twice and reports the time to converge, the
operator's memory (RSS now, and its peak) and the CPU time the operator used meanwhile — on a
shared machine the times vary with the other jobs, its CPU seconds per Service much less::

    .venv/bin/python bench/bench_operator.py --count 500

Results go to docs/benchmarks.md ("Operator"). tests/operator/test_scale.py runs the same
measurement with a smaller count as a test.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kubernetes.watch.watch import iter_resp_lines  # noqa: E402

from tests.apiserver.cluster import LocalApiServer  # noqa: E402
from tests.operator import harness  # noqa: E402
from tests.vm.qemu import exit_on_signals  # noqa: E402

#: The chart's Lease timings rather than the tests' short ones (made for failover tests): on a
#: loaded machine a 3 s renew deadline can lapse in a burst and the operator exits.
PRODUCTION_LEASE = ("--lease-duration", "15", "--renew-deadline", "10", "--retry-period", "2")


class BenchError(AssertionError):
    """The operator did not converge, or converged wrongly."""


@dataclass
class Result:
    count: int
    create_seconds: float
    converge_seconds: float
    rss_idle_mib: float
    rss_mib: float
    peak_rss_mib: float
    #: CPU seconds (user + system) the operator spent from the first create until converged.
    cpu_seconds: float = 0.0

    @property
    def kib_per_service(self) -> float:
        return (self.rss_mib - self.rss_idle_mib) * 1024 / self.count

    @property
    def cpu_ms_per_service(self) -> float:
        return self.cpu_seconds * 1000 / self.count


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MiB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat``), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def create_services(api: Any, namespace: str, names: list[str], threads: int = 16) -> float:
    core = harness.core(api)
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(
                lambda n: core.create_namespaced_service(
                    namespace,
                    # No NodePorts: the operator needs none, and 2768 (30000-32767) would
                    # run out before 5000 Services.
                    harness.service(n, allocateLoadBalancerNodePorts=False),
                    _preload_content=False,
                ),
                names,
            )
        )
    return time.monotonic() - started


class Latest:
    """The latest version of each object of one namespaced list, kept by a watch in a thread.

    Polling full lists every second (5000 VirtualServers and 5000 Services at the top count)
    loaded the API server the operator competes with for this machine; a watch reads each
    change once. ``list_call(namespace, **params)`` is a list method of the kubernetes client.
    """

    def __init__(self, list_call: Callable[..., Any], namespace: str) -> None:
        self._list = list_call
        self._namespace = namespace
        self._objects: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)
        self._thread.start()

    def items(self) -> list[dict[str, Any]]:
        """The objects now; raises what stopped the watch, if anything did."""
        if self.error is not None:
            raise BenchError(f"the bench's watch failed: {self.error!r}")
        with self._lock:
            return list(self._objects.values())

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        try:
            version = ""
            while not self._stopping.is_set():
                if not version:
                    listed = json.loads(self._list(self._namespace, _preload_content=False).data)
                    with self._lock:
                        self._objects = {o["metadata"]["name"]: o for o in listed["items"]}
                    version = listed["metadata"]["resourceVersion"]
                response = self._list(
                    self._namespace, watch=True, resource_version=version,
                    allow_watch_bookmarks=True, timeout_seconds=30, _preload_content=False,
                )  # fmt: skip
                try:
                    for line in iter_resp_lines(response):
                        if self._stopping.is_set():
                            return
                        if line:
                            version = self._apply(json.loads(line))
                            if not version:
                                break  # 410 Gone: list again
                finally:
                    response.close()
        except BaseException as error:  # reported by items()
            self.error = error

    def _apply(self, event: dict[str, Any]) -> str:
        """One watch event applied; the resourceVersion to go on from ("" to list again)."""
        obj = event["object"]
        if event["type"] == "ERROR":
            if obj.get("code") == 410:
                return ""
            raise BenchError(f"watch error: {obj}")
        if event["type"] != "BOOKMARK":
            with self._lock:
                if event["type"] == "DELETED":
                    self._objects.pop(obj["metadata"]["name"], None)
                else:
                    self._objects[obj["metadata"]["name"]] = obj
        version: str = obj["metadata"]["resourceVersion"]
        return version


def converged(virtual_servers: Latest, services: Latest) -> dict[str, str]:
    """Service name -> address, for Services whose VirtualServer and ingress agree."""
    by_vs = {
        vs["metadata"]["name"]: vs["status"]["address"]
        for vs in virtual_servers.items()
        if harness.condition(vs, "AddressAllocated").get("status") == "True"
    }
    done: dict[str, str] = {}
    for svc in services.items():
        name = svc["metadata"]["name"]
        ingress = (svc.get("status") or {}).get("loadBalancer", {}).get("ingress") or []
        if name in by_vs and [i.get("ip") for i in ingress] == [by_vs[name]]:
            done[name] = by_vs[name]
    return done


def measure(
    api: Any,
    operator: harness.Operator,
    namespace: str,
    count: int,
    network: str,
    timeout: float = 600.0,
    interval: float = 0.5,
) -> Result:
    """Create ``count`` Services at once and wait until all are served; checks the outcome."""
    idle, _ = memory_mib(operator.pid)
    cpu_before = cpu_seconds(operator.pid)
    names = [f"svc-{i:05d}" for i in range(count)]
    custom = harness.custom(api)
    virtual_servers = Latest(
        lambda ns, **params: custom.list_namespaced_custom_object(
            harness.GROUP, harness.VERSION, ns, "virtualservers", **params
        ),
        namespace,
    )
    services = Latest(harness.core(api).list_namespaced_service, namespace)
    try:
        started = time.monotonic()
        create_seconds = create_services(api, namespace, names)
        deadline = started + timeout
        while True:
            done = converged(virtual_servers, services)
            if len(done) == count:
                break
            if not operator.alive():
                raise BenchError(f"the operator exited:\n{operator.tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{len(done)}/{count} converged after {timeout:.0f}s")
            time.sleep(interval)
        converge_seconds = time.monotonic() - started
    finally:
        virtual_servers.stop()
        services.stop()
    rss, peak = memory_mib(operator.pid)
    cpu = cpu_seconds(operator.pid) - cpu_before
    addresses = list(done.values())
    if len(set(addresses)) != count:
        raise BenchError("an address was given twice")
    net = ipaddress.ip_network(network)
    if not all(ipaddress.ip_address(a) in net for a in addresses):
        raise BenchError(f"an address outside {network}")
    return Result(count, create_seconds, converge_seconds, idle, rss, peak, cpu)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return (
        f"{os.cpu_count()} x {model}, {mem_kib / 1024 / 1024:.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--network", default="10.64.0.0/16", help="the AddressPool's CIDR")
    parser.add_argument("--workers", type=int, default=8, help="operator reconcile workers")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="give up after this many seconds"
    )
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    exit_on_signals()  # SIGTERM too stops what the run started (see qemu.exit_on_signals)
    before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp, LocalApiServer() as bed:
        bed.install_crds(sorted((REPO / "crds").glob("*.yaml")))
        with bed.api_client() as api:
            core = harness.core(api)
            for name in (harness.OPERATOR_NAMESPACE, "bench"):
                core.create_namespace({"metadata": {"name": name}})
            for name in ("operator.yaml", "agent.yaml"):
                harness.apply_manifests(api, REPO / "rbac" / name)
            harness.custom(api).create_cluster_custom_object(
                harness.GROUP,
                harness.VERSION,
                "addresspools",
                harness.address_pool("bench", [args.network]),
            )
            kubeconfig = harness.service_account_kubeconfig(
                bed, harness.OPERATOR_NAMESPACE, harness.OPERATOR_SA, Path(tmp) / "kubeconfig"
            )
            operator = harness.Operator(
                kubeconfig,
                Path(tmp) / "operator.log",
                "bench",
                ["--workers", str(args.workers), *PRODUCTION_LEASE],
            )
            with harness.running(operator):
                harness.wait_for(
                    "the operator to lead", lambda: harness.lease_holder(api) == "bench"
                )
                time.sleep(2)  # let it settle (initial listing) before measuring idle memory
                result = measure(
                    api, operator, "bench", args.count, args.network, timeout=args.timeout
                )
    print(f"machine: {machine()}; load average before {before}")
    print(f"command: .venv/bin/python bench/bench_operator.py --count {args.count}")
    print(
        f"{result.count} Services: created in {result.create_seconds:.1f} s, all served "
        f"(distinct addresses, ingress set) {result.converge_seconds:.1f} s after the first "
        f"create; operator RSS {result.rss_idle_mib:.0f} MiB idle, {result.rss_mib:.0f} MiB "
        f"after, peak {result.peak_rss_mib:.0f} MiB ({result.kib_per_service:.0f} KiB per "
        f"Service); operator CPU {result.cpu_seconds:.1f} s "
        f"({result.cpu_ms_per_service:.1f} ms per Service); load average {load_average()}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **asdict(result),
                    "kib_per_service": result.kib_per_service,
                    "cpu_ms_per_service": result.cpu_ms_per_service,
                    "machine": machine(),
                    "load_average_before": before,
                    "load_average_after": load_average(),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
