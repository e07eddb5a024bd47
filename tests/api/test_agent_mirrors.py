"""The agent's mirrors on a real kube-apiserver: what wakes a reconcile pass, and what does not.

The operator writes a VirtualServer's status after every agent's report (conditions, nodes,
counts, which node announces it): if each such write woke every agent for a full pass, one
change would cost N agents x N reports passes. Only what the agent reads — the spec, and the
address, pool and firewall mark the operator confirmed — wakes it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from kubernetes import client

from ipvs_agent.cluster import mirrors
from ipvs_api import constants
from tests.apiserver.cluster import LocalApiServer
from tests.operator.harness import wait_for

GROUP, VERSION, PLURAL = constants.GROUP, constants.VERSION, constants.VIRTUAL_SERVERS


def virtual_server() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {"name": "web"},
        "spec": {
            "ports": [{"port": 80}],
            "backends": {"static": [{"address": "192.0.2.11"}]},
        },
    }


def in_namespace(items: list[dict[str, Any]], namespace: str) -> dict[str, Any]:
    """The mirror's copy of a test's object (the mirror is cluster-wide)."""
    return next(o for o in items if o["metadata"]["namespace"] == namespace)


def quiet(changed: threading.Event, seconds: float = 2.0) -> bool:
    """Whether nothing woke the agent for ``seconds`` (the watch delivers within that)."""
    return not changed.wait(seconds)


def test_status_writes_the_agent_does_not_read_wake_no_pass(
    apiserver: LocalApiServer, k8s_namespace: str
) -> None:
    with apiserver.api_client() as admin:
        objects = client.CustomObjectsApi(admin)
        objects.create_namespaced_custom_object(
            GROUP, VERSION, k8s_namespace, PLURAL, virtual_server()
        )
        changed = threading.Event()
        stop = threading.Event()
        with apiserver.api_client() as api:
            (vs_mirror, *_rest) = mirrors(api, "node-a", changed)
            thread = threading.Thread(target=vs_mirror.run, args=(stop,), daemon=True)
            thread.start()
            try:
                wait_for("the mirror synced", vs_mirror.synced.is_set, 30)
                assert changed.wait(10)
                changed.clear()

                def status(body: dict[str, Any]) -> str:
                    written: Any = objects.patch_namespaced_custom_object_status(
                        GROUP, VERSION, k8s_namespace, PLURAL, "web", {"status": body}
                    )
                    return str(written["metadata"]["resourceVersion"])

                status({"nodes": {"desired": 3, "programmed": 2, "summary": "2/3"}})
                version = status({"announcement": {"mode": "Layer2", "nodes": ["n1"]}})
                assert quiet(changed), "a status the agent never reads woke a pass"
                wait_for(
                    "the mirror to hold the new version",
                    lambda: (
                        in_namespace(vs_mirror.items(), k8s_namespace)["metadata"][
                            "resourceVersion"
                        ]
                        == version
                    ),
                    10,
                )
                kept = in_namespace(vs_mirror.items(), k8s_namespace)
                assert "status" not in kept, "nothing the agent reads"
                status({"address": "192.0.2.10", "addressPool": "p"})
                assert changed.wait(10), "a confirmed address is news"
                changed.clear()
                started = time.monotonic()
                objects.patch_namespaced_custom_object(
                    GROUP, VERSION, k8s_namespace, PLURAL, "web",
                    {"spec": {"scheduler": {"name": "rr"}}},
                )  # fmt: skip
                assert changed.wait(10), "a spec change is news"
                assert time.monotonic() - started < 10
            finally:
                stop.set()
                vs_mirror.stop()


def test_an_agent_with_layer_2_off_deletes_the_lease_an_earlier_run_left(
    apiserver: LocalApiServer, k8s_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that died with layer 2 on leaves its Lease; the operator takes a stale Lease for
    a dead agent and sets its reports aside. Restarted with layer 2 off, it keeps no Lease, so
    it must delete that one, or its node would look dead for ever."""
    import argparse

    from ipvs_agent import __main__ as agent_main
    from ipvs_agent.announce.members import lease_body
    from ipvs_api.leases import lease_name

    with apiserver.api_client() as admin:
        objects = client.CustomObjectsApi(admin)
        body = lease_body(k8s_namespace, "node-a", 2.0, {}, (), "2026-12-03T00:00:00.000000Z")
        objects.create_namespaced_custom_object(
            "coordination.k8s.io", "v1", k8s_namespace, "leases", body
        )
        monkeypatch.setattr(agent_main, "_api_client", apiserver.api_client)
        args = argparse.Namespace(layer2=False, lease_namespace=k8s_namespace, node_name="node-a")
        assert agent_main._speaker(args, admin, threading.Event()) is None

        def gone() -> bool:
            listed: Any = objects.list_namespaced_custom_object(
                "coordination.k8s.io", "v1", k8s_namespace, "leases"
            )
            return lease_name("node-a") not in {i["metadata"]["name"] for i in listed["items"]}

        wait_for("the leftover Lease deleted", gone, 30)


def test_the_mirrors_keep_no_managed_fields_last_applied_or_unread_status(
    apiserver: LocalApiServer, k8s_namespace: str
) -> None:
    """What the API server returns (managedFields of every writer, kubectl's last-applied
    annotation, the operator's status) is trimmed on list and on watch to what the agent
    reads, and the trimmed object reads exactly as the whole one."""
    import json

    from ipvs_agent import trim
    from ipvs_agent.snapshot import ReadVirtualServer
    from ipvs_api import load
    from ipvs_api.types import VirtualServer

    manifest = virtual_server()
    manifest["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": json.dumps(manifest)
    }
    with apiserver.api_client() as admin:
        objects = client.CustomObjectsApi(admin)
        objects.create_namespaced_custom_object(
            GROUP, VERSION, k8s_namespace, PLURAL, manifest, field_manager="kubectl"
        )
        objects.patch_namespaced_custom_object_status(
            GROUP, VERSION, k8s_namespace, PLURAL, "web",
            {"status": {"address": "192.0.2.10", "addressPool": "p", "observedGeneration": 1,
                        "nodes": {"desired": 1, "programmed": 1, "summary": "1/1"}}},
            field_manager="ipvs-operator",
        )  # fmt: skip
        changed = threading.Event()
        stop = threading.Event()
        with apiserver.api_client() as api:
            (vs_mirror, *_rest) = mirrors(api, "node-a", changed)
            thread = threading.Thread(target=vs_mirror.run, args=(stop,), daemon=True)
            thread.start()

            def mine() -> dict[str, Any]:
                return in_namespace(vs_mirror.items(), k8s_namespace)

            try:
                wait_for("the mirror synced", vs_mirror.synced.is_set, 30)
                whole: Any = objects.get_namespaced_custom_object(
                    GROUP, VERSION, k8s_namespace, PLURAL, "web"
                )
                assert whole["metadata"]["managedFields"]  # there is something to trim
                listed = mine()
                trimmed = trim.virtual_server(whole)
                assert listed == {"metadata": trimmed["metadata"], "status": trimmed["status"]}
                assert "managedFields" not in listed["metadata"]
                assert "annotations" not in listed["metadata"]
                assert listed["status"] == {"address": "192.0.2.10", "addressPool": "p"}
                # read as it arrived: the validated object is kept, the spec is not
                assert isinstance(listed, ReadVirtualServer) and "spec" not in listed
                assert listed.read == load.virtual_server(whole)

                patched: Any = objects.patch_namespaced_custom_object(
                    GROUP, VERSION, k8s_namespace, PLURAL, "web",
                    {"spec": {"scheduler": {"name": "rr"}}}, field_manager="kubectl-edit",
                )  # fmt: skip
                version = patched["metadata"]["resourceVersion"]
                wait_for(
                    "the watched change",
                    lambda: mine()["metadata"]["resourceVersion"] == version,
                    10,
                )
                watched = mine()
                assert watched == {
                    k: trim.virtual_server(patched)[k] for k in ("metadata", "status")
                }
                assert "managedFields" not in watched["metadata"]
                assert isinstance(watched, ReadVirtualServer)
                assert watched.read == load.virtual_server(patched)
                assert isinstance(watched.read, VirtualServer)
                assert watched.read.spec.scheduler == "rr"
            finally:
                stop.set()
                vs_mirror.stop()


def ready(*addresses: str) -> list[dict[str, Any]]:
    """An EndpointSlice's ``endpoints``: one ready endpoint per address."""
    return [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]


def endpoint_slice(name: str, service: str, *addresses: str) -> dict[str, Any]:
    from ipvs_api.endpoints import SERVICE_NAME_LABEL

    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {SERVICE_NAME_LABEL: service}},
        "addressType": "IPv4",
        "endpoints": ready(*addresses),
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }


def test_only_the_slices_of_services_a_virtual_server_here_uses_wake_a_pass(
    apiserver: LocalApiServer, k8s_namespace: str
) -> None:
    """A change to the EndpointSlices of a Service no VirtualServer on this node uses is kept
    but wakes no pass; one to a used Service's does. A Service that becomes used has its
    endpoints, including changes that woke nothing, in the pass its VirtualServer woke."""
    from ipvs_agent.agent import Agent, Settings
    from ipvs_agent.kernel.fake import FakeKernel
    from tests.unit.agent_helpers import CountingEvent, FakeHost

    vip = "203.0.113.77"

    def real_servers() -> set[str]:
        return {
            str(d.address)
            for key, s in kernel.dump().items()
            if str(key.address) == vip
            for d in s.dests
        }

    slices = ("discovery.k8s.io", "v1", k8s_namespace, "endpointslices")
    with apiserver.api_client() as admin:
        objects = client.CustomObjectsApi(admin)
        objects.create_namespaced_custom_object(
            *slices, endpoint_slice("used-1", "used", "10.1.0.1")
        )
        objects.create_namespaced_custom_object(
            *slices, endpoint_slice("spare-1", "spare", "10.2.0.1")
        )
        manifest = virtual_server()
        manifest["spec"].update(address=vip, backends={"service": {"name": "used"}})
        objects.create_namespaced_custom_object(GROUP, VERSION, k8s_namespace, PLURAL, manifest)
        objects.patch_namespaced_custom_object_status(  # what the operator does
            GROUP, VERSION, k8s_namespace, PLURAL, "web", {"status": {"address": vip}}
        )
        kernel, changed, stop = FakeKernel(), CountingEvent(), threading.Event()
        with apiserver.api_client() as api:
            agent_mirrors = mirrors(api, "node-a", changed)
            slice_mirror = next(m for m in agent_mirrors if m.name == "endpointslices")
            agent = Agent(
                Settings("node-a", resync_seconds=3600, settle_seconds=0),
                kernel,
                FakeHost(),
                agent_mirrors,
                changed,
            )
            agent.metrics.watch_mirrors(agent_mirrors)
            thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
            thread.start()
            try:
                wait_for("the used Service's endpoints", lambda: real_servers() == {"10.1.0.1"})
                objects.patch_namespaced_custom_object(
                    *slices,
                    "used-1",
                    {"endpoints": ready("10.1.0.1", "10.1.0.2")},
                )
                wait_for(
                    "a change to a used Service's slice in the kernel",
                    lambda: real_servers() == {"10.1.0.1", "10.1.0.2"},
                    10,
                )
                # ... by a change pass: the watch event named its Service (cluster.Changes).
                assert agent.metrics.passes.labels(kind="change")._value.get() >= 1
                assert kernel.reads >= 1

                sets, unused = changed.sets, slice_mirror.unused_events
                patched: Any = objects.patch_namespaced_custom_object(
                    *slices,
                    "spare-1",
                    {"endpoints": ready("10.2.0.1", "10.2.0.2")},
                )
                wait_for(
                    "the unused slice's change judged",
                    lambda: slice_mirror.unused_events > unused,
                    10,
                )
                assert changed.sets == sets, "a slice no VirtualServer here uses woke a pass"
                exported = agent.metrics.exposition().decode()
                line = 'ipvs_agent_unused_events_total{resource="endpointslices"} '
                assert f"{line}{float(slice_mirror.unused_events)}" in exported, exported
                kept = next(
                    o for o in slice_mirror.items()
                    if o["metadata"]["namespace"] == k8s_namespace
                    and o["metadata"]["name"] == "spare-1"
                )  # fmt: skip
                assert kept["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]

                full = agent.metrics.passes.labels(kind="full")._value.get()
                objects.patch_namespaced_custom_object(
                    GROUP, VERSION, k8s_namespace, PLURAL, "web",
                    {"spec": {"backends": {"service": {"name": "spare"}}}},
                )  # fmt: skip
                wait_for(
                    "the newly used Service's endpoints, with the change that woke nothing",
                    lambda: {"10.2.0.1", "10.2.0.2"} <= real_servers(),
                    10,
                )
                assert agent.metrics.passes.labels(kind="full")._value.get() > full
            finally:
                stop.set()
                changed.set()
                thread.join(10)


#: The agent's reading of the cluster, in a process of its own: its API client built as
#: ``ipvs-agent run`` builds it, every mirror listed and watching, and one report written.
AGENT_READS = """
import sys, threading, time
from ipvs_agent.__main__ import _api_client
from ipvs_agent.cluster import mirrors
from ipvs_agent.report import NodeReporter

api = _api_client()
changed, stop = threading.Event(), threading.Event()
found = mirrors(api, "node-models", changed, bgp=True)
for mirror in found:
    threading.Thread(target=mirror.run, args=(stop,), daemon=True).start()
deadline = time.monotonic() + 60
while not all(m.synced.is_set() for m in found):
    assert time.monotonic() < deadline, "mirrors not synced"
    time.sleep(0.05)
assert NodeReporter(api, "node-models").report({"virtualServers": []})
print(sorted(name for name in sys.modules if name.startswith("kubernetes.client.models.")))
"""


def test_the_agent_reads_the_cluster_without_the_kubernetes_clients_models(
    apiserver: LocalApiServer,
) -> None:
    """Importing the client's models took about 86 s under TCG before the agent's first API
    call (issue 13 §2). The client now loads each model only when used, and the agent reads
    every object as a plain dict: listing, watching and reporting load only the handful its
    calls' signatures name (delete options, API resource lists), not the client's 845."""
    env = {**os.environ, "KUBECONFIG": str(apiserver.kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)  # never the in-cluster config here
    done = subprocess.run(
        [sys.executable, "-c", AGENT_READS],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = ast.literal_eval(done.stdout.strip())
    assert len(loaded) <= 8, loaded
    assert not [m for m in loaded if "node" in m or "endpoint" in m or "lease" in m], loaded
