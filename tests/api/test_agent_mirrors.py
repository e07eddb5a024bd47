"""The agent's mirrors on a real kube-apiserver: what wakes a reconcile pass, and what does not.

The operator writes a VirtualServer's status after every agent's report (conditions, nodes,
counts, which node announces it): if each such write woke every agent for a full pass, one
change would cost N agents x N reports passes. Only what the agent reads — the spec, and the
address, pool and firewall mark the operator confirmed — wakes it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

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

                def status(body: dict[str, Any]) -> None:
                    objects.patch_namespaced_custom_object_status(
                        GROUP, VERSION, k8s_namespace, PLURAL, "web", {"status": body}
                    )

                status({"nodes": {"desired": 3, "programmed": 2, "summary": "2/3"}})
                status({"announcement": {"mode": "Layer2", "nodes": ["n1"]}})
                assert quiet(changed), "a status the agent never reads woke a pass"
                wait_for(
                    "the mirror to hold the new status",
                    lambda: (vs_mirror.items()[0].get("status") or {}).get("announcement"),
                    10,
                )
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
