"""Kubernetes Events for what users look for in ``kubectl describe``.

Posted only on transitions (the callers compare old and new status), so a resync or a restart
repeats nothing. A failed post is logged and dropped: an Event is a hint, never state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ipvs_api import conditions, constants
from ipvs_operator import kube

log = logging.getLogger(__name__)

#: Namespace for Events about cluster-scoped objects (AddressPools).
CLUSTER_EVENTS_NAMESPACE = "default"


def event_body(
    obj: Mapping[str, Any], type_: str, reason: str, message: str, instance: str
) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace") or CLUSTER_EVENTS_NAMESPACE
    now = conditions.now()
    involved = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
    }
    if meta.get("namespace"):
        involved["namespace"] = meta["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta.get('name', 'object')}.", "namespace": namespace},
        "involvedObject": involved,
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": constants.MANAGED_BY},
        "reportingComponent": constants.MANAGED_BY,
        "reportingInstance": instance[:128],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


class EventPoster:
    def __init__(self, client: kube.Kube, instance: str) -> None:
        self._kube = client
        self._instance = instance

    async def post(
        self,
        obj: Mapping[str, Any],
        type_: str,
        reason: str,
        message: str,
        timeout: float | None = None,
    ) -> None:
        body = event_body(obj, type_, reason, message, self._instance)
        path = kube.events_path(body["metadata"]["namespace"])
        try:
            await self._kube.request("POST", path, body, timeout=timeout)
        except (kube.ApiError, OSError, TimeoutError) as exc:
            log.warning("could not post Event %s for %s: %s", reason, body["involvedObject"], exc)
