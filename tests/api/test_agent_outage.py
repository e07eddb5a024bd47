"""The agent through an API-server outage, on a real kube-apiserver that really goes away.

The agent's own mirrors (list + watch with the kubernetes client) talk to the real server;
the kernel behind the agent is the in-memory one, because what is under test is what the
agent *asks of* the kernel while the API is away: nothing. (The kernel layer itself is proven
on a real kernel in tests/kernel/.) This server is the test's own, since it is stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from ipvs_agent.agent import Agent, Settings
from ipvs_agent.cluster import mirrors
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.model import ObservedTable
from ipvs_api import constants
from tests.apiserver.cluster import LocalApiServer
from tests.apiserver.fixtures import repo_crd_files, running_apiserver
from tests.operator.harness import wait_for
from tests.unit.agent_helpers import FakeHost

NODE = "node-a"
DEADLINE = 60.0


@pytest.fixture
def server() -> Iterator[LocalApiServer]:
    with running_apiserver(lambda s: s.install_crds(repo_crd_files())) as s:
        yield s


def virtual_server(weight: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{constants.GROUP}/{constants.VERSION}",
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "address": "203.0.113.10",
            "ports": [{"port": 80}],
            "backends": {"static": [{"address": "192.0.2.11", "weight": weight}]},
        },
    }


class RunningAgent:
    """The in-cluster agent loop with real mirrors, in a thread."""

    def __init__(self, server: LocalApiServer, kernel: FakeKernel) -> None:
        self.api = server.api_client()
        changed = threading.Event()
        self.mirrors = mirrors(self.api, NODE, changed, retry_seconds=0.2)
        self.agent = Agent(
            Settings(NODE, resync_seconds=0.2, settle_seconds=0),
            kernel,
            FakeHost(),
            self.mirrors,
            changed,
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.agent.run, args=(self.stop,), daemon=True)
        self.thread.start()

    @property
    def errors(self) -> int:
        """Failed lists and watches of its mirrors so far."""
        return sum(m.errors for m in self.mirrors)

    def close(self) -> None:
        self.stop.set()
        self.agent.changed.set()
        self.thread.join(10)
        self.api.close()


def weights(table: ObservedTable) -> list[int]:
    return [d.dest.weight for s in table.values() for d in s.dests.values()]


def test_the_kernel_table_stays_through_an_outage_and_converges_after(
    server: LocalApiServer,
) -> None:
    with server.api_client() as api:
        objects = client.CustomObjectsApi(api)
        objects.create_namespaced_custom_object(
            constants.GROUP, constants.VERSION, "default", constants.VIRTUAL_SERVERS,
            virtual_server(weight=1),
        )  # fmt: skip
        objects.patch_namespaced_custom_object_status(  # what the operator does
            constants.GROUP, constants.VERSION, "default", constants.VIRTUAL_SERVERS, "web",
            {"status": {"address": "203.0.113.10"}},
        )  # fmt: skip
    kernel = FakeKernel()
    running = RunningAgent(server, kernel)
    restarted: RunningAgent | None = None
    try:
        wait_for("the service programmed", lambda: weights(kernel.dump()) == [1], DEADLINE)
        before = kernel.dump()

        server.stop_apiserver()
        errors = running.errors
        wait_for("the mirrors to see the outage", lambda: running.errors > errors, DEADLINE)
        passes = running.agent.passes
        wait_for(
            "three resyncs during the outage", lambda: running.agent.passes >= passes + 3, DEADLINE
        )
        assert kernel.dump() == before, "the table changed while the API was away"

        # An agent that starts during the outage has nothing listed: it must not act on that.
        fresh = restarted = RunningAgent(server, kernel)
        wait_for(
            "the new agent to try the API", lambda: all(m.errors for m in fresh.mirrors), DEADLINE
        )
        assert fresh.agent.passes == 0 and kernel.dump() == before

        server.start_apiserver()
        with server.api_client() as api:
            objects = client.CustomObjectsApi(api)
            objects.patch_namespaced_custom_object(
                constants.GROUP, constants.VERSION, "default", constants.VIRTUAL_SERVERS, "web",
                {"spec": {"backends": {"static": [{"address": "192.0.2.11", "weight": 5}]}}},
            )  # fmt: skip
        wait_for("the change to reach the kernel", lambda: weights(kernel.dump()) == [5], DEADLINE)
        wait_for("the restarted agent to sync", lambda: fresh.agent.passes > 0, DEADLINE)
        assert weights(kernel.dump()) == [5]
    finally:
        running.close()
        if restarted is not None:
            restarted.close()
