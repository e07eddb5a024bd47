"""Which agents may announce: one Lease per node, judged on each node's own clock.

API cost grows with the nodes, not with the VIPs: every agent that may announce keeps one
``coordination.k8s.io`` Lease (``ipvs-agent-<node>`` in its namespace) and renews it every
``renew`` seconds, whatever the number of VIPs (kube-vip and Cilium renew one Lease per
Service, which is what overloaded their API servers). The Lease also carries what the others
need to elect without reading anything else about the node: its labels (for node selectors)
and the VIPs it cannot serve (not programmed there).

Liveness (:class:`ipvs_api.leases.Liveness`) is judged on each node's own clock, with a proof
that its view is current before anyone is declared gone. An agent that stops deletes its Lease
first (a planned handover is as fast as a watch event); one that dies is replaced once its
Lease is stale.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from ipvs_agent.model import IPAddress
from ipvs_api.leases import (
    ANNOTATION_LABELS,
    ANNOTATION_UNREADY,
    COMPONENT,
    LABEL_COMPONENT,
    lease_name,
)

log = logging.getLogger(__name__)

#: Defaults: a crashed announcer is replaced about 2 s after its last renewal (the goal: a
#: client-visible gap of at most 3 s); three renewals in a row may fail or be late before
#: anyone moves a VIP. A slower API server needs a longer duration (chart values).
DURATION: Final = 2.0
RENEW: Final = 0.5


def micro_time(at: datetime | None = None) -> str:
    return (at or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_body(
    namespace: str,
    node: str,
    duration: float,
    labels: Mapping[str, str],
    unready: Iterable[IPAddress],
    renewed: str,
) -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(node),
            "namespace": namespace,
            "labels": {LABEL_COMPONENT: COMPONENT},
            "annotations": {
                ANNOTATION_LABELS: json.dumps(dict(sorted(labels.items())), sort_keys=True),
                ANNOTATION_UNREADY: ",".join(sorted(str(a) for a in unready)),
            },
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": max(1, round(duration)),
            "renewTime": renewed,
        },
    }


class LeaseKeeper:
    """Keeps this node's Lease: created once the agent is ready, renewed every ``renew``
    seconds, deleted when the agent stops (thread body :meth:`run`).

    ``api`` is a ``kubernetes.client.CustomObjectsApi`` (plain dicts, no models), best on an
    API client of its own: every write then reuses the keeper's one warm connection, and the
    delete of a planned handover costs no new TLS handshake. Only the keeper's thread writes;
    :meth:`leave` asks it to delete the Lease and waits for that.
    """

    def __init__(
        self,
        api: Any,
        namespace: str,
        node: str,
        *,
        duration: float = DURATION,
        renew: float = RENEW,
        timeout: float = 5.0,
        clock: Callable[[], str] = micro_time,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.node = node
        self.duration = duration
        self.renew = renew
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._labels: Mapping[str, str] = {}
        self._unready: frozenset[IPAddress] = frozenset()
        self._wanted = False
        self._current: dict[str, Any] | None = None
        self.writes = 0
        self.failures = 0
        self._released = False
        self._wake = threading.Event()
        self._gone = threading.Event()
        self._leaving = False
        self._leave_at: float | None = None
        #: renewTime values this keeper wrote, with the monotonic time each was written at.
        self._written: dict[str, float] = {}

    def want(self, ready: bool, labels: Mapping[str, str], unready: Iterable[IPAddress]) -> None:
        """Hold the Lease (or not) with these facts from the next renewal on."""
        with self._lock:
            self._wanted = ready
            self._labels = dict(labels)
            self._unready = frozenset(unready)

    def _call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.api, method)
        return fn("coordination.k8s.io", "v1", self.namespace, "leases", *args,
                  _request_timeout=(self.timeout, self.timeout))  # fmt: skip

    def renew_once(self) -> None:
        with self._lock:
            wanted, labels, unready = self._wanted, self._labels, self._unready
        if not wanted:
            if self._current is not None or self._leaving:
                self.release()
            return
        body = lease_body(self.namespace, self.node, self.duration, labels, unready, self._clock())
        self._remember(body["spec"]["renewTime"])
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        self._released = False
        try:
            if self._current is None:
                try:
                    self._current = self._call("create_namespaced_custom_object", body)
                    self.writes += 1
                    return
                except ApiException as error:
                    if error.status != 409:
                        raise
                    self._current = self._call("get_namespaced_custom_object", name)
            version = (self._current or {}).get("metadata", {}).get("resourceVersion")
            body["metadata"]["resourceVersion"] = version
            self._current = self._call("replace_namespaced_custom_object", name, body)
            self.writes += 1
        except ApiException as error:
            self.failures += 1
            self._current = None if error.status in (404, 409) else self._current
            log.warning("could not renew Lease %s: %s", lease_name(self.node), error.reason)
        except Exception as error:  # API server away: the Lease goes stale, others take over
            self.failures += 1
            log.warning("could not renew Lease %s: %s", lease_name(self.node), _short(error))

    def _remember(self, renewed: str) -> None:
        self._written[renewed] = time.monotonic()
        while len(self._written) > 64:  # only the latest few are ever looked up
            del self._written[next(iter(self._written))]

    def written(self, renewed: str) -> float | None:
        """When this keeper wrote ``renewed`` (monotonic seconds), if it did."""
        return self._written.get(renewed)

    def renew_now(self) -> None:
        """Renew at once rather than at the next period (to prove this node's view)."""
        self._wake.set()

    def release(self) -> None:
        """Delete the Lease, so the others take over at once (a planned handover)."""
        from kubernetes.client.exceptions import ApiException

        if self._released:
            return
        self._current = None
        started = time.monotonic()
        try:
            self._call("delete_namespaced_custom_object", lease_name(self.node))
            self._released = True
            log.info(
                "released Lease %s (%.2f s after the handover began, the delete took %.2f s)",
                lease_name(self.node),
                time.monotonic() - (self._leave_at or started),
                time.monotonic() - started,
            )
        except ApiException as error:
            self._released = error.status == 404
            if error.status != 404:
                log.warning("could not release Lease %s: %s", lease_name(self.node), error.reason)
        except Exception as error:  # the API is away: the Lease goes stale instead
            log.warning("could not release Lease %s: %s", lease_name(self.node), error)

    def give_up(self) -> None:
        """Ask the keeper's thread to delete the Lease now (returns at once)."""
        with self._lock:
            self._wanted = False
            self._leaving = True
            self._leave_at = self._leave_at or time.monotonic()
        self._wake.set()

    def leave(self, timeout: float = 10.0) -> bool:
        """Give the Lease up now (the keeper's thread deletes it); True once it is gone."""
        self.give_up()
        return self._gone.wait(timeout)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.renew_once()
            if self._leaving and self._current is None:
                self._gone.set()
            self._wake.wait(self.renew)
            self._wake.clear()


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]
