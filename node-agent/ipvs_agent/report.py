"""Writes this node's IPVSNode (and, on a node directing thousands of VirtualServers, its
IPVSNodeReports): objects of one node each, so agents never contend for one object.

Writes happen on a thread of their own (:class:`Outbox`): the reconcile loop hands over the
latest report and goes on, so an API server that stalls or vanishes never stalls programming
the kernel. Only the newest report is kept; older ones would be stale anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ipvs_agent.cluster import REQUEST_TIMEOUT
from ipvs_agent.status import SLICE_BYTES, same_report, slice_name, split
from ipvs_api import constants

log = logging.getLogger(__name__)


class NodeReporter:
    """Creates the IPVSNode once, then patches its status only when the report changed.

    A node with more entries than one object should hold (:func:`ipvs_agent.status.split`)
    writes the rest to IPVSNodeReports ``<node>.1``, ``<node>.2``, …, each only when its own
    part changed: one VirtualServer changing costs one write whatever the node's size.
    """

    def __init__(self, api: client.ApiClient, node_name: str) -> None:
        self._custom = client.CustomObjectsApi(api)
        self._node = node_name
        self._last: dict[str, Any] | None = None
        #: The IPVSNode status last written (the whole report when it has one slice).
        self._head: dict[str, Any] | None = None
        self._exists = False
        #: What each slice (index >= 1) holds on the API server as far as this agent knows.
        self._slices: dict[int, tuple[dict[str, Any], ...]] = {}
        self._count = 1
        #: Whether slices an earlier run left beyond the current count were looked for.
        self._swept = False
        #: Bytes of entries per object (:data:`ipvs_agent.status.SLICE_BYTES`).
        self.budget = SLICE_BYTES
        #: Objects written and deleted (each write is one API request).
        self.writes = 0
        #: An entry's JSON size (``EntryMemo.size`` of the agent that builds the reports).
        self.sizes: Callable[[Mapping[str, Any]], int] | None = None

    @property
    def last(self) -> dict[str, Any] | None:
        return self._last

    def _ensure(self, node_uid: str) -> None:
        if self._exists:
            return
        try:
            self._custom.create_cluster_custom_object(
                constants.GROUP,
                constants.VERSION,
                constants.IPVS_NODES,
                self._body(constants.IPVS_NODE, self._node, node_uid),
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as e:
            if e.status != 409:
                raise
        self._exists = True
        # A new IPVSNode (its Node, and so its slices, may have been deleted meanwhile):
        # write every part again, and look for leftovers again.
        self._head = None
        self._slices = {}
        self._swept = False

    def _body(self, kind: str, name: str, node_uid: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "apiVersion": constants.API_VERSION,
            "kind": kind,
            "metadata": {
                "name": name,
                "labels": {constants.LABEL_MANAGED_BY: constants.MANAGED_BY},
            },
            "spec": {"node": self._node} if kind == constants.IPVS_NODE_REPORT else {},
        }
        if node_uid:
            # Deleted with its Node by the garbage collector.
            body["metadata"]["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": self._node, "uid": node_uid}
            ]
        return body

    def report(self, status: dict[str, Any], node_uid: str = "") -> bool:
        """Send ``status`` if it differs from the last one sent; True when written.

        New and changed slices are written before the IPVSNode and dropped ones after it, so
        an entry moving between objects is for a moment in two (the operator takes the newer),
        never in none.
        """
        if self._last is not None and same_report(self._last, status):
            return False
        slices = split(status, self._count, self.budget, self.sizes)
        self._ensure(node_uid)
        for index, entries in enumerate(slices.rest, start=1):
            if self._slices.get(index) != entries:
                self._write_slice(index, entries, node_uid)
        if self._head is None or not same_report(self._head, slices.head):
            try:
                self._custom.patch_cluster_custom_object_status(
                    constants.GROUP,
                    constants.VERSION,
                    constants.IPVS_NODES,
                    self._node,
                    {"status": slices.head},
                    _request_timeout=REQUEST_TIMEOUT,
                )
            except ApiException as e:
                if e.status == 404:
                    self._exists = False  # deleted under us: recreate next time
                raise
            self.writes += 1
            self._head = slices.head
        self._count = slices.count
        self._drop_slices_from(slices.count)
        self._last = status
        return True

    def _write_slice(self, index: int, entries: tuple[dict[str, Any], ...], node_uid: str) -> None:
        name = slice_name(self._node, index)
        status = {"virtualServers": list(entries)}
        try:
            self._custom.patch_cluster_custom_object(
                constants.GROUP,
                constants.VERSION,
                constants.IPVS_NODE_REPORTS,
                name,
                {"status": status},
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as e:
            if e.status != 404:
                raise
            body = self._body(constants.IPVS_NODE_REPORT, name, node_uid)
            body["status"] = status
            self._custom.create_cluster_custom_object(
                constants.GROUP,
                constants.VERSION,
                constants.IPVS_NODE_REPORTS,
                body,
                _request_timeout=REQUEST_TIMEOUT,
            )
        self.writes += 1
        self._slices[index] = entries

    def _drop_slices_from(self, count: int) -> None:
        """Delete slices ``count``.. (highest first, so what is left is always 1..k, and a
        restarted agent finds an earlier run's leftovers by counting up to the first gap)."""
        if not self._swept:
            index = max(count, 1)
            while self._delete_slice(index):
                index += 1
            self._swept = True
        for index in sorted((i for i in self._slices if i >= count), reverse=True):
            self._delete_slice(index)
            del self._slices[index]

    def _delete_slice(self, index: int) -> bool:
        try:
            self._custom.delete_cluster_custom_object(
                constants.GROUP,
                constants.VERSION,
                constants.IPVS_NODE_REPORTS,
                slice_name(self._node, index),
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as e:
            if e.status != 404:
                raise
            return False
        self.writes += 1
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
