"""What the agent's mirrors keep (ipvs_agent.trim): trimmed objects are read exactly as whole.

Every object here is first made realistic (``tests.served``: managedFields, kubectl's
last-applied annotation, the operator's status), then trimmed; what the agent's readers make of
the trimmed object — validation and the typed object, the snapshot the planner takes, the
endpoints, the Node, Leases, the fingerprints that decide whether a change wakes a pass —
must be what they make of the whole one.
"""

from __future__ import annotations

import copy
import json
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipvs_agent import cluster, trim
from ipvs_agent.desired import Node, Outcome, plan
from ipvs_agent.snapshot import (
    ReadVirtualServer,
    index_endpoints,
    node_from,
    read_virtual_servers,
    take,
)
from ipvs_api import InvalidObject, constants, load
from ipvs_api.endpoints import SERVICE_NAME_LABEL, endpoints_from_slices
from ipvs_api.leases import ANNOTATION_LABELS, ANNOTATION_UNREADY, read_lease
from tests.served import LAST_APPLIED, served
from tests.unit.test_health_api import VALID_SPECS
from tests.unit.test_validation import CORPUS, corpus_object, example_objects


def read(obj: dict[str, Any]) -> Any:
    """What validation makes of an object: the typed object, or the exact errors."""
    loader = {
        constants.VIRTUAL_SERVER: load.virtual_server,
        constants.ADDRESS_POOL: load.address_pool,
        constants.BGP_PEER: load.bgp_peer,
    }[obj["kind"]]
    try:
        return loader(copy.deepcopy(obj))
    except InvalidObject as e:
        return ("invalid", e.kind, e.name, e.errors)


TRIMS = {
    constants.VIRTUAL_SERVER: trim.virtual_server,
    constants.ADDRESS_POOL: trim.address_pool,
    constants.BGP_PEER: trim.bgp_peer,
}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every VirtualServer, AddressPool and BGPPeer the tests know: examples/, the valid
    health-check shapes, and the invalid corpus."""
    found = list(example_objects())
    for name, spec in sorted(VALID_SPECS.items()):
        found.append(
            (
                f"health:{name}",
                {
                    "apiVersion": constants.API_VERSION,
                    "kind": constants.VIRTUAL_SERVER,
                    "metadata": {"name": name, "namespace": "ns"},
                    "spec": spec,
                },
            )
        )
    found += [(f"corpus:{c['name']}", corpus_object(c)) for c in CORPUS]
    return found


MANIFESTS = manifests()
FIRST_VS = next(m for _, m in MANIFESTS if m["kind"] == constants.VIRTUAL_SERVER)


@pytest.mark.parametrize(("name", "manifest"), MANIFESTS, ids=[n for n, _ in MANIFESTS])
def test_a_trimmed_object_validates_and_reads_exactly_as_the_whole_one(
    name: str, manifest: dict[str, Any]
) -> None:
    whole = served(manifest, 7)
    before = copy.deepcopy(whole)
    trimmed = TRIMS[whole["kind"]](whole)
    assert whole == before, "trimming must not change the object it is given"
    assert read(trimmed) == read(whole)
    meta = trimmed["metadata"]
    assert "managedFields" not in meta and "annotations" not in meta and "labels" not in meta
    assert set(trimmed.get("status") or {}) <= set(trim.VIRTUAL_SERVER_STATUS)
    if whole["kind"] != constants.VIRTUAL_SERVER:
        assert "status" not in trimmed


def test_the_corpus_covers_valid_and_invalid_objects_of_every_kind() -> None:
    results = [read(served(m)) for _, m in MANIFESTS]
    assert sum(1 for r in results if isinstance(r, tuple)) >= 30
    assert sum(1 for r in results if not isinstance(r, tuple)) >= 15
    assert {m["kind"] for _, m in MANIFESTS} == set(TRIMS)


def test_what_a_virtual_server_keeps() -> None:
    whole = served(FIRST_VS, 3)
    whole["metadata"]["deletionTimestamp"] = "2026-12-03T19:01:00Z"
    whole["metadata"]["finalizers"] = ["ipvs.io/drain"]
    trimmed = trim.virtual_server(whole)
    assert set(trimmed) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert set(trimmed["metadata"]) == {
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
    }
    assert trimmed["spec"] == whole["spec"] and trimmed["spec"] is not whole["spec"]
    assert trimmed["status"] == {
        k: whole["status"][k] for k in trim.VIRTUAL_SERVER_STATUS if k in whole["status"]
    }
    assert trimmed["status"]
    assert LAST_APPLIED in whole["metadata"]["annotations"]
    # the mirror keeps less still: the spec is read as it arrives, and only its reading kept
    kept = cluster.kept_virtual_server(whole)
    assert kept == {"metadata": trimmed["metadata"], "status": trimmed["status"]}
    assert kept.read == load.virtual_server(whole)
    assert len(json.dumps(trimmed)) < len(json.dumps(whole)) / 2


@pytest.mark.parametrize("kind", ["virtual_server", "endpoint_slice", "node", "lease"])
def test_nothing_of_the_whole_object_stays_reachable(kind: str) -> None:
    """The mirror holds the trimmed copy only: no dict, list, string or number of the API
    server's response stays reachable from it (one would keep the memory of the response
    around it), except the interpreter's own constants."""
    whole = json.loads(json.dumps(_whole(kind)))  # parsed, as a response is
    trimmed = getattr(trim, kind)(whole)
    originals = {id(x) for x in _parts(whole) if not _constant(x)}
    assert not [x for x in _parts(trimmed) if id(x) in originals]


def _whole(kind: str) -> dict[str, Any]:
    if kind == "endpoint_slice":
        return endpoint_slice("web", 1)
    if kind == "node":
        return node_object()
    if kind == "lease":
        return served(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": "l",
                    "namespace": "n",
                    "annotations": {ANNOTATION_LABELS: "{}"},
                },
                "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 2, "renewTime": "t1"},
            }
        )
    return served(FIRST_VS, 4242, defaults=True)


def _parts(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value, *(p for k, v in value.items() for p in (*_parts(k), *_parts(v)))]
    if isinstance(value, list):
        return [value, *(p for v in value for p in _parts(v))]
    return [value]


def _constant(value: Any) -> bool:
    """None, booleans, small integers, one-character strings: the interpreter's singletons."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -5 <= value <= 256
    return isinstance(value, str) and len(value) <= 1


def test_repeated_words_and_keys_are_one_copy_across_objects() -> None:
    a, b = (
        trim.virtual_server(json.loads(json.dumps(served(m, i, defaults=True))))
        for i, m in enumerate([FIRST_VS] * 2)
    )
    assert a["kind"] is b["kind"] and a["metadata"]["namespace"] is b["metadata"]["namespace"]
    key_a = next(k for k in a["spec"] if k == "backends")
    key_b = next(k for k in b["spec"] if k == "backends")
    assert key_a is key_b
    assert a["spec"]["forwarding"]["method"] is b["spec"]["forwarding"]["method"]


def test_the_mirror_and_the_plan_hold_one_string_per_real_server_address() -> None:
    """Trimmed EndpointSlices intern their addresses as the planner does, so the plan's
    DestKeys hold the mirror's own strings. (A VirtualServer's static real servers are not
    kept as text at all: the mirror keeps the validated object, not the spec.)"""
    manifest = {
        "apiVersion": constants.API_VERSION,
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {"name": "shared", "namespace": "shop"},
        "spec": {
            "address": "203.0.113.77",
            "ports": [{"port": 80}],
            "backends": {"service": {"name": "web"}},
        },
    }
    vs = cluster.kept_virtual_server(json.loads(json.dumps(served(manifest, 7, defaults=True))))
    web = trim.endpoint_slice(json.loads(json.dumps(endpoint_slice("web", 77))))
    node = Node("node-a", {})
    snap = take([vs], [web], node)
    p = plan(snap.virtual_servers, snap.endpoints, node)
    planned = {k.address: k.address for s in p.table.values() for k in s.dests}
    addresses = [address for entry in web["endpoints"] for address in entry["addresses"]]
    assert len(planned) >= 3 and set(planned) <= set(addresses)  # (not the unready one)
    for address in addresses:
        assert address is sys.intern(address)
        assert planned.get(address, address) is address


#: Status values as they could arrive: right and wrong types, for the fields the agent reads.
status_values = st.one_of(
    st.none(),
    st.sampled_from(["192.0.2.10", "2001:db8::1", "not-an-ip", "", "pool-a"]),
    st.integers(-1, 2**33),
    st.booleans(),
    st.lists(st.integers(0, 3), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(MANIFESTS) - 1),
    status=st.dictionaries(
        st.sampled_from(
            ["address", "addressPool", "firewallMark", "observedGeneration", "conditions"]
        ),
        status_values,
        max_size=4,
    ),
    generation=st.integers(1, 5),
    deleting=st.booleans(),
)
def test_round_trip_over_any_status_and_metadata(
    index: int, status: dict[str, Any], generation: int, deleting: bool
) -> None:
    """load(trim(obj)) == load(obj) for every object of the corpus with arbitrary values in
    the status fields the agent reads (validation refuses the same wrong types), and the
    fingerprints agree. Fields the agent does not read keep API-server-valid values: the API
    server validated them against the same schema when they were written."""
    manifest = copy.deepcopy(MANIFESTS[index][1])
    manifest["metadata"]["generation"] = generation
    if deleting:
        manifest["metadata"]["deletionTimestamp"] = "2026-12-03T19:01:00Z"
    unread = {"observedGeneration", "conditions"}
    status = {k: v for k, v in status.items() if k not in unread}
    served_status: dict[str, Any] | None = {"observedGeneration": generation, **status}
    if manifest["kind"] == constants.ADDRESS_POOL:
        served_status = {"observedGeneration": generation, "allocated": 3}
    elif manifest["kind"] == constants.BGP_PEER:
        served_status = None  # the kind has no status (the API server prunes one)
    whole = served(manifest, index, status=served_status)
    trimmed = TRIMS[whole["kind"]](whole)
    assert read(trimmed) == read(whole)
    assert cluster.virtual_server_fingerprint(trimmed) == cluster.virtual_server_fingerprint(whole)
    assert cluster.spec_fingerprint(trimmed) == cluster.spec_fingerprint(whole)
    if whole["kind"] == constants.VIRTUAL_SERVER:  # what the mirror keeps: read on arrival
        kept = cluster.kept_virtual_server(whole)
        assert read_virtual_servers([kept]) == read_virtual_servers([whole])
        fingerprint = cluster.virtual_server_fingerprint
        assert fingerprint(kept) == fingerprint(whole)
        assert cluster.Mirror._key(kept) == cluster.Mirror._key(whole)


def test_odd_shapes_are_kept_as_they_are_so_validation_judges_them_alike() -> None:
    base = served(FIRST_VS)
    for odd in ("a string status", None, ["a", "list"]):
        obj = {**base, "status": odd}
        assert trim.virtual_server(obj) is obj
    no_meta = {k: v for k, v in base.items() if k != "metadata"}
    assert trim.virtual_server(no_meta) is no_meta
    extra = {**base, "specs": {"typo": True}}  # unknown fields: validation refuses them
    assert read(trim.virtual_server(extra)) == read(extra)
    assert isinstance(read(extra), tuple)
    # read on arrival, an odd object becomes the outcome a pass would have made of it
    for odd_obj in [{**base, "status": "a string status"}, {**base, "status": None}, extra]:
        kept = cluster.kept_virtual_server(odd_obj)
        assert read_virtual_servers([kept]) == read_virtual_servers([odd_obj])
    kept = cluster.kept_virtual_server(no_meta)
    assert read_virtual_servers([kept]) == read_virtual_servers([no_meta])
    assert isinstance(kept.read, Outcome) and "spec" not in kept


# --- the planner's whole input ----------------------------------------------------------------


def endpoint_slice(service: str, index: int, ready: bool | None = True) -> dict[str, Any]:
    """An EndpointSlice as the EndpointSlice controller writes it."""
    conditions: dict[str, Any] = {"serving": True, "terminating": False}
    if ready is not None:
        conditions["ready"] = ready
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": f"{service}-{index:05x}",
            "generateName": f"{service}-",
            "namespace": "shop",
            "uid": f"uid-{index}",
            "resourceVersion": str(500 + index),
            "generation": 3,
            "creationTimestamp": "2026-12-03T19:00:00Z",
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": service,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-03"},
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Service", "name": service, "uid": "s-uid"}
            ],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {}}
            ],
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [f"10.1.{index % 250}.{j + 1}"],
                "conditions": {**conditions, "ready": j != 1} if j else conditions,
                "hostname": f"pod-{j}",
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": f"pod-{j}", "uid": "u"},
                "nodeName": f"node-{j % 3}",
                "zone": "zone-a",
                "hints": {"forZones": [{"name": "zone-a"}]},
            }
            for j in range(4)
        ]
        + [{"addresses": ["10.9.9.9"], "nodeName": "node-0"}],  # no conditions at all
        "ports": [
            {"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"port": 9000},
        ],
    }


def node_object() -> dict[str, Any]:
    node = served(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"ipvs.io/director": "true"}},
            "spec": {"podCIDR": "10.244.0.0/24", "taints": [{"key": "k", "effect": "NoSchedule"}]},
        },
        status={
            "addresses": [
                {"type": "InternalIP", "address": "192.0.2.5"},
                {"type": "InternalIP", "address": "2001:db8::5"},
                {"type": "Hostname", "address": "node-a"},
            ],
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "t"}],
            "images": [{"names": [f"registry/image-{i}:v1"], "sizeBytes": i} for i in range(50)],
            "nodeInfo": {"kernelVersion": "6.1.0", "kubeletVersion": "v1.35.0"},
            "capacity": {"cpu": "2", "memory": "8Gi"},
        },
    )
    return node


@pytest.mark.parametrize("ready", [True, False, None])
def test_a_trimmed_endpoint_slice_gives_the_same_endpoints(ready: bool | None) -> None:
    whole = [endpoint_slice("web", i, ready) for i in range(3)] + [
        {**endpoint_slice("fqdn", 9), "addressType": "FQDN"}
    ]
    trimmed = [trim.endpoint_slice(s) for s in whole]
    assert endpoints_from_slices(trimmed) == endpoints_from_slices(whole)
    assert index_endpoints(trimmed) == index_endpoints(whole)
    kept = trimmed[0]
    assert set(kept) == {"metadata", "addressType", "endpoints", "ports"}
    assert kept["metadata"]["labels"] == {SERVICE_NAME_LABEL: "web"}
    assert set(kept["metadata"]) == {
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "labels",
    }
    assert set(kept["endpoints"][0]) == {"addresses", "conditions", "nodeName"}
    assert kept["ports"][0] == {"name": "http", "port": 8080, "protocol": "TCP"}


def test_a_trimmed_node_reads_alike_and_keeps_no_images_or_heartbeats() -> None:
    whole = node_object()
    trimmed = trim.node(whole)
    assert node_from(trimmed, "node-a", None) == node_from(whole, "node-a", None)
    assert cluster.node_fingerprint(trimmed) == cluster.node_fingerprint(whole)
    assert trimmed["metadata"]["uid"] == whole["metadata"]["uid"]  # the IPVSNode's owner
    assert set(trimmed) == {"metadata", "status"} and set(trimmed["status"]) == {"addresses"}
    assert "annotations" not in trimmed["metadata"]
    beat = copy.deepcopy(whole)
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "later"
    assert trim.node(beat) == trimmed


def test_the_whole_snapshot_is_the_same_from_trimmed_objects() -> None:
    """What one pass plans from: take() over whole and trimmed mirrors (admitted only, as
    the in-cluster agent takes it)."""
    vss = []
    for i, (_, manifest) in enumerate(MANIFESTS):
        if manifest["kind"] == constants.VIRTUAL_SERVER:
            obj = served(manifest, i)
            obj["metadata"]["name"] = f"vs-{i}"
            vss.append(obj)
    slices = [endpoint_slice(name, i) for i, name in enumerate(["web", "dns", "web", "api"])]
    node = node_from(trim.node(node_object()), "node-a", None)
    whole = take(vss, slices, node, admitted_only=True)
    trimmed = take(
        [trim.virtual_server(v) for v in vss],
        [trim.endpoint_slice(s) for s in slices],
        node,
        admitted_only=True,
    )
    assert trimmed == whole
    # as the VirtualServer mirror keeps them: read on arrival, without their spec
    kept = [cluster.kept_virtual_server(v) for v in vss]
    assert all(isinstance(k, ReadVirtualServer) and "spec" not in k for k in kept)
    assert take(kept, slices, node, admitted_only=True) == whole
    assert len(whole.virtual_servers) >= 10 and len(whole.rejected) >= 30
    assert node == node_from(node_object(), "node-a", None)
    assert isinstance(node, Node)


def test_a_trimmed_lease_reads_alike() -> None:
    whole = served(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": "ipvs-agent-node-a",
                "namespace": "ipvs-system",
                "labels": {"app.kubernetes.io/component": "agent-lease"},
                "annotations": {
                    ANNOTATION_LABELS: json.dumps({"zone": "a"}),
                    ANNOTATION_UNREADY: "192.0.2.7,2001:db8::7",
                },
            },
            "spec": {
                "holderIdentity": "node-a",
                "leaseDurationSeconds": 2,
                "renewTime": "2026-12-03T19:00:00.123456Z",
                "acquireTime": "2026-12-03T18:00:00.000000Z",
                "leaseTransitions": 4,
            },
        }
    )
    trimmed = trim.lease(whole)
    assert read_lease(trimmed) == read_lease(whole) is not None
    assert set(trimmed["metadata"]["annotations"]) == {ANNOTATION_LABELS, ANNOTATION_UNREADY}
    assert set(trimmed["spec"]) == {"holderIdentity", "leaseDurationSeconds", "renewTime"}


def test_a_trimmed_daemon_set_keeps_only_that_it_is_being_deleted() -> None:
    whole = served(
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "ipvs-agent", "namespace": "ipvs-system"},
            "spec": {"template": {"spec": {"containers": [{"name": "agent", "image": "x"}]}}},
        },
        status={"numberReady": 3},
    )
    assert trim.daemon_set(whole) == {
        "metadata": {k: whole["metadata"][k] for k in trim.META if k in whole["metadata"]}
    }
    whole["metadata"]["deletionTimestamp"] = "2026-12-03T19:01:00Z"
    assert trim.daemon_set(whole)["metadata"]["deletionTimestamp"] == "2026-12-03T19:01:00Z"


def test_status_only_writes_still_cost_no_pass_on_trimmed_objects() -> None:
    """The fingerprints see the trimmed objects the mirror stores: the operator's status
    writes (conditions, counts, announcement) leave them alone; a confirmed address, a spec
    change or a deletion does not."""
    manifest = next(m for n, m in MANIFESTS if n.startswith("nat-service"))
    first = served(manifest, 1)
    keep = cluster.kept_virtual_server  # what the mirror stores and fingerprints
    fp = cluster.virtual_server_fingerprint
    later = copy.deepcopy(first)
    later["metadata"]["resourceVersion"] = "999999"
    later["status"]["conditions"][0]["message"] = "something else"
    later["status"]["nodes"] = {"desired": 4, "programmed": 3, "summary": "3/4"}
    later["status"]["announcement"] = {"mode": "BGP", "nodes": ["node-9"]}
    later["metadata"]["managedFields"][1]["time"] = "2026-12-03T19:05:00Z"
    assert fp(keep(later)) == fp(keep(first))
    for change in (
        lambda o: o["status"].__setitem__("address", "192.0.2.99"),
        lambda o: o["status"].__setitem__("firewallMark", 77),
        lambda o: o["metadata"].__setitem__("generation", 2),
        lambda o: o["metadata"].__setitem__("deletionTimestamp", "now"),
    ):
        changed = copy.deepcopy(later)
        change(changed)
        assert fp(keep(changed)) != fp(keep(first))


# --- the mirrors ------------------------------------------------------------------------------


def test_every_mirror_of_the_agent_trims_what_it_stores() -> None:
    import threading

    from kubernetes import client

    api = client.ApiClient(client.Configuration())
    changed = threading.Event()
    found = {
        m.name: m.transform
        for m in [
            *cluster.mirrors(api, "node-a", changed, bgp=True),
            cluster.daemon_set_mirror(api, "ipvs-system", "ipvs-agent", changed),
            cluster.lease_mirror(api, "ipvs-system", changed),
        ]
    }
    assert found == {
        "virtualservers": cluster.kept_virtual_server,
        "endpointslices": trim.endpoint_slice,
        "node": trim.node,
        "addresspools": trim.address_pool,
        "bgppeers": trim.bgp_peer,
        "daemonset": trim.daemon_set,
        "leases": trim.lease,
    }


def test_a_relist_reads_pages_and_stores_trimmed_objects() -> None:
    """Lists come in pages of ``Mirror.page`` (one page of whole objects held at a time), each
    object trimmed before it is stored; the watch resumes from the list's version."""
    import threading

    everything = [served(m, i) for i, (_, m) in enumerate(MANIFESTS[:7])]
    for i, obj in enumerate(everything):
        obj["metadata"]["name"] = f"o{i}"
    calls: list[dict[str, Any]] = []

    def list_fn(**kw: Any) -> Any:
        calls.append(kw)
        start = int(kw.get("_continue") or 0)
        end = start + kw["limit"]
        more = str(end) if end < len(everything) else ""
        return json.loads(
            json.dumps(
                {
                    "metadata": {"resourceVersion": "77", "continue": more},
                    "items": everything[start:end],
                }
            )
        )

    changed = threading.Event()
    api: Any = None
    mirror = cluster.Mirror(
        "virtualservers",
        list_fn,
        api,
        changed,
        transform=trim.virtual_server,
        label_selector="a=b",
    )
    mirror.page = 3
    assert mirror._relist() == "77"
    assert [(c["limit"], c.get("_continue"), c["label_selector"]) for c in calls] == [
        (3, None, "a=b"),
        (3, "3", "a=b"),
        (3, "6", "a=b"),
    ]
    assert sorted(mirror.items(), key=lambda o: o["metadata"]["name"]) == [
        trim.virtual_server(o) for o in everything
    ]
    assert mirror.synced.is_set() and changed.is_set()
