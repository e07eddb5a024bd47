"""The in-cluster agent loop with health checks and feedback on a real kernel, keepalived next
to it, and the measurements both the kernel tests and bench/bench_health.py make.

:class:`LoopAgent` runs ``Agent.run`` as the DaemonSet does — the real kernel layer in the
director's namespace, the checker's probes started from that namespace — with mirrors whose
contents the test sets (the API side is proven against a real kube-apiserver elsewhere).
:class:`Keepalived` runs Debian's keepalived (checker only) in a director namespace of its
own, against the same real servers: its table never touches the agent's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipvs_agent.agent import Agent, Settings
from ipvs_agent.health.checker import Checker
from ipvs_agent.kernel.ipvs import IPVSKernel
from tests.kernel.topology import Lab, Netns, Topology, _attach
from tests.unit.agent_helpers import FakeHost, StubMirror

POLL = 0.05  # seconds between looks at a kernel table while timing a detection


def virtual_server(
    name: str, vip: str, port: int, servers: Sequence[str], **spec: Any
) -> dict[str, Any]:
    """A VirtualServer with static real servers, already admitted by the operator."""
    body: dict[str, Any] = {
        "address": vip,
        "ports": [{"port": port}],
        "scheduler": {"name": "rr"},
        "backends": {"static": [{"address": a} for a in servers]},
    }
    body.update(spec)
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "lab", "generation": 1},
        "spec": body,
        "status": {"address": vip},
    }


def weights(kernel: IPVSKernel, vip: str, port: int, protocol: int = 6) -> dict[str, int]:
    """Real server address → weight of one service of ``kernel`` (empty: no such service)."""
    for key, observed in kernel.dump().items():
        if (key.address, key.port, key.protocol) == (vip, port, protocol):
            return {d.address: od.dest.weight for d, od in observed.dests.items()}
    return {}


class LoopAgent:
    """``Agent.run`` in a thread against the director's kernel, with a live checker."""

    def __init__(self, director: Netns, objects: list[dict[str, Any]]) -> None:
        self.virtual_servers = StubMirror("virtualservers", objects)
        self.changed = threading.Event()
        self.kernel = IPVSKernel(netns=director.name)
        self.checker = Checker(self.changed.set, netns=director.path, workers=8)
        self.agent = Agent(
            Settings("director", resync_seconds=60, settle_seconds=0.05),
            self.kernel,
            FakeHost(),
            [self.virtual_servers, StubMirror("endpointslices", []), StubMirror("node", [])],
            self.changed,
            checker=self.checker,
        )
        self.stop = threading.Event()
        self.threads = [
            self.checker.start(self.stop),
            threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True),
        ]
        self.threads[1].start()
        self.changed.set()  # the first pass, as the mirrors' first list would cause
        self.view = IPVSKernel(netns=director.name)  # the test's own socket

    def set(self, objects: list[dict[str, Any]]) -> None:
        self.virtual_servers._items = objects
        self.changed.set()

    def weights(self, vip: str, port: int, protocol: int = 6) -> dict[str, int]:
        return weights(self.view, vip, port, protocol)

    def close(self) -> None:
        self.stop.set()
        self.changed.set()
        for thread in self.threads:
            thread.join(30)
        self.kernel.close()
        self.view.close()


def keepalived_namespace(lab: Lab, topology: Topology, address: str) -> Netns:
    """A second director on the real servers' LAN (NAT topology), for keepalived alone."""
    switch = next(ns for ns in lab.namespaces if ns.name.endswith("-sw"))
    (ns,) = lab.netns("kdir")
    _attach(lab, switch, "brs", ns, "eth0")
    ns.add_address("eth0", address, 24)
    return ns


@dataclass(frozen=True)
class KeepalivedServer:
    address: str
    port: int
    weight: int = 1


class Keepalived:
    """Debian's keepalived, checker subsystem only, in its own namespace."""

    def __init__(self, ns: Netns, config: str) -> None:
        binary = shutil.which("keepalived") or "/usr/sbin/keepalived"
        if not os.path.exists(binary):
            raise RuntimeError("keepalived is not installed (tests/setup.sh installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="keepalived-"))
        (self.dir / "keepalived.conf").write_text(config)
        self.log = open(self.dir / "log", "w")  # noqa: SIM115  # closed in close()
        self.process = ns.popen(
            [
                binary,
                "--dont-fork",
                "--check",
                "--log-console",
                "--log-detail",
                "--no-syslog",
                "--dont-respawn",
                "--use-file",
                str(self.dir / "keepalived.conf"),
                "--pid",
                str(self.dir / "keepalived.pid"),
                "--checkers_pid",
                str(self.dir / "checkers.pid"),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.kernel = IPVSKernel(netns=ns.name)

    def weights(self, vip: str, port: int, protocol: int = 6) -> dict[str, int]:
        if self.process.poll() is not None:
            raise RuntimeError(f"keepalived exited {self.process.returncode}:\n{self.output()}")
        return weights(self.kernel, vip, port, protocol)

    def output(self) -> str:
        self.log.flush()
        return (self.dir / "log").read_text()[-4000:]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)
        self.kernel.close()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def keepalived_tcp_config(
    vip: str,
    port: int,
    servers: Sequence[KeepalivedServer],
    *,
    delay_loop: float,
    connect_timeout: float,
    retry: int,
    delay_before_retry: float,
) -> str:
    """A NAT virtual server with TCP_CHECKs and inhibit_on_failure (weight 0 when down)."""
    real = "".join(
        f"""
    real_server {s.address} {s.port} {{
        weight {s.weight}
        inhibit_on_failure
        TCP_CHECK {{
            connect_timeout {connect_timeout}
            retry {retry}
            delay_before_retry {delay_before_retry}
        }}
    }}"""
        for s in servers
    )
    return f"""global_defs {{
    router_id ipvs-operator-test
}}
virtual_server {vip} {port} {{
    delay_loop {delay_loop}
    lb_algo rr
    lb_kind NAT
    protocol TCP{real}
}}
"""


def time_until(
    condition: Callable[[], bool], what: str, timeout: float = 30.0, interval: float = POLL
) -> float:
    """Poll ``condition`` until it holds; the monotonic time it was first seen to hold."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(interval)  # poll interval, not synchronisation
    return time.monotonic()


def first_times(
    conditions: Mapping[str, Callable[[], bool]], what: str, timeout: float = 30.0
) -> dict[str, float]:
    """Poll several conditions together; when each first held (monotonic time)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, float] = {}
    while len(seen) < len(conditions):
        now = time.monotonic()
        for name, condition in conditions.items():
            if name not in seen and condition():
                seen[name] = now
        if len(seen) < len(conditions):
            if time.monotonic() > deadline:
                missing = sorted(set(conditions) - set(seen))
                raise AssertionError(f"not within {timeout} s: {what} ({', '.join(missing)})")
            time.sleep(POLL)  # poll interval, not synchronisation
    return seen


@contextlib.contextmanager
def closing_all(*things: Any) -> Any:
    try:
        yield things
    finally:
        for thing in reversed(things):
            with contextlib.suppress(Exception):
                thing.close()
