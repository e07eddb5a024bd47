"""Kernel-layer benchmark: IPVSKernel against ipvsadm on the same kernel, in the same boot.

Run inside the IPVS test VM (it needs a kernel with IPVS and root), from the checkout::

    .venv/bin/python -m tests.vm.qemu -- python bench/bench_kernel.py

Measures, in a private network namespace:

(a) cold programming of S services x D real servers: IPVSKernel.apply() vs ``ipvsadm -R``
    reading an equivalent restore file (best of --rounds; the table is flushed in between);
(b) a full read of that table: IPVSKernel.dump() vs ``ipvsadm -Ln`` and ``-Ln --stats``;
(c) resident memory of a fresh process holding a dump of M services x D real servers, and of
    one that runs the agent's whole reconcile pass over M VirtualServers (plan, dump, diff) as
    the in-cluster agent holds them, with its VirtualServer mirror filled as the agent fills
    it (objects as the API server serves them, listed in pages, trimmed and read),
    and then with the drift audit's own reading; twice: as the agent runs (the dumps lend the
    plan's Dests) and with the dumps copying them (``--memory-only`` runs just this part);
(d) the agent's list of the S VirtualServers (its side: parsing, trimming, reading), its
    reconcile pass over the S x D table: the first pass of a restarted agent (against
    ``ipvsadm -Ln`` and the list), with nothing changed (a resync: full read and diff,
    against ``ipvsadm -Ln``), and with one real server of one service replaced (the netlink
    operations it sends, and its time); and what the operator's status write on every
    VirtualServer costs the mirror.

Ratios are ours / ipvsadm's: below 1.0 we are faster. Every step is bounded in time.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ipvs_agent.host.nftables import Ruleset
    from ipvs_agent.host.state import Repair
    from ipvs_agent.model import IPAddress, ServiceKey

CHECKOUT = Path(__file__).resolve().parents[1]
NETNS = "ipvs-bench"
LAN = "198.19.255.254/16"  # real servers live in 198.19.0.0/16, routed via a dummy link
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class BenchError(RuntimeError):
    pass


# --- plumbing ---------------------------------------------------------------------------------


def run(argv: Sequence[str], timeout: float, stdin: str | None = None) -> str:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@contextmanager
def inside(netns: str) -> Iterator[None]:
    """Run the calling thread (and processes it starts) in ``netns``."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield
    finally:
        _libc.setns(own, CLONE_NEWNET)
        os.close(target)
        os.close(own)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return {
        "kernel": os.uname().release,
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": sys.version.split()[0],
        "ipvsadm": run(["ipvsadm", "--version"], 30).strip(),
    }


def vip(i: int) -> str:
    return str(ipaddress.IPv4Address("198.18.0.1") + i)


def rip(i: int, j: int, dests: int) -> str:
    # 198.19.0.0/16 holds 65 534 hosts; beyond that services share real-server addresses,
    # which the kernel allows (a destination is unique only within its service).
    return str(ipaddress.IPv4Address("198.19.0.1") + (i * dests + j) % 65_000)


def virtual_server(i: int, dests: int, replaced: int | None = None) -> dict[str, object]:
    """The VirtualServer whose kernel table is service ``i`` of :func:`build`."""
    reals = [rip(i, j, dests) for j in range(dests)]
    if replaced is not None:
        reals[replaced] = "198.19.255.1"  # one endpoint replaced by another
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {
            "name": f"vs{i}",
            "namespace": "bench",
            "generation": 1,
            "resourceVersion": str(i + 1 if replaced is None else 10**6 + i),
        },
        "spec": {
            "address": vip(i),
            "ports": [{"port": 80, "targetPort": 8080}],
            "scheduler": {"name": "wlc"},
            "backends": {"static": [{"address": a} for a in reals]},
        },
    }


def served_page(count: int, dests: int, start: int, limit: int) -> str:
    """One page of a list of ``count`` objects of :func:`virtual_server` as the API server
    serves them (``tests.served``: CRD defaults, managedFields, kubectl's last-applied
    annotation, the operator's status), as JSON text; ``continue`` is the next start."""
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    from tests.served import served

    end = min(count, start + limit) if limit else count
    page = [served(virtual_server(i, dests), i, defaults=True) for i in range(start, end)]
    more = str(end) if end < count else ""
    return json.dumps({"metadata": {"resourceVersion": "1", "continue": more}, "items": page})


def _pages(count: int, dests: int) -> Iterator[tuple[int, str]]:
    """Every page the agent's list asks for (pages of ``cluster.LIST_PAGE``) with its start,
    made one at a time."""
    from ipvs_agent import cluster

    for start in range(0, count, cluster.LIST_PAGE):
        yield start, served_page(count, dests, start, cluster.LIST_PAGE)


def served_pages(count: int, dests: int) -> dict[int, str]:
    """Every page the agent's list asks for, by start."""
    return dict(_pages(count, dests))


def write_pages(count: int, dests: int, path: Path) -> None:
    """:func:`served_pages`, one page a line, made and written one at a time (a list of
    10 000 objects is tens of MB of text)."""
    with path.open("w") as out:
        for _, text in _pages(count, dests):
            out.write(text + "\n")


def listed_mirror(
    count: int,
    dests: int,
    pages: dict[int, str] | Path | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[dict[str, object]]:
    """What the agent's VirtualServer mirror holds after listing ``count`` of the objects of
    :func:`virtual_server` as the API server serves them: through the agent's own
    ``cluster.Mirror``, in pages parsed from JSON (what the kubernetes client does with a
    custom object list's body), each object kept by the same transform
    (``cluster.kept_virtual_server``: trimmed and read), or by ``transform``. ``pages``
    (:func:`served_pages`) are served as they are, or read a line at a time from a file
    (:func:`write_pages`: the memory child, whose heap then sees only what the agent's
    sees, one response body at a time); without them each page is made when asked for."""
    import threading

    from ipvs_agent import cluster

    lines: Iterator[str] | None = None

    def list_fn(limit: int = 0, _continue: str = "", **_: object) -> object:
        start = int(_continue or 0)
        if lines is not None:
            text = next(lines)
        elif isinstance(pages, dict):
            text = pages[start]
        else:
            text = served_page(count, dests, start, limit)
        return json.loads(text)

    api: Any = None  # lists are plain dicts: the client is never asked to convert one
    mirror = cluster.Mirror(
        "virtualservers",
        list_fn,
        api,
        threading.Event(),
        transform=transform or cluster.kept_virtual_server,
    )
    if isinstance(pages, Path):
        with pages.open() as file:
            lines = iter(file)
            mirror._relist()
    else:
        mirror._relist()
    return mirror.items()


class OwnsAll:
    """The reconciler's host (``reconciler.Host``) for a table this benchmark made: every
    service is ours; no nftables, state file or addresses (not what is measured)."""

    def __init__(self, keys: Iterable[ServiceKey]) -> None:
        from ipvs_agent.host.nftables import Ruleset

        self.ruleset = Ruleset.of(keys)

    def recorded(self) -> Ruleset:
        return self.ruleset

    def record(self, ruleset: Ruleset) -> list[Repair]:
        self.ruleset = ruleset
        return []

    def sync_addresses(self, wanted: set[IPAddress]) -> None:
        pass


def build(services: int, dests: int) -> tuple[list[object], str]:
    """The ops for services x dests (TCP, wlc, NAT) and the equivalent ipvsadm restore file."""
    from ipvs_agent.model import Dest, DestKey, Protocol, Service, ServiceKey
    from ipvs_agent.ops import Op, OpKind

    ops: list[object] = []
    lines: list[str] = []
    for i in range(services):
        address = vip(i)
        service = Service(ServiceKey.for_address(ipaddress.ip_address(address), Protocol.TCP, 80))
        ops.append(Op(OpKind.ADD_SERVICE, service))
        lines.append(f"-A -t {address}:80 -s wlc")
        for j in range(dests):
            real = rip(i, j, dests)
            ops.append(Op(OpKind.ADD_DEST, service, Dest(DestKey(real, 8080))))
            lines.append(f"-a -t {address}:80 -r {real}:8080 -m -w 1")
    return ops, "\n".join(lines) + "\n"


# --- measurements -----------------------------------------------------------------------------


def bench_program_and_read(args: argparse.Namespace) -> dict[str, object]:
    started = time.perf_counter()
    import_started = time.perf_counter()
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.ops import Op

    imported = time.perf_counter() - import_started
    ops, restore = build(args.services, args.dests)
    typed_ops: list[Op] = [op for op in ops if isinstance(op, Op)]
    open_started = time.perf_counter()
    kernel = IPVSKernel(netns=NETNS)
    opened = time.perf_counter() - open_started
    results: dict[str, object] = {"import_s": imported, "open_s": opened}

    def flush() -> None:
        with inside(NETNS):
            run(["ipvsadm", "-C"], args.step_timeout)

    def ipvsadm_restore() -> None:
        with inside(NETNS):
            run(["ipvsadm", "-R"], args.step_timeout, stdin=restore)

    def ours() -> None:
        failed = [r for r in kernel.apply(typed_ops) if not r.ok]
        if failed:
            raise BenchError(
                f"{len(failed)} ops failed, first: {failed[0].op}: {failed[0].message}"
            )

    program_ipvsadm, program_ours = [], []
    for _ in range(args.rounds):
        flush()
        program_ipvsadm.append(timed(ipvsadm_restore))
        by_ipvsadm = kernel.dump()
        flush()
        program_ours.append(timed(ours))
        if kernel.dump() != by_ipvsadm:
            raise BenchError("apply() and ipvsadm -R programmed different tables")
        if time.perf_counter() - started > args.deadline / 2:
            break
    dests = sum(len(o.dests) for o in by_ipvsadm.values())
    if (len(by_ipvsadm), dests) != (args.services, args.services * args.dests):
        raise BenchError(
            f"expected {args.services} x {args.dests}, found {len(by_ipvsadm)}/{dests}"
        )

    def ipvsadm_list(*extra: str) -> Callable[[], None]:
        def list_table() -> None:
            with inside(NETNS):
                subprocess.run(["ipvsadm", "-Ln", *extra], stdout=subprocess.DEVNULL,
                               timeout=args.step_timeout, check=True)  # fmt: skip

        return list_table

    # cold: a new IPVSKernel (nothing learned, no previous table to share entries with);
    # warm: the same one again, as the agent's periodic resync runs
    read: dict[str, list[float]] = {
        "ipvsadm -Ln": [], "ipvsadm -Ln --stats": [], "dump cold": [], "dump warm": [],
    }  # fmt: skip
    for _ in range(args.rounds):
        read["ipvsadm -Ln"].append(timed(ipvsadm_list()))
        with IPVSKernel(netns=NETNS) as fresh:
            read["dump cold"].append(timed(fresh.dump))
        read["ipvsadm -Ln --stats"].append(timed(ipvsadm_list("--stats")))
        kernel.dump()
        read["dump warm"].append(timed(kernel.dump))
    fast = kernel.decoder.dests.hits  # how many dests took the fast path
    kernel.close()
    best = {name: min(times) for name, times in read.items()}
    results["pass"] = bench_pass(args, best["ipvsadm -Ln"])
    flush()
    results |= {
        "program": {
            "ipvsadm -R": min(program_ipvsadm),
            "apply": min(program_ours),
            "ratio": min(program_ours) / min(program_ipvsadm),
            "rounds": len(program_ours),
        },
        "read": {
            **best,
            "cold ratio vs -Ln": best["dump cold"] / best["ipvsadm -Ln"],
            "warm ratio vs -Ln": best["dump warm"] / best["ipvsadm -Ln"],
            "cold ratio vs -Ln --stats": best["dump cold"] / best["ipvsadm -Ln --stats"],
            "fast path dests": fast,
        },
    }
    return results


def bench_pass(args: argparse.Namespace, ipvsadm_ln: float) -> dict[str, object]:
    """(d) the agent's own pass over the programmed table: its list of the VirtualServers, the
    first pass of a restarted agent, resyncs, then one endpoint change."""
    from ipvs_agent import cluster, trim
    from ipvs_agent.desired import Node
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.reconciler import Memory, reconcile
    from ipvs_agent.snapshot import ReadCache, take
    from tests.served import served

    # The API lists, the agent's side of them: JSON pages parsed and trimmed into its mirror
    # (the API server's own time is another machine's, and not measured here). The mirror
    # also reads each VirtualServer as it arrives (validation, once per version), which the
    # first pass used to do: timed apart ("bare": parsed and trimmed only), so the goal's
    # ratio charges that reading to the agent as before, not to the lists.
    pages = served_pages(args.services, args.dests)
    lists, bare = [], []
    for _ in range(args.rounds):
        began = time.perf_counter()
        listed_mirror(args.services, args.dests, pages, trim.virtual_server)
        bare.append(time.perf_counter() - began)
        began = time.perf_counter()
        objects = listed_mirror(args.services, args.dests, pages)
        lists.append(time.perf_counter() - began)
    status_writes = status_write_costs(pages, objects)
    del pages
    with IPVSKernel(netns=NETNS) as other:  # the ownership record, read from the state file
        host = OwnsAll(set(other.dump()))  # in the agent: not a dump of the pass's socket
    with IPVSKernel(netns=NETNS) as kernel:
        node = Node("bench", {}, kernel.info())
        memory, cache = Memory(), ReadCache()  # what the agent keeps between passes

        parts: dict[str, float] = {}
        dump = kernel.dump

        def timed_dump(expected: Any = None) -> Any:
            began = time.perf_counter()
            try:
                return dump(expected)
            finally:
                parts["dump"] = time.perf_counter() - began

        kernel.dump = timed_dump  # type: ignore[method-assign]

        def one_pass() -> tuple[float, list[str]]:
            began = time.perf_counter()
            snap = take(objects, [], node, cache=cache)
            parts["snapshot"] = time.perf_counter() - began
            result = reconcile(snap, kernel, host, memory, time.monotonic())
            took = time.perf_counter() - began
            parts["plan, diff and the rest"] = took - parts["snapshot"] - parts["dump"]
            if result.failures:
                raise BenchError(f"pass failed: {result.failures[0]}")
            return took, [str(op) for op in result.ops]

        first, first_ops = one_pass()  # a restarted agent: new socket, nothing in memory
        first_parts = dict(parts)
        resync, resync_parts = [], {}
        for _ in range(args.rounds):
            took, ops = one_pass()
            if ops:
                raise BenchError(f"a resync of an unchanged table sent {ops[:3]}")
            resync.append(took)
            resync_parts = dict(parts)
        middle = args.services // 2
        changed = served(virtual_server(middle, args.dests, replaced=3), middle, defaults=True)
        began = time.perf_counter()  # the watch event's arrival in the mirror, then the pass
        objects[middle] = cluster.kept_virtual_server(json.loads(json.dumps(changed)))
        arrived = time.perf_counter() - began
        change, change_ops = one_pass()
    listed, listed_bare = min(lists), min(bare)
    reading = max(0.0, listed - listed_bare)  # the mirror's reading of the VirtualServers
    return {
        "list (the agent's side, read on arrival)": listed,
        "list, parsed and trimmed only": listed_bare,
        "first pass (restart)": first,
        "first pass ops": len(first_ops),
        "first pass + the mirror's reading": first + reading,
        "first pass ratio vs -Ln + list": (first + reading) / (ipvsadm_ln + listed_bare),
        "first pass parts": first_parts,
        "resync pass": min(resync),
        "resync ratio vs -Ln": min(resync) / ipvsadm_ln,
        "resync pass parts (the last)": resync_parts,
        "one endpoint change": arrived + change,
        "one endpoint change ops": change_ops,
        "status writes (each VirtualServer once)": status_writes,
    }


def status_write_costs(pages: dict[int, str], kept: list[dict[str, Any]]) -> dict[str, float]:
    """The operator's status write on every listed VirtualServer (a new version, its
    conditions and counts), as the agent's mirror takes each: the reading of the last
    version kept (``cluster.kept_again``) against the object read anew."""
    from ipvs_agent import cluster
    from tests.served import status_written

    before = {cluster.Mirror._key(o): o for o in kept}
    written = [
        status_written(obj, f"{obj['metadata']['resourceVersion']}-status")
        for text in pages.values()
        for obj in json.loads(text)["items"]
    ]
    began = time.perf_counter()
    again = [cluster.kept_again(obj, before[cluster.Mirror._key(obj)]) for obj in written]
    reuse = time.perf_counter() - began
    if any(entry is None for entry in again):
        raise BenchError("a status write was read anew")
    began = time.perf_counter()
    for obj in written:
        cluster.kept_virtual_server(obj)
    anew = time.perf_counter() - began
    return {"reading kept": reuse, "read anew": anew, "ratio": reuse / anew}


MEMORY_CHILD = r"""
import gc, json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
start = rss()
from ipvs_agent.kernel.ipvs import IPVSKernel
reader = IPVSKernel(netns=sys.argv[1])
gc.collect()
opened = rss()
# Every module first, so that the rows up to the client are the agent before any table
# (until 2026-12-05 they came after the dump below, whose freed memory they reused).
agent = None
try:
    import ipvs_agent.agent  # the agent's other modules (the kubernetes client: below)
    gc.collect()
    agent = rss()
except Exception as error:  # report, do not fail the memory figure
    agent = repr(error)
# The in-cluster agent's steady state: the mirror's VirtualServers, and one whole
# reconcile pass (snapshot, plan, dump, diff) with its plan and observed table kept, as
# Agent.last keeps them between passes; then the drift audit's own reading (audit.Auditor:
# a second socket that keeps its last dump too).
import time
sys.path.insert(0, sys.argv[2])
import bench_kernel
from ipvs_agent.desired import Node
from ipvs_agent.reconciler import Memory, reconcile
from ipvs_agent.snapshot import ReadCache, take
import ipvs_agent.cluster  # the kubernetes client, which the agent's mirrors use
gc.collect()
with_client = rss()
table = reader.dump()  # the dump on its own, cold; its memory is reused by what follows
gc.collect()
held = rss()
services = len(table)
dests = sum(len(o.dests) for o in table.values())
keys = set(table)
del table
reader.close()
del reader  # it keeps its last dump (for the next one's shortcut)
gc.collect()
from pathlib import Path
mirror = bench_kernel.listed_mirror(int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[7]))
gc.collect()
with_mirror = rss()
share = sys.argv[5] == "share"
def dumps(kernel):
    # "copy": as before the dump lent the plan's Dests (the same boot's comparison)
    return kernel.dump if share else lambda expected=None: IPVSKernel.dump(kernel)
kernel = IPVSKernel(netns=sys.argv[1])
kernel.dump = dumps(kernel)
host = bench_kernel.OwnsAll(keys)
last_memory = Memory()
node, cache = Node("bench", {}, kernel.info()), ReadCache()  # as the agent keeps them
last = reconcile(take(mirror, [], node, cache=cache), kernel, host, last_memory, time.monotonic())
gc.collect()
after_pass = rss()
# What the reading keeps: RSS hides it in what the pass left free, tracemalloc counts it (but
# its own bookkeeping then inflates the RSS figures after it).
import tracemalloc
trace = sys.argv[6] == "trace"
auditor = IPVSKernel(netns=sys.argv[1])
if trace:
    tracemalloc.start()
reading = dumps(auditor)(last.plan.table)
gc.collect()
audit_live = tracemalloc.get_traced_memory()[0] / 2**20 if trace else None
tracemalloc.stop()
with_audit = rss()
again = reconcile(take(mirror, [], node, cache=cache), kernel, host, last_memory, time.monotonic())
gc.collect()
second_pass = rss()
# How much of that is free memory glibc keeps rather than live objects: hand it back, read again.
import ctypes
ctypes.CDLL("libc.so.6").malloc_trim(0)
trimmed = rss()
print(json.dumps({"python_start_mb": start, "with_kernel_layer_mb": opened,
                  "holding_dump_mb": held, "dump_mb": held - with_client,
                  "with_agent_imports_mb": agent, "with_client_imports_mb": with_client,
                  "with_mirror_mb": with_mirror, "agent_after_pass_mb": after_pass,
                  "with_audit_reading_mb": with_audit, "audit_reading_live_mb": audit_live,
                  "after_second_pass_mb": second_pass, "after_malloc_trim_mb": trimmed,
                  "second_pass_ops": len(again.ops),
                  "dests": dests, "pass_ops": len(last.ops), "services": services,
                  "mode": sys.argv[5], "traced": trace}))
"""


def bench_memory(args: argparse.Namespace) -> dict[str, object]:
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.ops import Op

    built, _ = build(args.memory_services, args.dests)
    ops = [op for op in built if isinstance(op, Op)]
    del built
    with IPVSKernel(netns=NETNS, batch_size=1024) as kernel:
        program = timed(lambda: kernel.apply(ops))
    ops.clear()
    gc.collect()
    child = [sys.executable, "-c", MEMORY_CHILD, NETNS, str(CHECKOUT / "bench")]
    measured: dict[str, object] = {"programming_s": program}
    # The list's response bodies, made here: the child only parses them, as the agent does.
    pages = Path(tempfile.mkdtemp(prefix="bench-kernel-")) / "pages.jsonl"
    try:
        write_pages(args.memory_services, args.dests, pages)
        for mode in ("share", "copy"):
            measured[mode] = _memory_child(args, child, mode, pages)
    finally:
        shutil.rmtree(pages.parent, ignore_errors=True)
    return measured


def _memory_child(
    args: argparse.Namespace, child: list[str], mode: str, pages: Path
) -> dict[str, object]:
    """One fresh process's figures (:data:`MEMORY_CHILD`) in ``mode`` (share or copy)."""
    trace = "trace" if args.trace_audit else "rss"
    out = run([*child, str(args.memory_services), str(args.dests), mode, trace, str(pages)],
              args.step_timeout)  # fmt: skip
    found: dict[str, object] = json.loads(out)
    if (found["services"], found["dests"], found["pass_ops"]) != (
        args.memory_services,
        args.memory_services * args.dests,
        0,
    ):
        raise BenchError(f"memory table incomplete or the pass wrote: {found}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2000)
    parser.add_argument("--dests", type=int, default=10)
    parser.add_argument("--memory-services", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-timeout", type=float, default=600.0)
    parser.add_argument("--deadline", type=float, default=1500.0, help="whole run, seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-only", action="store_true", help="only (c)")
    parser.add_argument(
        "--trace-audit", action="store_true", help="(c): count what the audit's reading keeps"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_kernel: needs root and an IPVS kernel (run it in the test VM)")
    sys.path.insert(0, str(CHECKOUT))

    def out_of_time(signum: int, frame: object) -> None:
        raise BenchError(f"the benchmark ran longer than --deadline {args.deadline:.0f}s")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.deadline))
    report: dict[str, object] = {"machine": machine(), "args": vars(args) | {"json": None}}
    run(["ip", "netns", "add", NETNS], 60)
    try:
        run(["ip", "-n", NETNS, "-batch", "-"], 60, stdin=(
            "link set lo up\nlink add lan type dummy\nlink set lan up\n"
            f"addr add {LAN} dev lan\n"
        ))  # fmt: skip
        if not args.memory_only:
            report |= bench_program_and_read(args)
            print(json.dumps(report, indent=2), file=sys.stderr, flush=True)  # if (c) fails
        report["memory"] = bench_memory(args)
    finally:
        run(["ip", "netns", "del", NETNS], 120)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
