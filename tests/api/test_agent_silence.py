"""The agent when the API server's host vanishes without closing a connection.

A stopped API server (tests/api/test_agent_outage.py) closes its sockets and the agent hears
of it at once. A host that disappears — powered off, partitioned — closes nothing: packets
just stop. Here the agent runs in a network namespace of its own and reaches the real
kube-apiserver through a veth and a relay on the host side; dropping every packet between
them in the namespace's firewall (nftables) makes the server vanish exactly so, while the
relay keeps every connection open.

The agent's threads are started inside that namespace (threads inherit the namespace of the
thread that starts them; the test's own thread returns), so every socket of its API client is
born there. The kernel behind the agent is the in-memory one: what is under test is the API
side — bounded calls, a noticed silence, reconciling from the last good view meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from ipvs_agent.agent import Agent, Settings
from ipvs_agent.cluster import configure, mirrors
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.model import Protocol, ServiceKey
from ipvs_agent.report import NodeReporter, Outbox
from ipvs_api import constants
from tests.apiserver.cluster import LocalApiServer
from tests.apiserver.fixtures import repo_crd_files, running_apiserver
from tests.kernel.topology import netns_entered
from tests.operator.harness import wait_for
from tests.unit.agent_helpers import FakeHost

NODE = "node-a"
NETNS = "ipvs-silence"
HOST_SIDE, AGENT_SIDE = "198.18.7.1", "198.18.7.2"
VIP = "203.0.113.10"
#: Keep-alive notices a dead peer after 15 + 3 x 5 s of silence; allow for scheduling.
NOTICED = 90.0


def sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, f"{argv}: {proc.stderr}"


@pytest.fixture
def netns() -> Iterator[str]:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    sh("ip", "netns", "add", NETNS)
    try:
        sh("ip", "link", "add", "ipvs-silence0", "type", "veth", "peer", "name", "eth0",
           "netns", NETNS)  # fmt: skip
        sh("ip", "addr", "add", f"{HOST_SIDE}/30", "dev", "ipvs-silence0")
        sh("ip", "link", "set", "ipvs-silence0", "up")
        sh("ip", "-n", NETNS, "addr", "add", f"{AGENT_SIDE}/30", "dev", "eth0")
        sh("ip", "-n", NETNS, "link", "set", "eth0", "up")
        sh("ip", "-n", NETNS, "link", "set", "lo", "up")
        yield NETNS
    finally:
        subprocess.run(["ip", "link", "del", "ipvs-silence0"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)


class Relay:
    """Host side of the veth → the API server on loopback, one thread pair per connection."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server((HOST_SIDE, 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self.target)
            except OSError:  # the API server already stopped (teardown): refuse this one
                near.close()
                continue
            self.sockets += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


def blackhole(on: bool) -> None:
    """Drop every packet to and from the API server's side, silently (no RST, no ICMP)."""
    if on:
        rules = (
            "table inet blackhole {\n"
            " chain out { type filter hook output priority 0; ip daddr 198.18.7.1 drop; }\n"
            " chain in { type filter hook input priority 0; ip saddr 198.18.7.1 drop; }\n"
            "}\n"
        )
        proc = subprocess.run(["ip", "netns", "exec", NETNS, "nft", "-f", "-"], input=rules,
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    else:
        sh("ip", "netns", "exec", NETNS, "nft", "delete", "table", "inet", "blackhole")


def agent_api(server: LocalApiServer, port: int) -> client.ApiClient:
    """An admin client to the relay, configured as the agent configures its own."""
    admin = server.api_client()
    config = admin.configuration
    config.host = f"https://{HOST_SIDE}:{port}"
    admin.close()
    return client.ApiClient(configure(config))


def virtual_server(weight: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{constants.GROUP}/{constants.VERSION}",
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "address": VIP,
            "ports": [{"port": 80}],
            "backends": {"static": [{"address": "192.0.2.11", "weight": weight}]},
        },
    }


def weights(kernel: FakeKernel) -> list[int]:
    return [d.dest.weight for s in kernel.dump().values() for d in s.dests.values()]


def test_a_silent_api_server_is_noticed_and_the_kernel_is_still_reconciled(
    netns: str,
) -> None:
    with running_apiserver(
        lambda s: s.install_crds(repo_crd_files()), extra_sans=[HOST_SIDE]
    ) as server:
        with server.api_client() as admin:
            objects = client.CustomObjectsApi(admin)
            objects.create_namespaced_custom_object(
                constants.GROUP, constants.VERSION, "default", constants.VIRTUAL_SERVERS,
                virtual_server(weight=1),
            )  # fmt: skip
            objects.patch_namespaced_custom_object_status(  # what the operator does
                constants.GROUP, constants.VERSION, "default", constants.VIRTUAL_SERVERS, "web",
                {"status": {"address": VIP}},
            )  # fmt: skip
        relay = Relay(server.port)
        kernel = FakeKernel()
        stop = threading.Event()
        changed = threading.Event()
        api = agent_api(server, relay.port)
        with netns_entered(f"/run/netns/{netns}"):  # the agent's threads are born in there
            sources = mirrors(api, NODE, changed, retry_seconds=0.5)
            outbox = Outbox(NodeReporter(api, NODE).report, retry_seconds=0.5)
            outbox.start(stop)
            agent = Agent(
                Settings(NODE, resync_seconds=1.0, settle_seconds=0),
                kernel,
                FakeHost(),
                sources,
                changed,
                report=outbox.put,
            )
            loop = threading.Thread(target=agent.run, args=(stop,), daemon=True)
            loop.start()
        try:
            wait_for("the service programmed", lambda: weights(kernel) == [1], 60)
            wait_for("a report written", lambda: outbox.sent > 0, 60)

            blackhole(True)
            errors = sum(m.errors for m in sources)
            # A kernel that refuses ops makes the outcome Failed: a report must be written,
            # and the write cannot get through.
            key = ServiceKey.for_address(ipaddress.ip_address(VIP), Protocol.TCP, 80)
            kernel.fail(lambda op: True, errno.ENOMEM, "no memory")
            kernel._table.pop(key)
            failures = outbox.failures
            wait_for("the failed write noticed", lambda: outbox.failures > failures, NOTICED)
            kernel.clear_failures()
            passes = agent.passes
            wait_for(
                "the kernel repaired during the silence",
                lambda: weights(kernel) == [1] and agent.passes > passes,
                30,
            )
            wait_for(
                "every mirror to notice the silence",
                lambda: sum(m.errors for m in sources) >= errors + len(sources),
                NOTICED,
            )
            assert not any(m.connected for m in sources) or agent.passes > passes

            blackhole(False)
            with server.api_client() as admin:
                client.CustomObjectsApi(admin).patch_namespaced_custom_object(
                    constants.GROUP, constants.VERSION, "default", constants.VIRTUAL_SERVERS,
                    "web", {"spec": {"backends": {"static": [{"address": "192.0.2.11",
                                                               "weight": 5}]}}},
                )  # fmt: skip
            wait_for("the change after the silence", lambda: weights(kernel) == [5], NOTICED)
        finally:
            stop.set()
            changed.set()
            loop.join(10)
            relay.close()
            api.close()
