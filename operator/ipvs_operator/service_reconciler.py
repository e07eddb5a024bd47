"""LoadBalancer Services: their VirtualServers and their ``status.loadBalancer.ingress``.

What a Service should have is decided by the pure :mod:`ipvs_operator.services`; this module
makes it so — creates, patches and deletes the Service's VirtualServers, and copies their
allocated addresses into the Service's ingress. A Service whose annotations cannot be honoured
gets one Warning Event and keeps the VirtualServers it had.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ipvs_api import conditions, constants
from ipvs_api.rules import parse_ip
from ipvs_api.types import IPAddress
from ipvs_operator import kube, services, status
from ipvs_operator.views import Views
from ipvs_operator.workqueue import SVC, VS, Key, WorkQueue
from ipvs_operator.writer import Writer
from ipvs_operator.writer import meta as _meta


class ServiceReconciler:
    def __init__(
        self,
        default_load_balancer: bool,
        views: Views,
        writer: Writer,
        queue: WorkQueue[Key],
    ) -> None:
        self.default_load_balancer = default_load_balancer
        self.views = views
        self.writer = writer
        self.queue = queue
        #: The last Warning posted per Service, so a broken Service warns once per change.
        self._warned: dict[Key, str] = {}
        #: Plans by (uid, generation, annotations): validation is the costliest step.
        self._plans: dict[tuple[str, str], tuple[Any, services.Plan]] = {}

    def _plan(self, svc: Mapping[str, Any]) -> services.Plan:
        """The Service's plan, computed once per generation and annotations."""
        meta = _meta(svc)
        key = (str(meta.get("namespace")), str(meta.get("name")))
        stamp = (
            meta.get("uid"),
            meta.get("generation"),
            tuple(sorted((meta.get("annotations") or {}).items())),
        )
        cached = self._plans.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        plan = services.plan(svc)
        self._plans[key] = (stamp, plan)
        return plan

    async def reconcile(self, namespace: str, name: str) -> None:
        key: Key = (SVC, namespace, name)
        svc = self.views.service(namespace, name)
        owned = [
            b
            for n in self.views.owned_by_service(namespace, name)
            if (b := self.views.virtual_server(namespace, n)) is not None
        ]
        if svc is None or not services.is_ours(svc, self.default_load_balancer):
            if svc is not None and owned:
                await self._clear_ingress(key, svc, owned)
            for body in owned:
                await self._delete_virtual_server(body)
            self._warned.pop(key, None)
            if svc is None:
                self.writer.forget(key)
                self._plans.pop((namespace, name), None)
            return
        plan = self._plan(svc)
        if plan.errors:
            await self._warn_once(key, svc, _invalid_reason(plan.errors), "; ".join(plan.errors))
            keep = owned  # the Service keeps working as it did
        else:
            self._warned.pop(key, None)
            keep = await self._apply_plan(key, svc, plan, owned)
        await self._set_ingress(key, svc, keep)

    async def _apply_plan(
        self,
        key: Key,
        svc: Mapping[str, Any],
        plan: services.Plan,
        owned: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        namespace, name = key[1], key[2]
        wanted = {str(m["metadata"]["name"]): m for m in plan.manifests}
        kept: list[dict[str, Any]] = []
        for vs_name, manifest in wanted.items():
            existing = self.views.virtual_server(namespace, vs_name)
            if existing is None:
                await self._create_virtual_server(key, manifest)
                continue
            labels = _meta(existing).get("labels") or {}
            if labels.get(constants.LABEL_SERVICE_NAME) != name:
                await self._warn_once(
                    key,
                    svc,
                    "NameTaken",
                    f"VirtualServer {vs_name} exists and does not belong to this Service; "
                    "rename one of them",
                )
                continue
            kept.append(existing)
            if services.needs_update(manifest, existing):
                await self.writer.request(
                    "PATCH",
                    kube.vs_path(namespace, vs_name),
                    services.update_patch(manifest, existing),
                    content_type=kube.MERGE_PATCH,
                )
        for body in owned:
            if str(_meta(body).get("name")) not in wanted:
                await self._delete_virtual_server(body)
        return kept

    async def _create_virtual_server(self, key: Key, manifest: dict[str, Any]) -> None:
        try:
            await self.writer.request("POST", kube.vs_path(key[1]), manifest)
        except kube.ApiError as exc:
            if exc.status != 409:
                raise
            self.queue.add_after(key, 1.0)  # our index has not seen it yet; look again soon

    async def _delete_virtual_server(self, body: Mapping[str, Any]) -> None:
        meta = _meta(body)
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": meta.get("uid")},
        }
        try:
            await self.writer.request(
                "DELETE", kube.vs_path(str(meta.get("namespace")), str(meta.get("name"))), options
            )
        except kube.ApiError as exc:
            if exc.status not in (404, 409):
                raise

    async def _warn_once(self, key: Key, svc: Mapping[str, Any], reason: str, message: str) -> None:
        fingerprint = f"{_meta(svc).get('uid')}:{reason}:{message}"
        if self._warned.get(key) == fingerprint:
            return
        await self.writer.post(svc, "Warning", reason, message)
        self._warned[key] = fingerprint

    def _allocated(
        self, owned: Iterable[Mapping[str, Any]], svc: Mapping[str, Any]
    ) -> list[tuple[IPAddress, Mapping[str, Any] | None]]:
        """Allocated addresses of the Service's VirtualServers, primary family first, each
        with its announcement (``status.announcement``, None when nobody announces it)."""
        found: dict[str, tuple[IPAddress, Mapping[str, Any] | None]] = {}
        for body in owned:
            meta = _meta(body)
            current = self.writer.current(
                (VS, str(meta.get("namespace")), str(meta.get("name"))), body
            )
            allocated = status.condition(current, conditions.ADDRESS_ALLOCATED).get("status")
            address = parse_ip(str(current.get("address") or ""))
            if address is not None and allocated == "True":
                found[f"IPv{address.version}"] = (address, current.get("announcement"))
        return [found[f.value] for f in services.families(svc) if f.value in found]

    def _addresses(
        self, owned: Iterable[Mapping[str, Any]], svc: Mapping[str, Any]
    ) -> list[IPAddress]:
        return [address for address, _ in self._allocated(owned, svc)]

    async def _set_ingress(
        self, key: Key, svc: Mapping[str, Any], owned: list[dict[str, Any]]
    ) -> None:
        allocated = self._allocated(owned, svc)
        want = services.ingress([address for address, _ in allocated])
        current = self.writer.current(key, svc)
        have = ((current.get("loadBalancer") or {}).get("ingress")) or []
        had = list(current.get("conditions") or [])
        generation = int(_meta(svc).get("generation") or 0)
        new = services.announced_condition(allocated, had, generation)
        if _ingress_key(have) == _ingress_key(want) and _same(had, new):
            return
        await self._write_ingress(key, svc, current, want, None if new == had else new)

    async def _clear_ingress(
        self, key: Key, svc: Mapping[str, Any], owned: list[dict[str, Any]]
    ) -> None:
        """Forget our addresses in a Service we no longer serve."""
        ours = {str(a) for a in self._addresses(owned, svc)}
        current = self.writer.current(key, svc)
        have = ((current.get("loadBalancer") or {}).get("ingress")) or []
        served_elsewhere = (svc.get("spec") or {}).get("type") == "LoadBalancer"
        keep = [i for i in have if served_elsewhere and i.get("ip") not in ours]
        if _ingress_key(keep) == _ingress_key(have):
            return
        await self._write_ingress(key, svc, current, keep)

    async def _write_ingress(
        self,
        key: Key,
        svc: Mapping[str, Any],
        current: Mapping[str, Any],
        ingress: list[dict[str, Any]],
        conditions_new: list[dict[str, Any]] | None = None,
    ) -> None:
        """Set status.loadBalancer.ingress (and the conditions, with ours changed): other
        status fields belong to others; the patch is conditional on the resourceVersion read,
        so the whole conditions list is replaced only over the one it was computed from."""
        patch: dict[str, Any] = {"status": {"loadBalancer": {"ingress": ingress or None}}}
        new = {**current, "loadBalancer": {"ingress": ingress} if ingress else {}}
        if conditions_new is not None:
            patch["status"]["conditions"] = conditions_new
            new["conditions"] = conditions_new
        path = kube.service_status_path(key[1], key[2])
        await self.writer.patch_status(key, svc, path, patch, new)


def _invalid_reason(errors: Iterable[str]) -> str:
    annotated = any(e.startswith("annotation ") for e in errors)
    return "InvalidAnnotation" if annotated else "InvalidService"


def _same(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> bool:
    """Conditions equal but for the time they were computed (a message that did not change
    writes nothing)."""

    def key(items: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return sorted(
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"),
             c.get("observedGeneration"))
            for c in items
        )  # fmt: skip

    return key(old) == key(new)


def _ingress_key(entries: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return [(str(e.get("ip")), str(e.get("ipMode") or "")) for e in entries]
