"""Conditional status writes on the real API server (issue 8): a status patch computed from a
stale read is refused with 409, and the reconcile retries on fresh state and converges.

The controller runs in this process, writing through the operator's own client as its
ServiceAccount to the real kube-apiserver. Its reads come straight from the API server too
(:class:`LiveViews`), except that it is first handed a VirtualServer as it was before a
concurrent write — what a watch that lags behind the server shows. That lag is the one thing
the test arranges; the 409 is the API server's own answer.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import kopf
import yaml

from ipvs_api.endpoints import Endpoint
from ipvs_operator import kube
from ipvs_operator.controller import Controller, Settings
from ipvs_operator.events import EventPoster
from ipvs_operator.status import DirectorReport
from ipvs_operator.workqueue import VS
from tests.apiserver.cluster import LocalApiServer
from tests.operator import harness
from tests.operator.conftest import PoolFactory
from tests.operator.harness import condition, get_vs


class LiveViews:
    """The reconcilers' reads, straight from the API server; ``stale`` bodies are served first.

    Only what a VirtualServer with static real servers needs is answered: no Services,
    EndpointSlices or agents.
    """

    def __init__(self, api: Any, namespace: str) -> None:
        self.api = api
        self.namespace = namespace
        self.stale: list[dict[str, Any]] = []

    def virtual_server(self, namespace: str, name: str) -> dict[str, Any] | None:
        if self.stale:
            return self.stale.pop(0)
        return get_vs(self.api, namespace, name)

    def virtual_servers(self) -> list[dict[str, Any]]:
        return harness.list_vs(self.api, self.namespace)

    def virtual_server_keys(self) -> list[tuple[str, str]]:
        return [(self.namespace, vs["metadata"]["name"]) for vs in self.virtual_servers()]

    def owned_by_service(self, namespace: str, service: str) -> list[str]:
        return []

    def using_service(self, namespace: str, service: str) -> list[str]:
        return []

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return None

    def pools(self) -> list[dict[str, Any]]:
        listed = harness.custom(self.api).list_cluster_custom_object(
            harness.GROUP, harness.VERSION, "addresspools"
        )
        items: list[dict[str, Any]] = listed["items"]
        return items

    def pool(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.pools() if p["metadata"]["name"] == name), None)

    def namespace_labels(self, name: str) -> dict[str, str]:
        labels = harness.core(self.api).read_namespace(name).metadata.labels
        return dict(labels or {})

    def endpoints(self, namespace: str, service: str) -> list[Endpoint]:
        return []

    def reports(self, namespace: str, name: str) -> dict[str, DirectorReport]:
        return {}

    def agents(self) -> list[str]:
        return []

    def node_labels(self, name: str) -> dict[str, str] | None:
        return None

    def peer(self, name: str) -> dict[str, Any] | None:
        return None


class RecordingKube(kube.Kube):
    """The operator's client, noting the status of every answer it got."""

    def __init__(self, login: kube.Login) -> None:
        super().__init__(login)
        self.answers: list[tuple[str, str, int]] = []

    async def request(self, method: str, path: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        try:
            found = await super().request(method, path, body, **kw)
        except kube.ApiError as exc:
            self.answers.append((method, path, exc.status))
            raise
        self.answers.append((method, path, 200))
        return found


def operator_login(bed: LocalApiServer, kubeconfig: Path) -> kube.Login:
    token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
    ca = bed.kubeconfig.parent / "pki" / "ca.crt"
    return lambda: kopf.ConnectionInfo(server=bed.url, ca_path=str(ca), token=token)


def test_a_status_patch_from_a_stale_read_is_refused_and_retried(
    admin: Any, bed: LocalApiServer, operator_kubeconfig: Path, ns: str, pool: PoolFactory
) -> None:
    """A previous leader wrote an address the lagging view has not seen: it is kept."""
    pool_name, (rng,) = pool(8)
    base = rng.split("-")[0].rsplit(".", 1)[0]
    harness.custom(admin).create_namespaced_custom_object(
        harness.GROUP, harness.VERSION, ns, "virtualservers", harness.virtual_server("web")
    )
    before = get_vs(admin, ns, "web")
    assert before is not None and "status" not in before

    async def scenario() -> None:
        client = RecordingKube(operator_login(bed, operator_kubeconfig))
        views = LiveViews(admin, ns)
        controller = Controller(Settings(workers=1), views, client, EventPoster(client, "t"))
        controller.restore()  # the table, rebuilt while the object had no status yet
        # Meanwhile the previous leader publishes an address ...
        harness.custom(admin).patch_namespaced_custom_object_status(
            harness.GROUP,
            harness.VERSION,
            ns,
            "virtualservers",
            "web",
            {"status": {"address": f"{base}.3", "addressPool": pool_name}},
        )
        views.stale = [before]  # ... which this replica's view shows only later.
        controller.start()
        controller.queue.add((VS, ns, "web"))
        try:
            deadline = time.monotonic() + 30
            while not _converged(admin, ns):
                assert time.monotonic() < deadline, f"no convergence: {get_vs(admin, ns, 'web')}"
                await asyncio.sleep(0.1)
        finally:
            await controller.stop()
            await client.close()
        patches = [status for method, path, status in client.answers if path.endswith("/status")]
        assert patches[0] == 409, client.answers  # computed from the stale read: refused
        assert patches[-1] == 200

    asyncio.run(scenario())
    vs = get_vs(admin, ns, "web")
    assert vs is not None
    assert vs["status"]["address"] == f"{base}.3"  # the address in use, not a second one
    cond = condition(vs, "AddressAllocated")
    assert (cond["status"], cond["reason"]) == ("True", "Allocated")


def _converged(api: Any, ns: str) -> bool:
    vs = get_vs(api, ns, "web")
    return bool(condition(vs, "AddressAllocated").get("observedGeneration"))
