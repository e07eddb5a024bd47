"""Read-only mirrors of the few API resources the agent needs (list, then watch).

The agent watches only VirtualServers, EndpointSlices and its own Node. A mirror keeps its last
good contents through API outages — the kernel table then stays as it is — and reports itself
synced only after a complete list, so an agent that starts while the API server is away never
mistakes "no data yet" for "no VirtualServers" and wipes the table.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch

from ipvs_api import constants

log = logging.getLogger(__name__)

ListFn = Callable[..., Any]


class Mirror:
    """A list+watch cache of one resource, as plain dicts keyed by namespace/name."""

    def __init__(
        self,
        name: str,
        list_fn: ListFn,
        api: client.ApiClient,
        changed: threading.Event,
        retry_seconds: float = 2.0,
        **list_kwargs: Any,
    ) -> None:
        self.name = name
        self.retry_seconds = retry_seconds
        self._list_fn = list_fn
        self._api = api
        self._changed = changed
        self._kwargs = list_kwargs
        self._items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._watch: watch.Watch | None = None
        self.synced = threading.Event()
        self.errors = 0

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items.values())

    def _as_dict(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, dict):
            return obj
        out: dict[str, Any] = self._api.sanitize_for_serialization(obj)
        return out

    @staticmethod
    def _key(obj: dict[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def _relist(self) -> str:
        resp = self._as_dict(self._list_fn(**self._kwargs))
        items = {self._key(o): self._as_dict(o) for o in resp.get("items") or []}
        with self._lock:
            self._items = items
        self.synced.set()
        self._changed.set()
        return str((resp.get("metadata") or {}).get("resourceVersion") or "")

    def run(self, stop: threading.Event) -> None:
        """Thread body: list, watch from that version, and relist when the watch expires."""
        version = ""
        while not stop.is_set():
            try:
                if not version:
                    version = self._relist()
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    self._list_fn,
                    resource_version=version,
                    timeout_seconds=300,
                    allow_watch_bookmarks=True,
                    **self._kwargs,
                ):
                    if stop.is_set():
                        break
                    kind = event.get("type")
                    raw = event.get("raw_object") or self._as_dict(event.get("object"))
                    if kind == "ERROR":
                        version = ""  # 410 Gone or similar: start over with a full list
                        break
                    version = str((raw.get("metadata") or {}).get("resourceVersion") or version)
                    if kind == "BOOKMARK":
                        continue
                    with self._lock:
                        if kind == "DELETED":
                            self._items.pop(self._key(raw), None)
                        else:
                            self._items[self._key(raw)] = raw
                    self._changed.set()
            except Exception as e:  # the API server is away: keep the cache, retry
                self.errors += 1
                status = getattr(e, "status", None)
                if status == 410:
                    version = ""
                log.warning(
                    "watch %s failed (%s); keeping %d cached objects",
                    self.name,
                    e,
                    len(self._items),
                )
                stop.wait(self.retry_seconds)

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()


def mirrors(
    api: client.ApiClient, node_name: str, changed: threading.Event, retry_seconds: float = 2.0
) -> list[Mirror]:
    """The agent's three mirrors: VirtualServers, EndpointSlices and its own Node."""
    custom = client.CustomObjectsApi(api)
    discovery = client.DiscoveryV1Api(api)
    core = client.CoreV1Api(api)

    def list_virtual_servers(**kw: Any) -> Any:
        return custom.list_cluster_custom_object(
            constants.GROUP, constants.VERSION, constants.VIRTUAL_SERVERS, **kw
        )

    return [
        Mirror("virtualservers", list_virtual_servers, api, changed, retry_seconds),
        Mirror(
            "endpointslices",
            discovery.list_endpoint_slice_for_all_namespaces,
            api,
            changed,
            retry_seconds,
        ),
        Mirror(
            "node",
            core.list_node,
            api,
            changed,
            retry_seconds,
            field_selector=f"metadata.name={node_name}",
        ),
    ]
