"""Raw cluster objects (dicts, from watches or from files) to the planner's inputs.

The in-cluster agent and ``ipvs-agent plan -f`` both end here, so both judge objects the same
way: an object that fails validation becomes a ``Failed``/``InvalidSpec`` outcome and is left
out, without disturbing the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipvs_agent.desired import EndpointIndex, Node, Outcome, Role, State
from ipvs_agent.health.verdict import Adjustments
from ipvs_agent.heap import collector_paused
from ipvs_agent.model import KernelInfo
from ipvs_api import InvalidObject, constants, load
from ipvs_api.endpoints import SERVICE_NAME_LABEL, Endpoint, endpoints_from_slices
from ipvs_api.rules import parse_ip
from ipvs_api.types import AddressPool, IPAddress, VirtualServer


@dataclass(frozen=True)
class Snapshot:
    """Everything the planner needs, taken at one moment."""

    virtual_servers: tuple[VirtualServer, ...]
    endpoints: EndpointIndex
    node: Node
    #: Outcomes of objects that could not even be read (invalid spec).
    rejected: Mapping[str, Outcome] = field(default_factory=dict)
    #: What health checks and feedback decided per real server (``ipvs-agent run`` only).
    adjustments: Adjustments = field(default_factory=dict)


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _read_one(obj: Mapping[str, Any]) -> VirtualServer | Outcome:
    try:
        return load.virtual_server(dict(obj))
    except InvalidObject as e:
        generation = int((obj.get("metadata") or {}).get("generation", 0) or 0)
        details = "; ".join(str(err) for err in e.errors)
        return Outcome(State.FAILED, "InvalidSpec", details, frozenset({Role.DIRECTOR}), generation)
    except Exception as e:  # malformed beyond the schema's reach (not a mapping, …)
        return Outcome(State.FAILED, "InvalidSpec", f"{type(e).__name__}: {e}")


class ReadVirtualServer(dict[str, Any]):
    """A VirtualServer as the agent's mirror keeps it: read once, when it arrived.

    The dict is the object's metadata and confirmed status, all that the mirror's key, its
    change journal and the fingerprint read. The spec is not kept: :attr:`read` holds what
    it was read into, the validated object or the outcome that refused it. The mirror used
    to keep the spec as parsed JSON beside its validated form, which was read again only
    when its resourceVersion changed, and it was the agent's largest holding.
    """

    __slots__ = ("read",)
    read: VirtualServer | Outcome


def read_on_arrival(obj: Mapping[str, Any]) -> ReadVirtualServer:
    """``obj`` read as a pass would read it (validated once per version, in the mirror's
    thread, instead of at the next pass); a bad object becomes its outcome, never an error."""
    entry = ReadVirtualServer((k, obj[k]) for k in ("metadata", "status") if k in obj)
    entry.read = _read_one(obj)
    return entry


def read_again(head: Mapping[str, Any], before: Mapping[str, Any]) -> ReadVirtualServer | None:
    """The entry for a new version of an object whose kept metadata and status are
    ``head``, with the reading of ``before`` (the mirror's entry for its last version), when
    that reading still holds; None when the spec must be read anew.

    It holds when both are the same object (uid) at the same generation, and all else that
    the mirror keeps is equal but the version. The API server raises a custom object's
    generation with every change to its spec, so the spec is the one read before. This is
    what an update from the operator's status writes looks like: each agent saw one per
    VirtualServer after every change, and validated it again.
    """
    if type(before) is not ReadVirtualServer:
        return None
    meta, was = head.get("metadata"), before.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(was, Mapping):
        return None
    generation, uid = meta.get("generation"), meta.get("uid")
    if type(generation) is not int or generation < 1 or not isinstance(uid, str) or not uid:
        return None
    if head.get("status") != before.get("status") or set(head) != set(before):
        return None
    # the reading reads the identity, creation time and generation; the rest of the kept
    # metadata (a deletion's timestamp) is compared too, for simplicity: all but the version
    if {k: v for k, v in meta.items() if k != "resourceVersion"} != {
        k: v for k, v in was.items() if k != "resourceVersion"
    }:
        return None
    entry = ReadVirtualServer(head)
    entry.read = before.read
    return entry


class ReadCache:
    """Validated VirtualServers by (namespace/name, resourceVersion), from one pass to the next.

    Validation is most of a pass's CPU with thousands of objects, and a resync sees the same
    versions again; an object without a resourceVersion (from a file) is always read anew.
    Only the last pass's entries are kept, so the cache never outgrows the mirror. The
    in-cluster agent's mirror hands over objects already read (:class:`ReadVirtualServer`),
    which need no cache.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], VirtualServer | Outcome] = {}

    def read(
        self, obj: Mapping[str, Any], keep: dict[tuple[str, str], VirtualServer | Outcome]
    ) -> VirtualServer | Outcome:
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if not version:
            return _read_one(obj)
        key = (_key(obj), version)
        found = self._entries.get(key)
        if found is None:
            found = _read_one(obj)
        keep[key] = found
        return found

    def replace(self, kept: dict[tuple[str, str], VirtualServer | Outcome]) -> None:
        self._entries = kept


class PoolCache:
    """AddressPools by name, validated once per resourceVersion (invalid ones left out: the
    operator reports them)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], AddressPool | None] = {}

    def read(self, objects: Iterable[Mapping[str, Any]]) -> dict[str, AddressPool]:
        kept: dict[tuple[str, str], AddressPool | None] = {}
        pools: dict[str, AddressPool] = {}
        for obj in objects:
            meta = obj.get("metadata") or {}
            key = (str(meta.get("name", "")), str(meta.get("resourceVersion", "")))
            if key in self._entries:
                pool = self._entries[key]
            else:
                try:
                    pool = load.address_pool(dict(obj))
                except (InvalidObject, ValueError, TypeError, KeyError):
                    pool = None
            kept[key] = pool
            if pool is not None:
                pools[pool.name] = pool
        self._entries = kept
        return pools


def read_virtual_servers(
    objects: Iterable[Mapping[str, Any]], cache: ReadCache | None = None
) -> tuple[tuple[VirtualServer, ...], dict[str, Outcome]]:
    """Validate each VirtualServer on its own; invalid ones become outcomes, not exceptions."""
    good: list[VirtualServer] = []
    bad: dict[str, Outcome] = {}
    kept: dict[tuple[str, str], VirtualServer | Outcome] = {}
    for obj in objects:
        if type(obj) is ReadVirtualServer:
            result = obj.read
        elif cache is not None:
            result = cache.read(obj, kept)
        else:
            result = _read_one(obj)
        if isinstance(result, Outcome):
            bad[_key(obj)] = result
        else:
            good.append(result)
    if cache is not None:
        cache.replace(kept)
    return tuple(good), bad


def service_of(endpoint_slice: Mapping[str, Any]) -> tuple[str, str] | None:
    """The (namespace, Service name) an EndpointSlice belongs to, by its service-name label
    (None: no label; such a slice is nobody's endpoints)."""
    meta = endpoint_slice.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    return (
        (str(meta.get("namespace", "")), service) if isinstance(service, str) and service else None
    )


def slices_by_service(
    slices: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The slices grouped by (namespace, Service name), by their service-name label."""
    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for s in slices:
        service = service_of(s)
        if service is not None:
            grouped[service].append(s)
    return grouped


def index_endpoints(slices: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[Endpoint]]:
    """Endpoints grouped by (namespace, Service name), from the slices' service-name label."""
    return {k: list(endpoints_from_slices(v)) for k, v in slices_by_service(slices).items()}


class EndpointCache:
    """Each Service's endpoints, parsed again only when its slices changed (by name and
    resourceVersion), from one pass to the next.

    Parsing every slice on every pass was most of a full pass's reading with thousands of
    Services. An unchanged Service gets the very same list back, which the plan memo then
    recognises without comparing it (``desired.PlanMemo``). A slice without a resourceVersion
    (from a file) is always parsed; only the last pass's Services are kept.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[frozenset[tuple[str, str]], list[Endpoint]]] = {}

    def index(self, slices: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[Endpoint]]:
        kept: dict[tuple[str, str], tuple[frozenset[tuple[str, str]], list[Endpoint]]] = {}
        for service, members in slices_by_service(slices).items():
            versions = frozenset(
                (str(meta.get("name", "")), str(meta.get("resourceVersion") or ""))
                for meta in (m.get("metadata") or {} for m in members)
            )
            found = self._entries.get(service)
            if found is not None and found[0] == versions and all(v for _, v in versions):
                kept[service] = found
            else:
                kept[service] = (versions, list(endpoints_from_slices(members)))
        self._entries = kept
        return {service: endpoints for service, (_, endpoints) in kept.items()}


def node_addresses(obj: Mapping[str, Any] | None) -> frozenset[IPAddress]:
    """The IP addresses in a Node's ``status.addresses`` (InternalIP, ExternalIP; not names)."""
    found: set[IPAddress] = set()
    for entry in ((obj or {}).get("status") or {}).get("addresses") or ():
        if not isinstance(entry, Mapping):
            continue
        addr = parse_ip(str(entry.get("address", "")))
        if addr is not None:
            found.add(addr)
    return frozenset(found)


def node_from(
    obj: Mapping[str, Any] | None,
    name: str,
    kernel: KernelInfo | None,
    addresses: Iterable[IPAddress] = (),
    protected_ports: Iterable[int] = (),
) -> Node:
    """The planner's Node: labels and addresses from the Node object, plus ``addresses``."""
    labels = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return Node(
        name=name,
        labels=dict(labels),
        kernel=kernel,
        addresses=node_addresses(obj) | frozenset(addresses),
        protected_ports=frozenset(protected_ports),
    )


def unadmitted(vs: VirtualServer) -> str | None:
    """What the operator has not (or not yet) confirmed: a requested address (in
    ``status.address``) or a firewall mark (in ``status.firewallMark``, granted by a pool)."""
    if vs.spec.address is not None and vs.status_address != vs.spec.address:
        return f"address {vs.spec.address}"
    if vs.spec.fwmark is not None and vs.status_fwmark != vs.spec.fwmark:
        return f"firewall mark {vs.spec.fwmark}"
    return None


@collector_paused()  # (see heap: the pass builds a table of small objects)
def take(
    virtual_servers: Iterable[Mapping[str, Any]],
    endpoint_slices: Iterable[Mapping[str, Any]],
    node: Node,
    *,
    admitted_only: bool = False,
    cache: ReadCache | None = None,
    endpoint_cache: EndpointCache | None = None,
) -> Snapshot:
    """The planner's inputs; ``admitted_only`` for the in-cluster agent (see below).

    In a cluster the operator decides who may use an address (pools that admit the namespace,
    conflicts between objects) and confirms a requested ``spec.address`` by copying it to
    ``status.address``; likewise a firewall mark, which only an AddressPool can grant, in
    ``status.firewallMark``. The in-cluster agent programs only what was confirmed, so neither
    a pool's namespace rule nor a cluster admin's grant of marks can be bypassed by writing
    into the spec. Without a cluster
    (``ipvs-agent plan/apply -f``) there is no operator and the spec is taken as it is.
    """
    good, bad = read_virtual_servers(virtual_servers, cache)
    if admitted_only:
        admitted: list[VirtualServer] = []
        for vs in good:
            waiting = unadmitted(vs)
            if waiting is None:
                admitted.append(vs)
            elif vs.spec.node_selector.matches(node.labels):
                bad[vs.key] = Outcome(
                    State.PENDING,
                    "AddressNotAdmitted",
                    f"waiting for the operator to confirm {waiting} "
                    "(see the VirtualServer's conditions)",
                    frozenset({Role.DIRECTOR}),
                    vs.generation,
                )
        good = tuple(admitted)
    index = (
        endpoint_cache.index(endpoint_slices)
        if endpoint_cache is not None
        else index_endpoints(endpoint_slices)
    )
    return Snapshot(good, index, node, bad)


def split_manifests(
    objects: Iterable[Mapping[str, Any]], default_namespace: str = "default"
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """Sort objects from files into VirtualServers, EndpointSlices and a Node (others ignored)."""
    vss: list[dict[str, Any]] = []
    slices: list[dict[str, Any]] = []
    node: dict[str, Any] | None = None
    for raw in objects:
        obj = dict(raw)
        kind, api = obj.get("kind"), str(obj.get("apiVersion", ""))
        if kind == constants.VIRTUAL_SERVER and api.startswith(constants.GROUP + "/"):
            meta = dict(obj.get("metadata") or {})
            meta.setdefault("namespace", default_namespace)
            obj["metadata"] = meta
            vss.append(obj)
        elif kind == "EndpointSlice":
            meta = dict(obj.get("metadata") or {})
            meta.setdefault("namespace", default_namespace)
            obj["metadata"] = meta
            slices.append(obj)
        elif kind == "Node":
            node = obj
    return vss, slices, node
