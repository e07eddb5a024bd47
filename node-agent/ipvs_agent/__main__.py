"""Command line of the node agent (``ipvs-agent``).

``run`` is the in-cluster agent. ``plan``, ``apply`` and ``status`` work without a cluster, on
VirtualServer (and EndpointSlice, Node) manifests, through the very same reconcile pass:
``plan`` prints the kernel operations the manifests would cause on this host, ``apply`` makes
them, ``status`` shows the live table like ``ipvsadm -Ln`` with the Kubernetes name of each
service. ``validate`` checks manifests as the API server would. ``cleanup`` removes everything
the agent created on this host (and nothing else).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from ipvs_agent import __version__
from ipvs_agent.announce.members import DURATION, RENEW
from ipvs_agent.desired import PROTECTED_PORTS, State
from ipvs_agent.host._netns import HostError
from ipvs_agent.host.state import DEFAULT_DIR as DEFAULT_STATE_DIR
from ipvs_agent.model import Timeouts
from ipvs_agent.reconciler import Memory, PassResult, reconcile
from ipvs_api import InvalidObject, constants, load

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from ipvs_agent.announce.bgp.inputs import BGPAnnouncer
    from ipvs_agent.announce.speaker import Speaker
    from ipvs_agent.cluster import Mirror
    from ipvs_agent.host.podnetns import PodNamespaces
    from ipvs_agent.syncd import SyncSettings
    from ipvs_agent.system import LinuxHost

log = logging.getLogger("ipvs_agent")


class CliError(Exception):
    """A problem the user can fix, said in one line (no traceback)."""


#: Errors printed as one line with exit status 1: the kernel (no IPVS, refused ops), the host
#: (nft missing, a device in the way), files and manifests, credentials.
CLI_ERRORS = (CliError, OSError, HostError, InvalidObject, yaml.YAMLError)


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


def _host(args: argparse.Namespace, read_only: bool = False) -> LinuxHost:
    from ipvs_agent.system import LinuxHost

    return LinuxHost(
        args.interface,
        read_only=read_only,
        pods=_pod_namespaces(args),
        sysctl_root=args.sysctl_root,
        state_dir=args.state_dir or None,
    )


def _offline_pass(args: argparse.Namespace, dry_run: bool) -> tuple[PassResult, int]:
    from ipvs_agent import snapshot
    from ipvs_agent.kernel.ipvs import IPVSKernel

    objects = list(load.read_manifests(args.filename or []))
    vss, slices, node_obj = snapshot.split_manifests(objects, args.namespace)
    with IPVSKernel() as kernel:
        info = kernel.info()
        host = _host(args, read_only=dry_run)
        ports = args.protected_ports
        node = snapshot.node_from(node_obj, args.node_name, info, protected_ports=ports)
        if not node.addresses:  # no Node manifest with addresses: this host's own
            node = snapshot.node_from(
                node_obj, args.node_name, info, host.local_addresses(), protected_ports=ports
            )
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


def cleanup_command(args: argparse.Namespace) -> int:
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.uninstall import cleanup

    with IPVSKernel() as kernel:
        report = cleanup(kernel, _host(args))
    for line in report.done:
        print(line)
    for line in report.errors:
        print(f"FAILED: {line}", file=sys.stderr)
    print(f"# {len(report.done)} done, {len(report.errors)} failed")
    return 1 if report.errors else 0


def _api_client() -> ApiClient:
    from kubernetes import client, config

    from ipvs_agent.cluster import configure

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=configuration)
        except config.ConfigException as error:
            raise CliError(f"no in-cluster service account and no kubeconfig: {error}") from None
    return client.ApiClient(configure(configuration))


def _uninstalling(mirror: Mirror, wait: float = 2.0) -> bool:
    """Whether the agent's DaemonSet is gone or going: an uninstall, not a restart.

    Only a DaemonSet the agent has seen counts (a wrong ``--daemonset`` never cleans). Its
    deletion reaches the watch before the kubelet stops the pod (the garbage collector deletes
    the pods after the DaemonSet), but allow ``wait`` seconds for it.
    """
    deadline = time.monotonic() + wait
    while True:
        if mirror.synced.is_set() and mirror.seen:
            items = mirror.items()
            if not items or any((i.get("metadata") or {}).get("deletionTimestamp") for i in items):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)  # poll interval while the last watch events come in


def run_command(args: argparse.Namespace) -> int:
    from ipvs_agent.agent import Agent, Settings, serve_http
    from ipvs_agent.audit import Auditor
    from ipvs_agent.cluster import daemon_set_mirror, mirrors
    from ipvs_agent.health import metrics as health_metrics
    from ipvs_agent.health.checker import Checker
    from ipvs_agent.kernel.ipvs import IPVSKernel
    from ipvs_agent.report import NodeReporter, Outbox
    from ipvs_agent.syncd import SyncDaemons
    from ipvs_agent.uninstall import cleanup

    global _threads_started
    api = _api_client()
    _threads_started = True
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    changed = threading.Event()
    own: Mirror | None = None
    own_stop = threading.Event()
    if args.daemonset:
        namespace, _, name = args.daemonset.partition("/")
        own = daemon_set_mirror(api, namespace, name, changed)
        threading.Thread(target=own.run, args=(own_stop,), name="mirror-ds", daemon=True).start()
    reporter = NodeReporter(api, args.node_name)
    outbox = Outbox(reporter.report)
    outbox.start(own_stop)
    speaker = _speaker(args, api, own_stop)
    bgp = _bgp(args, api, own_stop)
    leaving: list[Callable[[], None]] = []
    if speaker is not None:
        leaving.append(speaker.leave)
    if bgp is not None:
        leaving.append(bgp.speaker.leave)
    if leaving:
        # On SIGTERM hand the VIPs over at once (stop answering, give the Lease up; withdraw
        # the BGP routes), from threads of their own: the main thread may be inside a pass.
        def stopping(*_: object) -> None:
            stop.set()
            for leave in leaving:
                threading.Thread(target=leave, name="handover", daemon=True).start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stopping)
    with IPVSKernel() as kernel:
        info = kernel.info()
        timeouts = Timeouts(*args.timeouts)
        if timeouts != Timeouts():
            kernel.set_timeouts(timeouts)
        host = _host(args)
        sync = SyncDaemons(_sync_settings(args), host.state)
        checker = Checker(changed.set, workers=args.probe_workers)
        # The drift audit's own netlink socket and nft reader (closed by its thread).
        auditor = Auditor(IPVSKernel(), host.reader()) if args.full_resync_seconds else None
        agent = Agent(
            Settings(
                args.node_name,
                resync_seconds=args.resync_seconds,
                full_resync_seconds=args.full_resync_seconds,
                protected_ports=frozenset(args.protected_ports) | {args.metrics_port},
            ),
            kernel,
            host,
            mirrors(api, args.node_name, changed, bgp=bgp is not None),
            changed,
            report=outbox.put,
            speaker=speaker,
            bgp=bgp,
            sync=sync,
            checker=checker,
            auditor=auditor,
        )
        reporter.sizes = agent.entries.size  # the sizes of the entries the agent reuses
        agent.metrics.watch_mirrors(agent.mirrors)
        checker.observer = health_metrics.register(agent.metrics.registry, checker)
        checker.start(own_stop)
        if speaker is not None:
            speaker.on_change = agent.send_report
            agent.metrics.watch_speaker(speaker)
        if bgp is not None:
            bgp.speaker.on_change = agent.send_report
            agent.metrics.watch_bgp(bgp.speaker)
        server = serve_http(agent, args.metrics_port, args.metrics_address)
        log.info("ipvs-agent %s on node %s (IPVS %s)", __version__, args.node_name, info.version)
        agent.run(stop)
        for leave in leaving:
            leave()  # done already by the signal's threads, unless stopped otherwise
        if leaving:
            # The last report says this node announces nothing (no VIP answered, no route
            # announced): the status must not name a node that stopped (bounded: the API
            # server may be away).
            agent.send_report()
            outbox.flush(3.0)
        server.shutdown()
        if own is not None and _uninstalling(own):
            log.info("the DaemonSet %s is deleted: removing what the agent created", args.daemonset)
            cleanup(kernel, host)
    own_stop.set()
    # Otherwise the kernel table is left as it is: traffic keeps flowing while the agent restarts.
    return 0


def _speaker(args: argparse.Namespace, api: ApiClient, stop: threading.Event) -> Speaker | None:
    """The layer-2 speaker and its threads (None: layer 2 off, or no namespace for Leases)."""
    from kubernetes import client

    from ipvs_agent.announce.members import LeaseKeeper
    from ipvs_agent.announce.responder import Responder, read_nics
    from ipvs_agent.announce.speaker import Speaker
    from ipvs_agent.cluster import lease_mirror

    namespace = args.lease_namespace or os.environ.get("POD_NAMESPACE", "")
    if not args.layer2:
        if namespace:
            # A Lease left behind by an earlier run with layer 2 on (one that died) would stay
            # stale for ever, and the operator sets a stale Lease's node's reports aside.
            old = LeaseKeeper(client.CustomObjectsApi(_api_client()), namespace, args.node_name)
            threading.Thread(target=old.release, name="lease-cleanup", daemon=True).start()
        return None
    if not namespace:
        log.warning("layer-2 announcement off: no namespace for Leases (--lease-namespace)")
        return None
    wake = threading.Event()
    leases = lease_mirror(api, namespace, wake)
    keeper = LeaseKeeper(
        client.CustomObjectsApi(_api_client()),  # its own connection: writes never queue
        namespace,
        args.node_name,
        duration=args.lease_seconds,
        renew=args.renew_seconds,
    )
    responder = Responder()
    rtnl: list[Any] = []

    def nics() -> Any:  # the speaker thread's own rtnetlink sockets
        if not rtnl:
            from pyroute2 import IPRoute

            from ipvs_agent.host.rtnl import AddressReader

            rtnl.extend((IPRoute(), AddressReader()))
        return read_nics(rtnl[0], rtnl[1])

    speaker = Speaker(args.node_name, keeper, leases, responder, wake, nics=nics)
    for name, body in (
        ("mirror-leases", leases.run),
        ("lease", keeper.run),
        ("responder", responder.run),
        ("speaker", speaker.run),
    ):
        threading.Thread(target=body, args=(stop,), name=name, daemon=True).start()
    return speaker


def _bgp(args: argparse.Namespace, api: ApiClient, stop: threading.Event) -> BGPAnnouncer | None:
    """The BGP speaker and its thread (None: BGP off). ExaBGP itself starts only once this
    node has a session (a BGPPeer selects it)."""
    if not args.bgp:
        return None
    from ipvs_agent.announce.bgp.inputs import BGPAnnouncer, Secrets
    from ipvs_agent.announce.bgp.speaker import BGPSpeaker, exabgp_factory
    from ipvs_agent.cluster import secret_reader

    namespace = args.lease_namespace or os.environ.get("POD_NAMESPACE", "")
    if namespace:
        read_secret = secret_reader(api, namespace)
    else:

        def read_secret(name: str) -> dict[str, str] | None:
            log.warning("no namespace for BGP password Secrets (--lease-namespace)")
            return None

    workdir = Path(args.bgp_dir or Path(args.state_dir or "/run/ipvs-agent") / "bgp")
    speaker = BGPSpeaker(exabgp_factory(workdir))
    threading.Thread(target=speaker.run, args=(stop,), name="bgp", daemon=True).start()
    return BGPAnnouncer(speaker, Secrets(read_secret))


def _sync_settings(args: argparse.Namespace) -> SyncSettings | None:
    from ipvs_agent.syncd import SyncSettings

    if not args.sync_interface:
        return None
    return SyncSettings(
        interface=args.sync_interface,
        sync_id=args.sync_id,
        max_len=args.sync_maxlen,
        group=args.sync_group,
        port=args.sync_port,
        ttl=args.sync_ttl,
    )


def _ports(text: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected port numbers, e.g. 22,6443,10250") from None
    if any(not 0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError("ports are 1-65535")
    return ports


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
            help="a writable /proc/sys (its net/ is enough) for the sysctls the agent sets; "
            "in a container, a mount of the node's, e.g. /host/proc/sys",
        )
        p.add_argument(
            "--state-dir",
            default=DEFAULT_STATE_DIR,
            help="where the agent keeps its second ownership record and the sysctls it "
            f"changed ('' = in memory only; default {DEFAULT_STATE_DIR})",
        )
        p.add_argument(
            "--protected-ports",
            type=_ports,
            default=sorted(PROTECTED_PORTS),
            help="ports no VIP may forward to at one of the node's own addresses, comma "
            "separated ('' = none; default %(default)s)",
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
    clean = sub.add_parser(
        "cleanup", help="remove every IPVS service, address, table and setting the agent made"
    )
    with_node(clean)
    run = sub.add_parser("run", help="run the in-cluster agent")
    with_node(run)
    run.add_argument(
        "--resync-seconds",
        type=float,
        default=30.0,
        help="how often to look for drift (read beside the loop; a full pass if found)",
    )
    run.add_argument(
        "--full-resync-seconds",
        type=float,
        default=300.0,
        help="how often a full pass runs anyway (sysctls, real-server setup, routes, sync "
        "daemons); 0: no drift audit, a full pass every --resync-seconds",
    )
    run.add_argument("--metrics-port", type=int, default=9753)
    run.add_argument(
        "--metrics-address",
        default=os.environ.get("NODE_IP") or "127.0.0.1",
        help="address for /metrics, /healthz and /readyz (default: $NODE_IP, else 127.0.0.1)",
    )
    run.add_argument(
        "--layer2",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer ARP/NDP for the VIPs of pools with layer2 this node is elected for "
        "(needs CAP_NET_RAW)",
    )
    run.add_argument(
        "--lease-namespace",
        default="",
        help="namespace of the agents' Leases (default: $POD_NAMESPACE)",
    )
    run.add_argument(
        "--lease-seconds",
        type=float,
        default=DURATION,
        help="an agent whose Lease is this old is gone: its VIPs move (default %(default)s)",
    )
    run.add_argument(
        "--renew-seconds",
        type=float,
        default=RENEW,
        help="how often an agent renews its Lease (default %(default)s)",
    )
    run.add_argument(
        "--bgp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="announce the VIPs of pools with bgp to the routers of the BGPPeers that select "
        "this node, through ExaBGP",
    )
    run.add_argument(
        "--bgp-dir",
        default="",
        help="private directory for ExaBGP's configuration and socket (default: STATE_DIR/bgp)",
    )
    sync = run.add_argument_group(
        "connection sync", "the kernel's IPVS sync daemons, master and backup, on every director"
    )
    sync.add_argument(
        "--sync-interface",
        default="",
        help="interface the directors exchange connections on (multicast); '' = no sync",
    )
    sync.add_argument("--sync-id", type=int, default=0, choices=range(256), metavar="0-255",
                      help="sync id shared by the directors of one group (default 0)")  # fmt: skip
    sync.add_argument("--sync-group", default="",
                      help="multicast group (default: the kernel's, 224.0.0.81)")  # fmt: skip
    sync.add_argument("--sync-port", type=int, default=0,
                      help="UDP port (default: the kernel's, 8848)")  # fmt: skip
    sync.add_argument("--sync-maxlen", type=int, default=0,
                      help="largest sync message payload (default: from the MTU)")  # fmt: skip
    sync.add_argument("--sync-ttl", type=int, default=0,
                      help="multicast TTL (default: the kernel's, 1)")  # fmt: skip
    run.add_argument(
        "--daemonset",
        default="",
        help="NAMESPACE/NAME of the agent's DaemonSet: when it is deleted (uninstall), the "
        "agent removes what it created before it exits",
    )
    run.add_argument(
        "--probe-workers",
        type=int,
        default=16,
        help="threads that run health probes and feedback polls; each probe is bounded by its "
        "timeout, so this many cover workers x interval / timeout probes per interval "
        "(default %(default)s)",
    )
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
        "cleanup": cleanup_command,
        "run": run_command,
    }
    code = 70
    try:
        code = _dispatch(commands[args.command], args)
    finally:
        if _threads_started:
            _exit(code)
    return code


def _dispatch(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return int(command(args))
    except KeyboardInterrupt:
        return 130
    except CLI_ERRORS as error:
        print(f"ipvs-agent {args.command}: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:
        if args.verbose:
            raise
        print(
            f"ipvs-agent {args.command}: internal error: {_one_line(error)} "
            "(run with -v for the traceback)",
            file=sys.stderr,
        )
        return 70


#: Set once ``run`` started its threads (watches, Lease keeper, responder, HTTP server).
_threads_started = False


def _exit(code: int) -> NoReturn:
    """End ``run`` without interpreter finalization.

    Its daemon threads sit in blocking reads (a watch can wait minutes for its next event);
    finalizing under them can abort the process (``Fatal Python error`` on a stream lock held
    by a thread that logs at that moment: exit status -6 seen in the layer-2 lab). What must
    happen on the way out (handover, cleanup, report) has happened by now.
    """
    if sys.exc_info()[0] is not None:
        traceback.print_exc()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    sys.exit(main())
