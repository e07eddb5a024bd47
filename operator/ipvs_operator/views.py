"""The operator's view of the cluster: what kopf indexes keep of each object, and lookups.

kopf keeps every watched object in in-memory indexes and calls no other handler before all of
them are filled from the initial listings. The entry functions below decide what is kept — a
trimmed copy, never managedFields or last-applied annotations — so memory stays proportional to
what the reconcilers read. They are pure; :class:`IndexViews` reads kopf's indexes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from ipvs_api import constants
from ipvs_api.endpoints import SERVICE_NAME_LABEL, Endpoint, endpoints_from_slices
from ipvs_operator import annotations as ann
from ipvs_operator import health
from ipvs_operator.status import DirectorReport

NamespacedKey = tuple[str, str]

#: Index ids (also the names kopf passes them under to startup handlers). kopf invokes every
#: index handler on every event of its resource, each through its whole handler machinery, so
#: each resource has one index: VirtualServers are kept by name and found by the Service that
#: owns them and by the backend Service they use through keys of one index (:data:`VS_KEY`,
#: :data:`BY_SERVICE`, :data:`BY_BACKEND`), and IPVSNodes give reports and agents alike
#: (IPVSNodeReports, the further slices of big nodes' reports, have an index of their own).
VIRTUAL_SERVERS: Final = "vs_index"
SERVICES: Final = "service_index"
POOLS: Final = "pool_index"
NAMESPACES: Final = "namespace_index"
SLICES: Final = "slice_index"
NODE_REPORTS: Final = "ipvs_node_index"
REPORT_SLICES: Final = "ipvs_node_report_index"
NODES: Final = "node_index"
PEERS: Final = "peer_index"
ALL: Final = (
    VIRTUAL_SERVERS,
    SERVICES,
    POOLS,
    NAMESPACES,
    SLICES,
    NODE_REPORTS,
    REPORT_SLICES,
    NODES,
    PEERS,
)

#: Key tags in the VirtualServer index: the object itself (trimmed), and its name under the
#: Service that made it and under the Service its backends are.
VS_KEY: Final = "vs"
BY_SERVICE: Final = "by-service"
BY_BACKEND: Final = "by-backend"
#: Key tags in the IPVSNode index: a VirtualServer's director report, and the agent's node.
REPORT_KEY: Final = "report"
AGENT_KEY: Final = ("agent",)

_META_KEYS = (
    "name",
    "namespace",
    "uid",
    "generation",
    "creationTimestamp",
    "resourceVersion",
    "labels",
    "ownerReferences",
)


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    return body.get("metadata") or {}


def _key(body: Mapping[str, Any]) -> NamespacedKey:
    meta = _meta(body)
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def trim(body: Mapping[str, Any], *, annotation_prefix: str | None = None) -> dict[str, Any]:
    """What reconcilers read: identity, labels, owners, spec and status.

    The metadata is copied field by field (leaving managedFields and other annotations behind).
    ``spec`` and ``status`` are kept as the parsed JSON of the watch event — plain dicts and
    lists that kopf drops once the event is processed and nobody changes — rather than copied
    again on every event: a deep copy of each was a tenth of the operator's time at scale.
    """
    meta = _meta(body)
    out_meta = {k: _plain(meta[k]) for k in _META_KEYS if k in meta}
    if annotation_prefix is not None:
        kept = {
            k: str(v)
            for k, v in (meta.get("annotations") or {}).items()
            if k.startswith(annotation_prefix)
        }
        if kept:
            out_meta["annotations"] = kept
    out: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": out_meta,
    }
    for part in ("spec", "status"):
        value = body.get(part)
        if value is not None:
            out[part] = value if type(value) is dict else _plain(value)
    return out


def _plain(value: Any) -> Any:
    """Deep copy into plain dicts and lists (kopf hands out read-only mapping views)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# -- index entries (object -> {key: value}) --------------------------------------------------


def virtual_server_entries(body: Mapping[str, Any]) -> dict[tuple[str, str, str], Any]:
    """A VirtualServer's entries in the one VirtualServer index: its trimmed copy, and its name
    under its owning Service (label) and under its backend Service."""
    namespace, name = _key(body)
    out: dict[tuple[str, str, str], Any] = {(VS_KEY, namespace, name): trim(body)}
    service = (_meta(body).get("labels") or {}).get(constants.LABEL_SERVICE_NAME)
    if service:
        out[(BY_SERVICE, namespace, str(service))] = name
    backend = (((body.get("spec") or {}).get("backends") or {}).get("service") or {}).get("name")
    if backend:
        out[(BY_BACKEND, namespace, str(backend))] = name
    return out


def service_entry(body: Mapping[str, Any]) -> dict[NamespacedKey, dict[str, Any]]:
    out = trim(body, annotation_prefix=ann.PREFIX)
    spec = out.get("spec") or {}
    if spec.get("type") != "LoadBalancer":
        # Kept small: only what is needed to notice the type changed away and clean up.
        out["spec"] = {"type": spec.get("type")}
    return {_key(body): out}


def pool_entry(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(_meta(body).get("name")): trim(body)}


def namespace_entry(body: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    labels = {str(k): str(v) for k, v in (_meta(body).get("labels") or {}).items()}
    return {str(_meta(body).get("name")): labels}


def slice_entry(body: Mapping[str, Any]) -> dict[NamespacedKey, tuple[Endpoint, ...]]:
    service = (_meta(body).get("labels") or {}).get(SERVICE_NAME_LABEL)
    if not service:
        return {}
    return {(_key(body)[0], str(service)): endpoints_from_slices([_plain(body)])}


def report_node(body: Mapping[str, Any]) -> str:
    """The node whose agent wrote an IPVSNode (its name) or an IPVSNodeReport (``spec.node``)."""
    if body.get("kind") == constants.IPVS_NODE_REPORT:
        return str((body.get("spec") or {}).get("node") or "")
    return str(_meta(body).get("name"))


def _text(value: Any) -> str:
    """A report's string, interned: the operator holds an entry per (node, VirtualServer),
    two million at 20 000 VirtualServers on 100 nodes, and each parsed report brings its
    own copy of the same names, states and reasons."""
    return sys.intern(str(value))


def report_entries(body: Mapping[str, Any]) -> dict[NamespacedKey, DirectorReport]:
    """The VirtualServers a node directs, from its IPVSNode's or IPVSNodeReport's entries.

    Entries that say the same thing share one :class:`DirectorReport`: a node reports most of
    its VirtualServers alike (Programmed at their generation), and the operator keeps an entry
    per (node, VirtualServer). Those naming real servers' health are each their own."""
    node = _text(report_node(body))
    out: dict[NamespacedKey, DirectorReport] = {}
    alike: dict[tuple[str, int | None, str, str, str | None], DirectorReport] = {}
    for entry in (body.get("status") or {}).get("virtualServers") or ():
        if "Director" not in (entry.get("roles") or ()):
            continue
        generation = entry.get("observedGeneration")
        announcement = (entry.get("announcement") or {}).get("mode")
        said = (
            _text(entry.get("state") or ""),
            int(generation) if generation is not None else None,
            _text(entry.get("reason") or ""),
            _text(entry.get("message") or ""),
            _text(announcement) if announcement else None,
        )
        health_reports = health.parse(entry)
        report = None if health_reports else alike.get(said)
        if report is None:
            state, observed, reason, message, mode = said
            report = DirectorReport(node, state, observed, reason, message, health_reports, mode)
            if not health_reports:
                alike[said] = report
        out[(_text(entry.get("namespace")), _text(entry.get("name")))] = report
    return out


class ReportReader:
    """:func:`report_entries`, remembered by identity from the index handler's reading to the
    event handler's (:meth:`take`).

    kopf hands each event's one body to the index handler and then to the event handler, and
    a report object holds up to some 1700 entries: each is parsed once. A body is held until
    taken, so its identity cannot be reused meanwhile; at most ``size`` are held, in case
    kopf ran an index handler without its event handler."""

    def __init__(self, size: int = 16) -> None:
        self._size = size
        self._read: dict[int, tuple[Mapping[str, Any], dict[NamespacedKey, DirectorReport]]] = {}

    def __call__(self, body: Mapping[str, Any]) -> dict[NamespacedKey, DirectorReport]:
        """The body's entries, remembered for :meth:`take`."""
        known = self._read.get(id(body))
        if known is not None and known[0] is body:
            return known[1]
        entries = report_entries(body)
        if len(self._read) >= self._size:
            del self._read[next(iter(self._read))]
        self._read[id(body)] = (body, entries)
        return entries

    def take(self, body: Mapping[str, Any]) -> dict[NamespacedKey, DirectorReport]:
        """The body's entries, read now or remembered, and forgotten."""
        known = self._read.pop(id(body), None)
        if known is not None and known[0] is body:
            return known[1]
        return report_entries(body)

    def __len__(self) -> int:
        return len(self._read)


def report_key(namespace: str, name: str) -> str:
    """The index key of one VirtualServer's reports, ``report/<namespace>/<name>``, interned.
    kopf keeps the key of every (node, VirtualServer) entry, two million at 20 000 x 100:
    one string per VirtualServer, shared by every node's entry, instead of a tuple each."""
    return sys.intern(f"{REPORT_KEY}/{namespace}/{name}")


def virtual_server_of(key: str) -> tuple[str, str]:
    """The (namespace, name) of a :func:`report_key` (a namespace holds no slash)."""
    _, namespace, name = key.split("/", 2)
    return namespace, name


def ipvs_node_entries(
    body: Mapping[str, Any],
    read: Callable[[Mapping[str, Any]], Mapping[NamespacedKey, DirectorReport]] = report_entries,
) -> dict[str | tuple[str, ...], Any]:
    """An IPVSNode's entries in the one IPVSNode index: its agent's node, and its reports
    (as ``read`` reads them)."""
    out: dict[str | tuple[str, ...], Any] = {AGENT_KEY: str(_meta(body).get("name"))}
    for (namespace, name), report in read(body).items():
        out[report_key(namespace, name)] = report
    return out


def report_slice_entries(
    body: Mapping[str, Any],
    read: Callable[[Mapping[str, Any]], Mapping[NamespacedKey, DirectorReport]] = report_entries,
) -> dict[str | tuple[str, ...], Any]:
    """An IPVSNodeReport's reports, keyed as in the IPVSNode index."""
    return {report_key(ns, name): r for (ns, name), r in read(body).items()}


def newest(reports: Iterable[DirectorReport]) -> dict[str, DirectorReport]:
    """One report per node. An agent moving entries between its objects (its report grew
    or shrank past a slice) writes the new place first, so for a moment a VirtualServer may
    be in two of them: the one for the later generation is the news."""
    out: dict[str, DirectorReport] = {}
    for r in reports:
        have = out.get(r.node)
        if have is None or (r.generation or 0) > (have.generation or 0):
            out[r.node] = r
    return out


def node_entry(body: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    return namespace_entry(body)


def peer_entry(body: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A BGPPeer's identity only: what an Event about it needs (``kubectl describe`` finds
    Events by the object's uid)."""
    meta = _meta(body)
    identity = {"name": str(meta.get("name")), "uid": str(meta.get("uid") or "")}
    return {
        identity["name"]: {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": identity,
        }
    }


# -- reading ------------------------------------------------------------------------------


class Views(Protocol):
    """What the reconcilers read; :class:`IndexViews` implements it over kopf's indexes."""

    def virtual_server(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def virtual_servers(self) -> list[dict[str, Any]]: ...
    def virtual_server_keys(self) -> list[NamespacedKey]: ...
    def owned_by_service(self, namespace: str, service: str) -> list[str]: ...
    def using_service(self, namespace: str, service: str) -> list[str]: ...
    def service(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def pools(self) -> list[dict[str, Any]]: ...
    def pool(self, name: str) -> dict[str, Any] | None: ...
    def namespace_labels(self, name: str) -> dict[str, str]: ...
    def endpoints(self, namespace: str, service: str) -> list[Endpoint]: ...
    def reports(self, namespace: str, name: str) -> dict[str, DirectorReport]: ...
    def agents(self) -> list[str]: ...
    def node_labels(self, name: str) -> dict[str, str] | None: ...
    def peer(self, name: str) -> dict[str, Any] | None: ...


def _one(index: Mapping[Any, Iterable[Any]], key: Any) -> Any:
    store = index.get(key)
    return next(iter(store), None) if store is not None else None


class IndexViews:
    """Lookups over kopf's indexes (``Mapping[key, Store]``, a Store iterating its values)."""

    def __init__(self, indices: Mapping[str, Mapping[Any, Iterable[Any]]]) -> None:
        self._i = indices

    def virtual_server(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _one(self._i[VIRTUAL_SERVERS], (VS_KEY, namespace, name))
        return found

    def virtual_servers(self) -> list[dict[str, Any]]:
        index = self._i[VIRTUAL_SERVERS]
        return [v for key, store in index.items() if key[0] == VS_KEY for v in store]

    def virtual_server_keys(self) -> list[NamespacedKey]:
        return [(key[1], key[2]) for key in self._i[VIRTUAL_SERVERS] if key[0] == VS_KEY]

    def owned_by_service(self, namespace: str, service: str) -> list[str]:
        return sorted(self._i[VIRTUAL_SERVERS].get((BY_SERVICE, namespace, service)) or ())

    def using_service(self, namespace: str, service: str) -> list[str]:
        return sorted(self._i[VIRTUAL_SERVERS].get((BY_BACKEND, namespace, service)) or ())

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _one(self._i[SERVICES], (namespace, name))
        return found

    def pools(self) -> list[dict[str, Any]]:
        return [v for store in self._i[POOLS].values() for v in store]

    def pool(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _one(self._i[POOLS], name)
        return found

    def namespace_labels(self, name: str) -> dict[str, str]:
        found: dict[str, str] | None = _one(self._i[NAMESPACES], name)
        return found or {}

    def endpoints(self, namespace: str, service: str) -> list[Endpoint]:
        return [e for s in self._i[SLICES].get((namespace, service)) or () for e in s]

    def reports(self, namespace: str, name: str) -> dict[str, DirectorReport]:
        key = report_key(namespace, name)
        found = self._i[NODE_REPORTS].get(key) or ()
        more = self._i[REPORT_SLICES].get(key)
        return newest([*found, *more] if more else found)

    def agents(self) -> list[str]:
        return sorted(self._i[NODE_REPORTS].get(AGENT_KEY) or ())

    def node_labels(self, name: str) -> dict[str, str] | None:
        found: dict[str, str] | None = _one(self._i[NODES], name)
        return found

    def peer(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = _one(self._i[PEERS], name)
        return found
