"""What the agent keeps of each API object it mirrors: exactly the fields it reads, no more.

An object as the API server returns it carries much the agent never reads: ``managedFields``
(often the largest part of a small object), the ``kubectl.kubernetes.io/last-applied-
configuration`` annotation (a second copy of the spec), the status the operator writes for
people (conditions, node counts), a Node's images and conditions, an EndpointSlice's target
references and topology. As client-go's informers do with ``SetTransform``, each mirror passes
what it lists and watches through one of the pure functions here before storing it
(:class:`ipvs_agent.cluster.Mirror`'s ``transform``), so the mirror holds only what its
consumers read. Each function names its consumers; a field one of them starts reading must be
added here too (``tests/unit/test_trim.py`` checks that trimmed objects are read exactly as
the whole ones are).

What is kept is copied, down to the strings and numbers: the copy shares nothing with the
object it came from but shared strings. A list response is parsed at once, so its objects
fill the heap side by side; a kept string still pointing into that heap would keep the memory
of the whole response around it (Python returns heap memory to the system only in whole
arenas), and dropping three quarters of each object would save nothing measurable. Keys and
enum-like words ("TCP", "wlc", a namespace) are shared: ten thousand objects hold one copy
(the functions are pure all the same: equal input, equal output).

Something that is not the expected shape (an object without a mapping for ``metadata``, a
``status`` that is a string) is kept as it is, so that validation refuses it exactly as it
would the whole object.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

from ipvs_api.endpoints import SERVICE_NAME_LABEL
from ipvs_api.leases import ANNOTATION_LABELS, ANNOTATION_UNREADY

Obj = dict[str, Any]
Transform = Callable[[Obj], Obj]

#: Metadata every mirror keeps: the object's identity and version (the mirror's key, the
#: validation caches' key by resourceVersion, ``uid`` and ``creationTimestamp`` for the typed
#: VirtualServer), ``generation`` (the fingerprints and the reports' observed generation) and
#: ``deletionTimestamp`` (a VirtualServer's fingerprint; the DaemonSet's "being uninstalled").
META: Final = (
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
)
#: What the agent reads of a VirtualServer's status: the address, pool and firewall mark the
#: operator confirmed (``load.virtual_server``; ``snapshot.unadmitted``; the fingerprint).
VIRTUAL_SERVER_STATUS: Final = ("address", "addressPool", "firewallMark")
#: An EndpointSlice endpoint as ``endpoints_from_slices`` reads it.
ENDPOINT: Final = ("addresses", "nodeName")
ENDPOINT_CONDITIONS: Final = ("ready", "serving", "terminating")
ENDPOINT_PORT: Final = ("name", "port", "protocol")
#: A Lease as ``ipvs_api.leases.read_lease`` reads it.
LEASE_SPEC: Final = ("holderIdentity", "leaseDurationSeconds", "renewTime")
LEASE_ANNOTATIONS: Final = (ANNOTATION_LABELS, ANNOTATION_UNREADY)


#: Strings this short made only of letters are words of an enumeration ("TCP", "Cluster"),
#: the same in thousands of objects: shared. Others (addresses, names, versions) are copied.
_WORD: Final = 24
#: The shared strings, each our own copy (at most this many; then strings are only copied).
_SHARED: dict[str, str] = {}
_SHARED_MAX: Final = 4096


def _copied(text: str) -> str:
    """A new string equal to ``text`` (one character strings are the interpreter's own)."""
    return text.encode().decode() if len(text) > 1 else text


def _shared(text: str) -> str:
    """One copy of a string repeated across objects (a key, a namespace, a kind): ours, not
    the parsed response's (interning that would keep its part of the heap)."""
    found = _SHARED.get(text)
    if found is None:
        found = _copied(text)
        if len(_SHARED) < _SHARED_MAX:
            _SHARED[found] = found
    return found


def _fresh(value: Any) -> Any:
    """A copy of JSON data sharing nothing with it but shared strings and constants."""
    kind = type(value)
    if kind is dict:
        return {_shared(k) if type(k) is str else k: _fresh(v) for k, v in value.items()}
    if kind is list:
        return [_fresh(v) for v in value]
    if kind is str:
        return _shared(value) if len(value) <= _WORD and value.isalpha() else _copied(value)
    if kind is int:
        return value + 0  # a new object, or the interpreter's own small integer
    if kind is float:
        return value + 0.0
    return value  # None, True, False


def _pick(source: Mapping[str, Any], keys: Collection[str]) -> Obj:
    """Fresh copies of the named entries of ``source``, in its order (validation reports
    errors in it)."""
    return {_shared(k): _fresh(v) for k, v in source.items() if k in keys}


def _meta(
    obj: Mapping[str, Any], labels: Collection[str] = (), annotations: Collection[str] = ()
) -> Obj:
    """The kept metadata, with only the named labels and annotations (if present)."""
    meta = obj["metadata"]
    kept = _pick(meta, META)
    if type(kept.get("namespace")) is str:
        kept["namespace"] = _shared(kept["namespace"])
    for field, names in (("labels", labels), ("annotations", annotations)):
        found = meta.get(field)
        if names and isinstance(found, Mapping):
            chosen = _pick(found, names)
            if chosen:
                kept[field] = chosen
    return kept


def _envelope(obj: Mapping[str, Any]) -> Obj:
    """``apiVersion`` and ``kind`` (validation checks them), shared strings."""
    return {k: _share(obj[k]) for k in ("apiVersion", "kind") if k in obj}


def _share(value: Any) -> Any:
    """A string shared across objects (a node's name, an address type), or a fresh copy."""
    return _shared(value) if type(value) is str else _fresh(value)


def _shaped(obj: Any, *fields: str) -> bool:
    """Whether ``obj`` is a mapping whose ``metadata`` and ``fields`` (when present) are too."""
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("metadata"), Mapping)
        and all(isinstance(obj[f], Mapping) for f in fields if f in obj)
    )


def custom_object(obj: Obj, status: Collection[str] | None = ()) -> Obj:
    """A VirtualServer, AddressPool or BGPPeer: everything but metadata and status as it is
    (validation reads all of the spec, and refuses unknown fields), the kept metadata, and of
    the status only the named fields (``None``: the status as it is, for a kind whose schema
    has none, so that validation refuses one alike).

    Validation also walks the status it is given; the status fields left out are ones the API
    server validated against the same schema when they were written (and pruned of unknown
    fields), so they can only pass: leaving them out changes no verdict.
    """
    if not _shaped(obj, "status"):
        return obj
    out = _envelope(obj)
    for key, value in obj.items():
        if key not in ("apiVersion", "kind", "metadata", "status"):
            out[_shared(key)] = _fresh(value)
    out.update(_head(obj, status))
    return out


def _head(obj: Obj, status: Collection[str] | None) -> Obj:
    """The kept metadata and status of a custom object (see :func:`custom_object`)."""
    out: Obj = {"metadata": _meta(obj)}
    if status is None:
        if "status" in obj:
            out["status"] = _fresh(obj["status"])
        return out
    kept = _pick(obj.get("status") or {}, status)
    if kept:
        out["status"] = kept
    return out


def virtual_server(obj: Obj) -> Obj:
    """A VirtualServer as ``load.virtual_server`` and the fingerprint read it: the whole spec,
    identity and generation, and the confirmed address, pool and firewall mark. (The
    mirror then reads it and keeps the reading instead of the spec:
    ``cluster.kept_virtual_server``.)"""
    return custom_object(obj, VIRTUAL_SERVER_STATUS)


def virtual_server_head(obj: Obj) -> Obj:
    """Of a VirtualServer, only the metadata and status that :func:`virtual_server` keeps
    (an odd shape: its metadata and status as they are), without copying the spec: the
    mirror's entry when the object's spec needs no new reading (``cluster.kept_again``)."""
    if not _shaped(obj, "status"):
        return {k: obj[k] for k in ("metadata", "status") if k in obj}
    return _head(obj, VIRTUAL_SERVER_STATUS)


def address_pool(obj: Obj) -> Obj:
    """An AddressPool as ``load.address_pool`` reads it: the spec; no status (the operator's
    allocation counts and conditions)."""
    return custom_object(obj)


def bgp_peer(obj: Obj) -> Obj:
    """A BGPPeer as ``load.bgp_peer`` reads it: the spec (the kind has no status)."""
    return custom_object(obj, status=None)


def endpoint_slice(obj: Obj) -> Obj:
    """An EndpointSlice as ``snapshot.index_endpoints`` and ``endpoints_from_slices`` read it:
    the service-name label, ``addressType``, each port's name, number and protocol, and each
    endpoint's addresses, node and ready/serving/terminating conditions (not its target
    reference, hostname, zone or hints)."""
    if not _shaped(obj):
        return obj
    out: Obj = {"metadata": _meta(obj, labels=(SERVICE_NAME_LABEL,))}
    if "addressType" in obj:
        out["addressType"] = _share(obj["addressType"])
    ports = obj.get("ports")
    if isinstance(ports, list):
        out["ports"] = [_pick(p, ENDPOINT_PORT) if isinstance(p, Mapping) else p for p in ports]
    elif ports is not None:
        out["ports"] = ports
    endpoints = obj.get("endpoints")
    if isinstance(endpoints, list):
        out["endpoints"] = [_endpoint(e) for e in endpoints]
    elif endpoints is not None:
        out["endpoints"] = endpoints
    return out


def _endpoint(entry: Any) -> Any:
    if not isinstance(entry, Mapping):
        return entry
    out = _pick(entry, ENDPOINT)
    addresses = out.get("addresses")
    if type(addresses) is list:  # interned, as the planner interns them (see virtual_server)
        out["addresses"] = [sys.intern(a) if type(a) is str else a for a in addresses]
    if "nodeName" in out:
        out["nodeName"] = _share(out["nodeName"])
    conditions = entry.get("conditions")
    if isinstance(conditions, Mapping):
        out["conditions"] = _pick(conditions, ENDPOINT_CONDITIONS)
    elif conditions is not None:
        out["conditions"] = conditions
    return out


def node(obj: Obj) -> Obj:
    """The agent's Node as ``snapshot.node_from`` and the fingerprint read it: labels and
    ``status.addresses`` (and ``uid``, which the IPVSNode report's owner reference names); not
    its images, conditions, capacity or spec."""
    if not _shaped(obj, "status"):
        return obj
    meta = _meta(obj)
    labels = obj["metadata"].get("labels")
    if labels is not None:
        meta["labels"] = _fresh(labels)
    out: Obj = {"metadata": meta}
    status = obj.get("status") or {}
    if "addresses" in status:
        out["status"] = {"addresses": _fresh(status["addresses"])}
    return out


def daemon_set(obj: Obj) -> Obj:
    """The agent's own DaemonSet: only that it exists and whether it is being deleted."""
    if not _shaped(obj):
        return obj
    return {"metadata": _meta(obj)}


def lease(obj: Obj) -> Obj:
    """An agent's Lease as ``read_lease`` reads it: holder, duration, renewal, and the node
    labels and unready addresses in its annotations."""
    if not _shaped(obj, "spec"):
        return obj
    return {
        "metadata": _meta(obj, annotations=LEASE_ANNOTATIONS),
        "spec": _pick(obj.get("spec") or {}, LEASE_SPEC),
    }
