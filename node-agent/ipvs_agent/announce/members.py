"""Which agents may announce: one Lease per node, judged on each node's own clock.

API cost grows with the nodes, not with the VIPs: every agent that may announce keeps one
``coordination.k8s.io`` Lease (``ipvs-agent-<node>`` in its namespace) and renews it every
``renew`` seconds, whatever the number of VIPs (kube-vip and Cilium renew one Lease per
Service, which is what overloaded their API servers). The Lease also carries what the others
need to elect without reading anything else about the node: its labels (for node selectors)
and the VIPs it cannot serve (not programmed there).

Liveness is judged as client-go judges a Lease: the holder is alive until ``duration`` has
passed since *this* node last saw its record change, so no two clocks are ever compared
(:class:`Liveness`, pure). One more condition keeps a slow observer from declaring others
dead: a Lease is stale only once this node has seen one of its *own* renewals that it wrote
after the other's deadline. The watch delivers events in commit order, so by then any renewal
the other made in time has been seen; an observer whose watch lags (a throttled CPU, a long
pause) waits for it instead of taking over VIPs that are still answered. An agent that stops
deletes its Lease first (a planned handover is as fast as a watch event); one that dies is
replaced once its Lease is stale.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from ipvs_agent.announce.election import Member
from ipvs_agent.model import IPAddress

log = logging.getLogger(__name__)

LEASE_PREFIX: Final = "ipvs-agent-"
COMPONENT: Final = "agent-lease"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
ANNOTATION_LABELS: Final = "ipvs.io/node-labels"
ANNOTATION_UNREADY: Final = "ipvs.io/unready"
#: Defaults: a crashed announcer is replaced about 2 s after its last renewal (the goal: a
#: client-visible gap of at most 3 s); three renewals in a row may fail or be late before
#: anyone moves a VIP. A slower API server needs a longer duration (chart values).
DURATION: Final = 2.0
RENEW: Final = 0.5


@dataclass(frozen=True)
class LeaseRecord:
    """One agent's Lease, as the others read it."""

    node: str
    holder: str
    duration: float
    renewed: str
    labels: Mapping[str, str] = field(default_factory=dict)
    unready: frozenset[IPAddress] = frozenset()


def lease_name(node: str) -> str:
    return f"{LEASE_PREFIX}{node}"[:253]


def read_lease(obj: Mapping[str, Any]) -> LeaseRecord | None:
    """A Lease object as a record (None: not an agent's Lease, or unreadable)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    holder = str(spec.get("holderIdentity") or "")
    if not holder:
        return None
    annotations = meta.get("annotations") or {}
    try:
        labels = json.loads(annotations.get(ANNOTATION_LABELS) or "{}")
        unready = frozenset(
            ipaddress.ip_address(a)
            for a in (annotations.get(ANNOTATION_UNREADY) or "").split(",")
            if a
        )
    except ValueError:
        return None
    return LeaseRecord(
        node=holder,
        holder=holder,
        duration=float(spec.get("leaseDurationSeconds") or 0),
        renewed=str(spec.get("renewTime") or ""),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        unready=unready,
    )


class Liveness:
    """The agents alive as this node sees them: a Lease is fresh until its duration has passed
    since this node last saw its ``renewTime`` change. Pure: the caller passes the clock."""

    def __init__(self, me: str | None = None) -> None:
        #: This node: its own renewals, once seen, are the proof that the view is current.
        self.me = me
        self._seen: dict[str, tuple[str, float]] = {}
        self._records: dict[str, LeaseRecord] = {}
        self._proof = float("-inf")

    def observe(
        self,
        records: Iterable[LeaseRecord],
        now: float,
        written: Callable[[str], float | None] = lambda renewed: None,
    ) -> None:
        """The Leases as they are now (a Lease that is gone is gone at once). ``written``
        gives the time this node wrote one of its own ``renewTime`` values (None: unknown,
        then the time it is seen counts)."""
        current = {r.node: r for r in records}
        for node in list(self._seen):
            if node not in current:
                del self._seen[node]
        for node, record in current.items():
            before = self._seen.get(node)
            if before is None or before[0] != record.renewed:
                self._seen[node] = (record.renewed, now)
                if node == self.me:
                    at = written(record.renewed)
                    self._proof = max(self._proof, now if at is None else at)
        self._records = current

    def _alive(self, node: str, record: LeaseRecord, now: float) -> bool:
        deadline = self._seen[node][1] + record.duration
        if now < deadline:
            return True
        # Past its deadline: stale once this node saw a renewal of its own written after it.
        return self.me is not None and node != self.me and self._proof < deadline

    def awaiting_proof(self, now: float) -> bool:
        """Some Lease is past its deadline, but this node has not yet seen a renewal of its
        own written after it: renewing at once settles it."""
        return any(
            node != self.me and now >= self._seen[node][1] + record.duration
            and self._alive(node, record, now)
            for node, record in self._records.items()
        )  # fmt: skip

    def refresh(self, now: float) -> None:
        """Count every Lease as renewed ``now`` (after this node could not see them)."""
        self._seen = {node: (renewed, now) for node, (renewed, _) in self._seen.items()}

    def alive(self, now: float) -> list[Member]:
        return [
            Member(node, record.labels, record.unready)
            for node, record in sorted(self._records.items())
            if self._alive(node, record, now)
        ]

    def next_expiry(self, now: float) -> float | None:
        """When the next alive Lease goes stale, to re-elect right then."""
        times = [
            self._seen[n][1] + r.duration
            for n, r in self._records.items()
            if now < self._seen[n][1] + r.duration
        ]
        return min(times) if times else None


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
        try:
            self._call("delete_namespaced_custom_object", lease_name(self.node))
            self._released = True
            log.info("released Lease %s", lease_name(self.node))
        except ApiException as error:
            self._released = error.status == 404
            if error.status != 404:
                log.warning("could not release Lease %s: %s", lease_name(self.node), error.reason)
        except Exception as error:  # the API is away: the Lease goes stale instead
            log.warning("could not release Lease %s: %s", lease_name(self.node), error)

    def leave(self, timeout: float = 10.0) -> bool:
        """Give the Lease up now (the keeper's thread deletes it); True once it is gone."""
        with self._lock:
            self._wanted = False
            self._leaving = True
        self._wake.set()
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
