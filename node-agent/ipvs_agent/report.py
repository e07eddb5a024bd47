"""Writes this node's IPVSNode: one object per node, so agents never contend for one object.

Writes happen on a thread of their own (:class:`Outbox`): the reconcile loop hands over the
latest report and goes on, so an API server that stalls or vanishes never stalls programming
the kernel. Only the newest report is kept; older ones would be stale anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ipvs_agent.cluster import REQUEST_TIMEOUT
from ipvs_agent.status import same_report
from ipvs_api import constants

log = logging.getLogger(__name__)


class NodeReporter:
    """Creates the IPVSNode once, then patches its status only when the report changed."""

    def __init__(self, api: client.ApiClient, node_name: str) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._node = node_name
        self._last: dict[str, Any] | None = None
        self._exists = False

    @property
    def last(self) -> dict[str, Any] | None:
        return self._last

    def _ensure(self, node_uid: str) -> None:
        if self._exists:
            return
        body: dict[str, Any] = {
            "apiVersion": constants.API_VERSION,
            "kind": constants.IPVS_NODE,
            "metadata": {
                "name": self._node,
                "labels": {constants.LABEL_MANAGED_BY: constants.MANAGED_BY},
            },
            "spec": {},
        }
        if node_uid:
            # Deleted with its Node by the garbage collector.
            body["metadata"]["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": self._node, "uid": node_uid}
            ]
        try:
            self._custom.create_cluster_custom_object(
                constants.GROUP,
                constants.VERSION,
                constants.IPVS_NODES,
                body,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as e:
            if e.status != 409:
                raise
        self._exists = True

    def report(self, status: dict[str, Any], node_uid: str = "") -> bool:
        """Send ``status`` if it differs from the last one sent; True when written."""
        if self._last is not None and same_report(self._last, status):
            return False
        self._ensure(node_uid)
        try:
            self._custom.patch_cluster_custom_object_status(
                constants.GROUP,
                constants.VERSION,
                constants.IPVS_NODES,
                self._node,
                {"status": status},
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as e:
            if e.status == 404:
                self._exists = False  # deleted under us: recreate next time
            raise
        self._last = status
        return True


class Outbox:
    """Sends reports on a thread of its own; :meth:`put` never blocks.

    A failed send is retried after ``retry_seconds`` with whatever report is newest by then.
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any], str], object],
        retry_seconds: float = 5.0,
    ) -> None:
        self._send = send
        self._retry = retry_seconds
        self._lock = threading.Lock()
        self._latest: tuple[dict[str, Any], str] | None = None
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self.sent = 0
        self.failures = 0

    def put(self, status: dict[str, Any], node_uid: str = "") -> None:
        with self._lock:
            self._latest = (status, node_uid)
            self._idle.clear()
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until the newest report is sent (or ``timeout``); True if it was."""
        return self._idle.wait(timeout)

    def run(self, stop: threading.Event) -> None:
        """Thread body: send the newest report whenever there is one, until ``stop``."""
        while not stop.is_set():
            self._wake.wait(1.0)
            with self._lock:
                item, self._latest = self._latest, None
                self._wake.clear()
            if item is None:
                continue
            try:
                self._send(*item)
                self.sent += 1
                with self._lock:
                    if self._latest is None:
                        self._idle.set()
            except Exception as e:  # keep the newest for the next try
                self.failures += 1
                log.warning("could not report IPVSNode status: %s", str(e).splitlines()[0])
                with self._lock:
                    if self._latest is None:
                        self._latest = item
                stop.wait(self._retry)
                self._wake.set()

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="report", daemon=True)
        thread.start()
        return thread
