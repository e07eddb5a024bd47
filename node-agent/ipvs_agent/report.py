"""Writes this node's IPVSNode: one object per node, so agents never contend for one object."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

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
                constants.GROUP, constants.VERSION, constants.IPVS_NODES, body
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
            )
        except ApiException as e:
            if e.status == 404:
                self._exists = False  # deleted under us: recreate next time
            raise
        self._last = status
        return True
