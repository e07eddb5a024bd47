#!/usr/bin/env python3
"""Agent mirror memory: what the VirtualServer mirror holds, whole objects against trimmed.

On the host, against the API-server test bed (no VM). Creates ``--count`` VirtualServers of
``--dests`` static real servers each, as ``kubectl apply`` leaves them (the last-applied
annotation, the writer's managedFields), and writes on each the status the operator writes
(conditions, counts, announcement; a second managedFields entry). Then fresh child processes
list them through the agent's own VirtualServer mirror (``cluster.mirrors``): keeping whole
objects from one list response (the agent before ``ipvs_agent.trim`` and paged lists),
trimmed objects from one response, and trimmed objects listed 500 and 100 a page (the agent
now lists 100 a page); each child reports:

- ``held_mb``: RSS after the list and a collection, minus RSS before it (the mirror's
  holdings, plus whatever the list response left in the heap);
- ``peak_mb``: the peak RSS (VmHWM) gained while listing (the list response at once);
- ``objects_mb``: the mirror's objects counted one by one (``sys.getsizeof`` of every distinct
  dict, list, string and number reachable from them).

::

    .venv/bin/python bench/bench_mirror.py --count 10000 --dests 10

Results go to docs/benchmarks.md ("Node agent: kernel layer", the mirror). Every step is
bounded in time (``--deadline``).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ipvs_api import constants  # noqa: E402
from tests.apiserver.cluster import LocalApiServer  # noqa: E402
from tests.served import LAST_APPLIED, operator_status  # noqa: E402
from tests.vm.qemu import exit_on_signals  # noqa: E402

NAMESPACE = "bench"
#: whole: the agent before (whole objects, one list response); trimmed-unpaged: trimmed
#: objects from one list response; trimmed-page500: trimmed, lists of 500 a page (client-go's
#: page); trimmed-page100: the agent now (cluster.LIST_PAGE).
MODES = {
    "whole": (False, 0),
    "trimmed-unpaged": (True, 0),
    "trimmed-page500": (True, 500),
    "trimmed-page100": (True, 100),
}  # name: (trimmed, objects per list page; 0 all)

CHILD = r"""
import gc, json, sys, threading, time
from kubernetes import client, config
from ipvs_agent import cluster

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)

def size(root):
    seen, stack, total = set(), [root], 0
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        total += sys.getsizeof(value)
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return total

kubeconfig, mode, trimmed, page = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
configuration = client.Configuration()
config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
api = client.ApiClient(cluster.configure(configuration))
mirror = cluster.mirrors(api, "bench", threading.Event())[0]
assert mirror.name == "virtualservers"
mirror.page = page
if not trimmed:
    mirror.transform = None
# Warm the client up (connection, TLS, the deserializer's imports) on an empty list.
warm = cluster.Mirror("warm", mirror._list_fn, api, threading.Event(), label_selector="x=y")
warm._relist()
del warm
gc.collect()
before, hwm_before = status("VmRSS"), status("VmHWM")
started = time.perf_counter()
mirror._relist()
listed = time.perf_counter() - started
gc.collect()
after, hwm = status("VmRSS"), status("VmHWM")
import ctypes, os, re

def pymalloc():  # the interpreter's own heap (arenas of 1 MiB), from _debugmallocstats
    r, w = os.pipe()
    saved = os.dup(2)
    os.dup2(w, 2)
    try:
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(w)
    text = os.read(r, 1 << 20).decode()
    os.close(r)
    found = dict(re.findall(r"# ([a-z ]+?)\s*=\s*([\d,]+)", text))
    return {key: int(found[key].replace(",", "")) for key in (
        "arenas allocated current", "arenas highwater mark", "bytes in allocated blocks")}

heap = pymalloc()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what glibc's heap holds free beyond that
after_malloc_trim = status("VmRSS")
items = mirror.items()
one = items[0]
print(json.dumps({
    "mode": mode,
    "objects": len(items),
    "list_s": round(listed, 2),
    "rss_before_mb": round(before, 1),
    "held_mb": round(after - before, 1),
    "peak_mb": round(max(hwm - before, 0.0), 1),
    "objects_mb": round(size(items) / 2**20, 1),
    "after_malloc_trim_mb": round(after_malloc_trim - before, 1),
    "pymalloc": heap,
    "one_object_json_bytes": len(json.dumps(one)),
    "one_object_keys": sorted(one),
    "one_metadata_keys": sorted(one["metadata"]),
}))
"""


class BenchError(RuntimeError):
    pass


def vip(i: int) -> str:
    return str(ipaddress.IPv4Address("10.64.0.1") + i)


def real(i: int, j: int, dests: int) -> str:
    return str(ipaddress.IPv4Address("198.19.0.1") + (i * dests + j) % 65_000)


def manifest(i: int, dests: int) -> dict[str, Any]:
    """One VirtualServer as a user writes it (the shape ``bench_kernel`` programs)."""
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {
            "name": f"vs{i}",
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": f"web{i % 100}", "team": "edge"},
        },
        "spec": {
            "address": vip(i),
            "ports": [{"port": 80, "targetPort": 8080}],
            "scheduler": {"name": "wlc"},
            "backends": {"static": [{"address": real(i, j, dests)} for j in range(dests)]},
        },
    }


def create(api: Any, count: int, dests: int, threads: int) -> tuple[float, float]:
    """Create the objects as kubectl apply does, then write the operator's status on each."""
    from kubernetes import client

    objects = client.CustomObjectsApi(api)
    group, version, plural = constants.GROUP, constants.VERSION, constants.VIRTUAL_SERVERS

    def one(i: int) -> None:
        body = manifest(i, dests)
        applied = json.dumps(body, separators=(",", ":"), sort_keys=True) + "\n"
        body["metadata"]["annotations"] = {LAST_APPLIED: applied}
        objects.create_namespaced_custom_object(
            group, version, NAMESPACE, plural, body,
            field_manager="kubectl-client-side-apply", _preload_content=False,
        )  # fmt: skip

    def status(i: int) -> None:
        body = manifest(i, dests)
        body["metadata"]["generation"] = 1
        objects.patch_namespaced_custom_object_status(
            group, version, NAMESPACE, plural, f"vs{i}", {"status": operator_status(body)},
            field_manager="ipvs-operator", _preload_content=False,
        )  # fmt: skip

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(count)))
    created = time.monotonic() - started
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(status, range(count)))
    return created, time.monotonic() - started


def measure(kubeconfig: Path, mode: str, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    trimmed, page = MODES[mode]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(kubeconfig), mode, str(int(trimmed)), str(page)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"child ({mode}) failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "system": f"Linux {platform.release()}, Python {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--dests", type=int, default=10)
    parser.add_argument("--threads", type=int, default=8, help="client threads creating objects")
    parser.add_argument("--rounds", type=int, default=2, help="children per mode (best kept)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="whole run, seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    exit_on_signals()  # SIGTERM too stops what the run started (see qemu.exit_on_signals)

    def out_of_time(signum: int, frame: object) -> None:
        raise BenchError(f"the benchmark ran longer than --deadline {args.deadline:.0f}s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.deadline))
    report: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"json": None}}
    with LocalApiServer() as bed:
        bed.install_crds(sorted((REPO / "crds").glob("*.yaml")))
        with bed.api_client() as api:
            from kubernetes import client

            namespace: Any = {"metadata": {"name": NAMESPACE}}
            client.CoreV1Api(api).create_namespace(namespace)
            created, statused = create(api, args.count, args.dests, args.threads)
        report["create_s"], report["status_s"] = round(created, 1), round(statused, 1)
        print(f"created {args.count} in {created:.1f} s, status {statused:.1f} s", file=sys.stderr)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in runs:  # alternate, so that the host's load falls on both alike
                runs[mode].append(measure(bed.kubeconfig, mode, args.deadline))
                print(json.dumps(runs[mode][-1]), file=sys.stderr)
        for mode, found in runs.items():
            if any(r["objects"] != args.count for r in found):
                raise BenchError(f"{mode}: the mirror did not hold every object: {found}")
            report[mode] = min(found, key=lambda r: float(r["held_mb"]))
            report[f"{mode}_runs"] = found
    report["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
