"""Read-only mirrors of the few API resources the agent needs (list, then watch).

Each mirror keeps of an object only what the agent reads (:mod:`ipvs_agent.trim`): no
``managedFields``, no last-applied annotation, no status written for people. A VirtualServer
is read (validated and typed) as it arrives, and its spec is not kept
(:func:`kept_virtual_server`).

The agent watches only VirtualServers, EndpointSlices and its own Node (and, to know when it is
being uninstalled, its own DaemonSet). Not every event wakes a reconcile pass: an update that
leaves what the agent acts on alone (a mirror's ``fingerprint``) does not, and neither does a
change to the EndpointSlices of a Service no VirtualServer on this node uses (its ``interest``,
published by each pass); such slices are still kept, trimmed, so the pass that first uses their
Service has its endpoints at once. A mirror keeps its last good contents through API
outages — the kernel table then stays as it is — and reports itself synced only after a
complete list, so an agent that starts while the API server is away never mistakes "no data
yet" for "no VirtualServers" and wipes the table.

Every call is bounded. An API server whose host vanishes closes no socket: without limits a
watch would wait forever and the mirror would freeze with no error. So connections use TCP
keep-alive (a dead peer is noticed within about half a minute of silence), lists and writes
have a request timeout, and a watch is asked to end after a few minutes and dropped if it
outlives that: an API server sends nothing at all on a quiet watch (no bookmarks either,
measured with kube-apiserver 1.35 over 200 s), so silence alone proves nothing before then.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Hashable
from typing import Any

from kubernetes import client, watch
from kubernetes.client import rest

from ipvs_agent import trim
from ipvs_agent.heap import collector_paused
from ipvs_agent.snapshot import ReadVirtualServer, read_again, read_on_arrival, service_of
from ipvs_api import constants

log = logging.getLogger(__name__)

ListFn = Callable[..., Any]

#: (connect, read) seconds for lists, gets and writes.
REQUEST_TIMEOUT = (10.0, 30.0)
#: Server-side length of one watch; each mirror jitters it so watches do not end in step.
WATCH_SECONDS = 150
#: A watch silent this much longer than it was asked to last is dead.
WATCH_GRACE = 30.0
#: TCP keep-alive: first probe after 15 s of silence, then every 5 s, dead after 3 misses.
KEEPALIVE = (15, 5, 3)
#: Objects per page of a list. Whole objects of one page are in memory at a time, and the
#: trimmed copies made meanwhile share the heap with them: at 10 000 VirtualServers pages of
#: 100 left 51 MB held against 58 MB with client-go's 500 (docs/benchmarks.md), as fast.
LIST_PAGE = 100


def configure(configuration: client.Configuration) -> client.Configuration:
    """TCP keep-alive on every connection the client opens (as client-go asks the kernel)."""
    configuration.socket_options = rest.tcp_keepalive_socket_options(*KEEPALIVE)  # type: ignore[attr-defined]
    return configuration


class Interest:
    """Which objects of a mirror the last pass used, by ``key`` (for EndpointSlices, their
    Service): an event for any other object is kept but wakes no pass.

    Until the first :meth:`publish` every object is of interest. The race between a pass that
    starts using a key and an event for that key is closed both ways: an event before the pass
    read the mirror is in what the pass reads (and the VirtualServer change that made the key
    used woke that pass); an event after the pass read the mirror but before it published is
    remembered as missed, and :meth:`publish` reports it so the caller wakes one more pass.
    """

    def __init__(self, key: Callable[[dict[str, Any]], Hashable | None]) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._used: frozenset[Hashable] | None = None
        #: Keys of events that woke nothing since the last publish (at most one per key).
        self._missed: set[Hashable] = set()

    def wants(self, *objects: dict[str, Any] | None) -> bool:
        """Whether a change from one of ``objects`` to another (before and after an event) may
        matter to a pass; if not, the keys are remembered as missed."""
        keys = {self.key(o) for o in objects if o is not None}
        with self._lock:
            if self._used is None or not keys.isdisjoint(self._used):
                return True
            self._missed |= keys
            return False

    def publish(self, used: Collection[Hashable]) -> bool:
        """Set the keys the last pass used; True if an event for one of them was missed since
        the last publish (the pass may have read the mirror before it: wake another)."""
        with self._lock:
            self._used = frozenset(used)
            missed = not self._missed.isdisjoint(self._used)
            self._missed = set()
            return missed


class Changes:
    """What changed in a mirror since the agent last took it: the keys of the objects whose
    events were news (by ``key``; for EndpointSlices, their Service), or everything after a
    relist. A pass that knows the change was confined to a few Services' endpoints applies
    just those (``ipvs_agent.partial``) instead of a full pass.
    """

    def __init__(self, key: Callable[[dict[str, Any]], Hashable | None]) -> None:
        self.key = key
        self._lock = threading.Lock()
        #: None: everything may have changed (a relist, or never taken).
        self._keys: set[Hashable] | None = None
        #: Monotonic time of the first event since the last take (0: none).
        self._since = 0.0
        #: That time, for what the last :meth:`take` returned.
        self.taken_since = 0.0

    def note(self, *objects: dict[str, Any] | None) -> None:
        with self._lock:
            self._since = self._since or time.monotonic()
            if self._keys is not None:
                self._keys.update(self.key(o) for o in objects if o is not None)

    def note_all(self) -> None:
        with self._lock:
            self._since = self._since or time.monotonic()
            self._keys = None

    def take(self) -> frozenset[Hashable] | None:
        """The keys changed since the last take (None: anything may have), and start anew;
        :attr:`taken_since` says when the first of those changes arrived."""
        with self._lock:
            taken, self._keys = self._keys, set()
            self.taken_since, self._since = self._since, 0.0
        return None if taken is None else frozenset(taken)


class Mirror:
    """A list+watch cache of one resource, as dicts keyed by namespace/name."""

    def __init__(
        self,
        name: str,
        list_fn: ListFn,
        api: client.ApiClient,
        changed: threading.Event,
        retry_seconds: float = 2.0,
        *,
        watch_seconds: int = WATCH_SECONDS,
        fingerprint: Callable[[dict[str, Any]], Any] | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        reuse: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any] | None] | None = None,
        interest: Interest | None = None,
        changes: Callable[[dict[str, Any]], Hashable | None] | None = None,
        **list_kwargs: Any,
    ) -> None:
        self.name = name
        #: What changed since the agent last took it, keyed by ``changes`` (default: the
        #: object's namespace/name).
        self.changes = Changes(changes or self._key)
        #: With ``changes``: the objects under each of its keys (:meth:`items_of`).
        self._grouped: dict[Hashable, set[str]] | None = {} if changes is not None else None
        #: Which objects the last pass used; a watched change to no such object is kept but
        #: wakes no pass (a relist always wakes one).
        self.interest = interest
        #: Watch events kept without waking a pass because no pass uses their object.
        self.unused_events = 0
        #: What of each listed or watched object is kept (``ipvs_agent.trim``), applied before
        #: it is stored (and before ``fingerprint`` sees it), as client-go's SetTransform.
        self.transform = transform
        #: For a watched update: what to keep, made from what was kept of the object's last
        #: version when that still serves (None: ``transform`` it anew).
        self.reuse = reuse
        #: Objects per list page (a relist holds one page of whole objects at a time; 0: all
        #: in one response).
        self.page = LIST_PAGE
        #: What of an object the agent acts on; an update that leaves it alone (the operator
        #: writing a condition, a Node's heartbeat) is kept but wakes no reconcile pass.
        self.fingerprint = fingerprint
        self.retry_seconds = retry_seconds
        self.watch_seconds = watch_seconds
        self._list_fn = list_fn
        self._api = api
        self._changed = changed
        self._kwargs = list_kwargs
        self._items: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._watch: watch.Watch | None = None
        self.synced = threading.Event()
        self.errors = 0
        #: monotonic time of the last list or watch event; 0 before the first
        self.last_contact = 0.0
        #: True while a watch is established (False while the API server is unreachable)
        self.connected = False
        #: Whether the mirror has ever held an object (a deletion is only news after that)
        self.seen = False

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._items.values())

    def items_of(self, keys: Collection[Hashable]) -> list[dict[str, Any]]:
        """The objects under these keys of ``changes`` (for EndpointSlices: of these
        Services), without going through every object."""
        with self._lock:
            if self._grouped is None:
                return [o for o in self._items.values() if self.changes.key(o) in keys]
            return [self._items[n] for k in keys for n in self._grouped.get(k, ())]

    def _group(
        self, name: str, before: dict[str, Any] | None, after: dict[str, Any] | None
    ) -> None:
        """Keep :attr:`_grouped` in step with one object's change (under the lock)."""
        if self._grouped is None:
            return
        if before is not None:
            members = self._grouped.get(self.changes.key(before))
            if members is not None:
                members.discard(name)
                if not members:
                    del self._grouped[self.changes.key(before)]
        if after is not None:
            self._grouped.setdefault(self.changes.key(after), set()).add(name)

    def _as_dict(self, obj: Any) -> dict[str, Any]:
        if isinstance(obj, dict):
            return obj
        out: dict[str, Any] = self._api.sanitize_for_serialization(obj)
        return out

    def _kept(self, obj: Any) -> dict[str, Any]:
        """What the mirror stores of one listed or watched object."""
        raw = self._as_dict(obj)
        return raw if self.transform is None else self.transform(raw)

    def _updated(self, raw: dict[str, Any]) -> dict[str, Any]:
        """What the mirror stores of a watched object (added or modified)."""
        if self.reuse is not None:
            with self._lock:
                before = self._items.get(self._key(raw))
            again = self.reuse(raw, before) if before is not None else None
            if again is not None:
                return again
        return self._kept(raw)

    @staticmethod
    def _key(obj: dict[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def _relist(self) -> str:
        """List in pages (as client-go's reflector does): only one page of whole objects is
        held at a time, next to the mirror's trimmed copies. Every page is read from the same
        snapshot; an expired continuation (410) starts the list over, as a failed list does."""
        items: dict[str, dict[str, Any]] = {}
        version, token = "", ""
        while True:
            paging: dict[str, Any] = {"limit": self.page} if self.page else {}
            if token:
                paging["_continue"] = token
            resp = self._as_dict(
                self._list_fn(_request_timeout=REQUEST_TIMEOUT, **paging, **self._kwargs)
            )
            with collector_paused():  # a page's worth of new objects, none of them cyclic
                for obj in resp.get("items") or []:
                    kept = self._kept(obj)
                    items[self._key(kept)] = kept
            meta = resp.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            token = str(meta.get("continue") or "")
            del resp  # this page's whole objects go before the next page is read
            if not token:
                break
        with self._lock:
            self._items = items
            self.seen = self.seen or bool(items)
            if self._grouped is not None:
                self._grouped = {}
                for name, obj in items.items():
                    self._group(name, None, obj)
        self.changes.note_all()
        self.last_contact = time.monotonic()
        self.synced.set()
        self._changed.set()
        return version

    def run(self, stop: threading.Event) -> None:
        """Thread body: list, watch from that version, and relist when the watch expires."""
        version = ""
        while not stop.is_set():
            try:
                if not version:
                    version = self._relist()
                self._watch = watch.Watch()
                seconds = max(1, int(self.watch_seconds * random.uniform(0.8, 1.0)))
                stream = self._watch.stream(
                    self._list_fn,
                    resource_version=version,
                    timeout_seconds=seconds,
                    allow_watch_bookmarks=True,
                    _request_timeout=(REQUEST_TIMEOUT[0], seconds + WATCH_GRACE),
                    **self._kwargs,
                )
                self.connected = True
                for event in stream:
                    self.last_contact = time.monotonic()
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
                    kept = raw if kind == "DELETED" else self._updated(raw)
                    with self._lock:
                        if kind == "DELETED":
                            before = self._items.pop(self._key(kept), None)
                            self._group(self._key(kept), before, None)
                            news = True
                        else:
                            before = self._items.get(self._key(kept))
                            self._items[self._key(kept)] = kept
                            self._group(self._key(kept), before, kept)
                            self.seen = True
                            news = (
                                before is None
                                or self.fingerprint is None
                                or self.fingerprint(before) != self.fingerprint(kept)
                            )
                    if news and self.interest is not None and not self.interest.wants(before, kept):
                        news = False
                        self.unused_events += 1
                    if news:
                        self.changes.note(before, kept)
                        self._changed.set()
            except Exception as e:  # the API server is away or silent: keep the cache, retry
                self.connected = False
                self.errors += 1
                status = getattr(e, "status", None)
                if status == 410:
                    version = ""
                log.warning(
                    "watch %s failed (%s); keeping %d cached objects",
                    self.name,
                    _short(e),
                    len(self._items),
                )
                stop.wait(self.retry_seconds)

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.stop()


#: Keyword arguments of a list or watch, and their query parameters.
_QUERY = (
    ("field_selector", "fieldSelector"),
    ("label_selector", "labelSelector"),
    ("limit", "limit"),
    ("_continue", "continue"),
    ("resource_version", "resourceVersion"),
    ("timeout_seconds", "timeoutSeconds"),
    ("allow_watch_bookmarks", "allowWatchBookmarks"),
    ("watch", "watch"),
)


def path_lister(api: client.ApiClient, path: str) -> ListFn:
    """List (or, with ``watch=True``, watch) the objects at an API path, as plain dicts.

    Without the typed client's class for the group: building ``CoreV1Api`` costs seconds on a
    loaded host and about 90 s under the test VM's emulation (it wraps hundreds of methods),
    all for the one list the agent makes of its own Node.
    """

    def list_fn(**kw: Any) -> Any:
        query = [(name, kw[key]) for key, name in _QUERY if kw.get(key) is not None]
        request = api.param_serialize(
            method="GET",
            resource_path=path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        return api._call_with_legacy_options(  # the typed clients' own call, shared
            request,
            {"200": "object", "401": None},
            False,
            kw.get("_preload_content", True),
            kw.get("_request_timeout"),
            True,
        )

    return list_fn


def secret_reader(api: client.ApiClient, namespace: str) -> Callable[[str], dict[str, str] | None]:
    """Read one Secret's ``data`` by name (None: no such Secret), by path like the lists."""

    def read(name: str) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        get = path_lister(api, f"/api/v1/namespaces/{namespace}/secrets/{name}")
        try:
            found = get(_request_timeout=(10, 10))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return {str(k): str(v) for k, v in ((found or {}).get("data") or {}).items()}

    return read


def _short(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = obj.get("metadata") or {}
    return meta


def kept_virtual_server(obj: dict[str, Any]) -> ReadVirtualServer:
    """What the VirtualServer mirror keeps of one: trimmed, then read at once (validated and
    typed), keeping its metadata and confirmed status but not its spec
    (:class:`~ipvs_agent.snapshot.ReadVirtualServer`)."""
    return read_on_arrival(trim.virtual_server(obj))


def kept_again(obj: dict[str, Any], before: dict[str, Any]) -> ReadVirtualServer | None:
    """A new version of a VirtualServer the mirror has read: with the last reading when it
    still holds (a status write), so the spec is neither copied nor validated again; None
    to read it anew (:func:`~ipvs_agent.snapshot.read_again`)."""
    return read_again(trim.virtual_server_head(obj), before)


def virtual_server_fingerprint(obj: dict[str, Any]) -> Any:
    """What the agent reads of a VirtualServer: its spec (by generation) and what the operator
    confirmed in status — not the conditions, nodes and counts the operator writes after
    every report, which would otherwise wake every agent for each other agent's report."""
    status = obj.get("status") or {}
    return (
        _meta(obj).get("generation"),
        _meta(obj).get("deletionTimestamp"),
        status.get("address"),
        status.get("addressPool"),
        status.get("firewallMark"),
    )


def node_fingerprint(obj: dict[str, Any]) -> Any:
    """What the agent reads of its Node: labels and addresses, not heartbeats and conditions."""
    addresses = ((obj.get("status") or {}).get("addresses")) or []
    return (repr(sorted((_meta(obj).get("labels") or {}).items())), repr(addresses))


def spec_fingerprint(obj: dict[str, Any]) -> Any:
    """An object whose status the agent never reads (AddressPools): its generation."""
    return _meta(obj).get("generation")


def mirrors(
    api: client.ApiClient,
    node_name: str,
    changed: threading.Event,
    retry_seconds: float = 2.0,
    bgp: bool = False,
) -> list[Mirror]:
    """The agent's mirrors: VirtualServers, EndpointSlices, its own Node, AddressPools, and
    with ``bgp`` the BGPPeers."""
    custom = client.CustomObjectsApi(api)

    def list_peers(**kw: Any) -> Any:
        return custom.list_cluster_custom_object(
            constants.GROUP, constants.VERSION, constants.BGP_PEERS, **kw
        )

    def list_virtual_servers(**kw: Any) -> Any:
        return custom.list_cluster_custom_object(
            constants.GROUP, constants.VERSION, constants.VIRTUAL_SERVERS, **kw
        )

    def list_pools(**kw: Any) -> Any:
        return custom.list_cluster_custom_object(
            constants.GROUP, constants.VERSION, constants.ADDRESS_POOLS, **kw
        )

    return [
        Mirror(
            "virtualservers",
            list_virtual_servers,
            api,
            changed,
            retry_seconds,
            fingerprint=virtual_server_fingerprint,
            transform=kept_virtual_server,
            reuse=kept_again,
        ),
        Mirror(
            "endpointslices",
            path_lister(api, "/apis/discovery.k8s.io/v1/endpointslices"),
            api,
            changed,
            retry_seconds,
            transform=trim.endpoint_slice,
            interest=Interest(service_of),
            changes=service_of,
        ),
        Mirror(
            "node",
            path_lister(api, "/api/v1/nodes"),
            api,
            changed,
            retry_seconds,
            fingerprint=node_fingerprint,
            transform=trim.node,
            field_selector=f"metadata.name={node_name}",
        ),
        Mirror(
            "addresspools",
            list_pools,
            api,
            changed,
            retry_seconds,
            fingerprint=spec_fingerprint,
            transform=trim.address_pool,
        ),
        *(
            [
                Mirror(
                    "bgppeers",
                    list_peers,
                    api,
                    changed,
                    retry_seconds,
                    fingerprint=spec_fingerprint,
                    transform=trim.bgp_peer,
                )
            ]
            if bgp
            else []
        ),
    ]


def daemon_set_mirror(
    api: client.ApiClient, namespace: str, name: str, changed: threading.Event
) -> Mirror:
    """A mirror of the agent's own DaemonSet: its deletion means the agent is uninstalled."""
    custom = client.CustomObjectsApi(api)

    def list_daemon_sets(**kw: Any) -> Any:
        return custom.list_namespaced_custom_object("apps", "v1", namespace, "daemonsets", **kw)

    return Mirror(
        "daemonset",
        list_daemon_sets,
        api,
        changed,
        transform=trim.daemon_set,
        field_selector=f"metadata.name={name}",
    )


def lease_mirror(api: client.ApiClient, namespace: str, changed: threading.Event) -> Mirror:
    """A mirror of the agents' Leases (layer-2 membership); its changes wake the speaker only,
    never a reconcile pass."""
    custom = client.CustomObjectsApi(api)

    def list_leases(**kw: Any) -> Any:
        return custom.list_namespaced_custom_object(
            "coordination.k8s.io", "v1", namespace, "leases", **kw
        )

    return Mirror(
        "leases",
        list_leases,
        api,
        changed,
        retry_seconds=0.5,
        transform=trim.lease,
        label_selector="app.kubernetes.io/component=agent-lease",
    )
