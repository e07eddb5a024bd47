"""Command line of the node agent (``ipvs-agent``).

``run`` is the in-cluster agent. ``plan``, ``apply`` and ``status`` work without a cluster, on
VirtualServer (and EndpointSlice, Node) manifests, through the very same reconcile pass:
``plan`` prints the kernel operations the manifests would cause on this host, ``apply`` makes
them, ``status`` shows the live table like ``ipvsadm -Ln`` with the Kubernetes name of each
service. ``validate`` checks manifests as the API server would.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ipvs_agent import __version__
from ipvs_agent.desired import State
from ipvs_agent.model import Timeouts
from ipvs_agent.reconciler import Memory, PassResult, reconcile
from ipvs_api import InvalidObject, constants, load

if TYPE_CHECKING:
    from ipvs_agent.host.podnetns import PodNamespaces

log = logging.getLogger("ipvs_agent")


def validate_files(paths: Sequence[Path]) -> int:
    """Check every ipvs.io object in the files with the API's own schema and rules."""
    failures = 0
    for obj in load.read_manifests(paths):
        if not str(obj.get("apiVersion", "")).startswith(constants.GROUP + "/"):
            continue
        kind = obj.get("kind")
        name = (obj.get("metadata") or {}).get("name", "?")
        try:
            if kind == constants.VIRTUAL_SERVER:
                obj.setdefault("metadata", {}).setdefault("namespace", "default")
                load.virtual_server(obj)
            elif kind == constants.ADDRESS_POOL:
                load.address_pool(obj)
            else:
                continue
        except InvalidObject as exc:
            failures += 1
            print(f"{kind}/{name}: invalid", file=sys.stderr)
            for err in exc.errors:
                print(f"  {err}", file=sys.stderr)
        else:
            print(f"{kind}/{name}: valid")
    return 1 if failures else 0


def _offline_pass(args: argparse.Namespace, dry_run: bool) -> tuple[PassResult, int]:
    from ipvs_agent import snapshot
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.system import LinuxHost, prepare_node

    objects = list(load.read_manifests(args.filename or []))
    vss, slices, node_obj = snapshot.split_manifests(objects, args.namespace)
    with IPVSKernel() as kernel:
        info = kernel.info()
        if not dry_run:
            prepare_node(info.release)  # the same director sysctls as the in-cluster agent
        host = LinuxHost(
            args.interface,
            read_only=dry_run,
            pods=_pod_namespaces(args),
            sysctl_root=args.sysctl_root,
        )
        node = snapshot.node_from(node_obj, args.node_name, info)
        if not node.addresses:  # no Node manifest with addresses: this host's own
            node = snapshot.node_from(node_obj, args.node_name, info, host.local_addresses())
        snap = snapshot.take(vss, slices, node)
        result = reconcile(snap, kernel, host, Memory(), time.monotonic(), dry_run=dry_run)
    failed = [k for k, o in result.outcomes.items() if o.state is State.FAILED]
    return result, 1 if failed or result.failures else 0


def _pod_namespaces(args: argparse.Namespace) -> PodNamespaces:
    from ipvs_agent.host._netns import NETNS_RUN_DIR
    from ipvs_agent.host.podnetns import PodNamespaces

    return PodNamespaces(args.netns_dir or (NETNS_RUN_DIR,), args.proc or None)


def _print_outcomes(result: PassResult) -> None:
    for key in sorted(result.outcomes):
        o = result.outcomes[key]
        detail = f" {o.reason}: {o.message}" if o.reason else ""
        roles = ",".join(sorted(str(r) for r in o.roles))
        print(f"# VirtualServer {key}: {o.state}{detail}" + (f" [{roles}]" if roles else ""))
    for target in result.plan.real_server_targets():
        spec = result.plan.real_servers[target]
        vips = " ".join(sorted(str(v) for v in spec.vips)) or "-"
        decap = " ".join(
            sorted(
                f"{d.type.name.lower()}{f':{d.port}' if d.port else ''}@{d.local}"
                for d in spec.decap
            )
        )
        print(f"# real server in {target}: VIPs {vips}" + (f"; decap {decap}" if decap else ""))


def plan_command(args: argparse.Namespace) -> int:
    result, code = _offline_pass(args, dry_run=True)
    _print_outcomes(result)
    for op in result.ops:
        print(op)
    print(f"# {len(result.ops)} operation(s)" + ("" if result.ops else ": the kernel matches"))
    return code


def apply_command(args: argparse.Namespace) -> int:
    result, code = _offline_pass(args, dry_run=False)
    _print_outcomes(result)
    for r in result.results:
        print(("" if r.ok else f"FAILED ({r.message or r.error}): ") + str(r.op))
    print(f"# {len(result.results) - len(result.failures)} applied, {len(result.failures)} failed")
    return code


def status_command(args: argparse.Namespace) -> int:
    from ipvs_agent import snapshot
    from ipvs_agent.desired import plan
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.show import render_table

    objects = list(load.read_manifests(args.filename or []))
    vss, slices, node_obj = snapshot.split_manifests(objects, args.namespace)
    with IPVSKernel() as kernel:
        info = kernel.info()
        table = kernel.dump()
    snap = snapshot.take(vss, slices, snapshot.node_from(node_obj, args.node_name, info))
    owners = plan(snap.virtual_servers, snap.endpoints, snap.node).owners
    sys.stdout.write(render_table(table, owners, info))
    return 0


def run_command(args: argparse.Namespace) -> int:
    from kubernetes import client, config

    from ipvs_agent.agent import Agent, Settings, serve_http
    from ipvs_agent.cluster import mirrors
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.report import NodeReporter
    from ipvs_agent.system import LinuxHost, prepare_node

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api = client.ApiClient()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    changed = threading.Event()
    with IPVSKernel() as kernel:
        info = kernel.info()
        prepare_node(info.release, root=args.sysctl_root)
        timeouts = Timeouts(*args.timeouts)
        if timeouts != Timeouts():
            kernel.set_timeouts(timeouts)
        agent = Agent(
            Settings(args.node_name, resync_seconds=args.resync_seconds),
            kernel,
            LinuxHost(args.interface, pods=_pod_namespaces(args), sysctl_root=args.sysctl_root),
            mirrors(api, args.node_name, changed),
            changed,
            report=NodeReporter(api, args.node_name).report,
        )
        server = serve_http(agent, args.metrics_port, args.metrics_address)
        log.info("ipvs-agent %s on node %s (IPVS %s)", __version__, args.node_name, info.version)
        agent.run(stop)
        server.shutdown()
    # The kernel table is left as it is: traffic keeps flowing while the agent restarts.
    return 0


def _timeouts(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3 or any(p < 0 for p in parts):
        raise argparse.ArgumentTypeError("expected TCP,TCPFIN,UDP seconds, e.g. 900,120,300")
    return parts[0], parts[1], parts[2]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ipvs-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_files(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument(
            "-f",
            "--filename",
            type=Path,
            nargs="+",
            action="extend",
            required=required,
            help="manifest files (VirtualServer, EndpointSlice, Node)",
        )
        p.add_argument(
            "-n", "--namespace", default="default", help="namespace of objects that name none"
        )

    def with_node(p: argparse.ArgumentParser) -> None:
        p.add_argument("--node-name", default=os.environ.get("NODE_NAME", socket.gethostname()))
        p.add_argument(
            "--interface", default="ipvs0", help="dummy interface holding the virtual addresses"
        )
        p.add_argument(
            "--netns-dir",
            action="append",
            help="where pods' named network namespaces are (repeatable; default /run/netns)",
        )
        p.add_argument(
            "--proc",
            default="/proc",
            help="the host's /proc, to find pods' namespaces as /proc/PID/ns/net ('' = don't)",
        )
        p.add_argument(
            "--sysctl-root",
            default="/proc/sys",
            help="a writable /proc/sys (its net/ is enough) for the real-server sysctls; "
            "in a container, a mount of the node's, e.g. /host/proc/sys",
        )

    val = sub.add_parser("validate", help="validate VirtualServer and AddressPool manifests")
    with_files(val, required=True)
    for name, text in (
        ("plan", "print the kernel operations the manifests would cause"),
        ("apply", "make the kernel match the manifests"),
    ):
        p = sub.add_parser(name, help=text)
        with_files(p, required=True)
        with_node(p)
    st = sub.add_parser("status", help="show the live IPVS table with Kubernetes names")
    with_files(st, required=False)
    with_node(st)
    run = sub.add_parser("run", help="run the in-cluster agent")
    with_node(run)
    run.add_argument("--resync-seconds", type=float, default=30.0)
    run.add_argument("--metrics-port", type=int, default=9753)
    run.add_argument("--metrics-address", default="0.0.0.0")
    run.add_argument(
        "--timeouts",
        type=_timeouts,
        default=(0, 0, 0),
        help="IPVS TCP,TCPFIN,UDP timeouts in seconds (0 leaves one as it is)",
    )

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    commands = {
        "validate": lambda a: validate_files(a.filename),
        "plan": plan_command,
        "apply": apply_command,
        "status": status_command,
        "run": run_command,
    }
    return int(commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
