"""Offline validation judges objects exactly as the CRDs do: examples pass, the corpus fails."""

from __future__ import annotations

import contextlib
import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ipvs_api import InvalidObject, constants, load, schema
from ipvs_api.rules import RULES
from ipvs_api.types import ForwardingMethod, IPFamily, Protocol, Scheduler, TrafficPolicy

ROOT = Path(__file__).resolve().parents[2]
CORPUS = yaml.safe_load((ROOT / "tests/corpus/invalid.yaml").read_text())


def corpus_object(case: dict[str, Any]) -> dict[str, Any]:
    """Build the object for a corpus case (shared with the API-server test)."""
    kind = case.get("kind", constants.VIRTUAL_SERVER)
    meta: dict[str, Any] = {"name": case["name"]}
    if kind == constants.VIRTUAL_SERVER:
        meta["namespace"] = "default"
    return {
        "apiVersion": constants.API_VERSION,
        "kind": kind,
        "metadata": meta,
        "spec": case["spec"],
    }


def example_objects() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for obj in load.read_manifests([path]):
            if obj["apiVersion"] == constants.API_VERSION:
                obj["metadata"].setdefault("namespace", "default")
                found.append((f"{path.name}:{obj['metadata']['name']}", obj))
    return found


def _load(obj: dict[str, Any]) -> object:
    if obj["kind"] == constants.ADDRESS_POOL:
        return load.address_pool(obj)
    if obj["kind"] == constants.BGP_PEER:
        return load.bgp_peer(obj)
    return load.virtual_server(obj)


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30
    assert len({c["name"] for c in CORPUS}) == len(CORPUS), "case names must be unique"


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_corpus_case_is_rejected_naming_the_field(case: dict[str, Any]) -> None:
    with pytest.raises(InvalidObject) as info:
        _load(corpus_object(case))
    paths = [e.path for e in info.value.errors]
    assert case["field"] in paths, f"expected an error at {case['field']}, got {info.value}"


@pytest.mark.parametrize(
    ("name", "obj"), example_objects(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_examples_are_valid(name: str, obj: dict[str, Any]) -> None:
    _load(obj)


def test_every_example_kind_is_covered() -> None:
    kinds = {obj["kind"] for _, obj in example_objects()}
    assert kinds == {constants.VIRTUAL_SERVER, constants.ADDRESS_POOL, constants.BGP_PEER}
    methods = {
        obj["spec"].get("forwarding", {}).get("method", "NAT")
        for _, obj in example_objects()
        if obj["kind"] == constants.VIRTUAL_SERVER
    }
    assert methods == {"NAT", "DR", "TUN"}, "one worked example per forwarding method"


def test_minimal_virtual_server_gets_the_documented_defaults() -> None:
    vs = load.virtual_server(
        {
            "apiVersion": constants.API_VERSION,
            "kind": constants.VIRTUAL_SERVER,
            "metadata": {"name": "m", "namespace": "ns", "generation": 3},
            "spec": {"ports": [{"port": 80}], "backends": {"service": {"name": "web"}}},
        }
    )
    spec = vs.spec
    assert vs.key == "ns/m" and vs.generation == 3
    assert spec.scheduler is Scheduler.WLC
    assert spec.forwarding.method is ForwardingMethod.NAT
    assert spec.ports[0].protocol is Protocol.TCP and spec.ports[0].target_port is None
    assert spec.backends.default_weight == 1 and spec.backends.service == "web"
    assert spec.drain_timeout_seconds == 300
    assert spec.traffic_policy is TrafficPolicy.CLUSTER
    assert spec.family is IPFamily.IPV4 and vs.address is None
    assert spec.persistence is None and not spec.one_packet_scheduling


def test_persistence_defaults_apply_inside_the_object() -> None:
    obj = {
        "apiVersion": constants.API_VERSION,
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "address": "2001:db8::1",
            "ports": [{"port": 443}],
            "persistence": {},
            "backends": {"static": [{"address": "2001:db8::11", "weight": 0}]},
        },
    }
    vs = load.virtual_server(obj)
    assert vs.spec.persistence is not None
    assert vs.spec.persistence.timeout_seconds == 300
    assert vs.spec.persistence.ipv6_prefix_length == 128
    assert vs.spec.family is IPFamily.IPV6
    assert vs.spec.backends.static[0].weight == 0
    assert "scheduler" not in obj["spec"]


def test_address_pool_ranges_and_namespaces() -> None:
    pool = load.address_pool(
        {
            "apiVersion": constants.API_VERSION,
            "kind": constants.ADDRESS_POOL,
            "metadata": {"name": "p"},
            "spec": {
                "addresses": ["192.0.2.0/30", "198.51.100.10-198.51.100.12", "2001:db8::/126"],
                "namespaces": ["a"],
                "namespaceSelector": {"matchLabels": {"team": "x"}},
            },
        }
    )
    assert [r.size for r in pool.ranges] == [4, 3, 4]
    assert ipaddress.ip_address("198.51.100.12") in pool
    assert ipaddress.ip_address("198.51.100.13") not in pool
    assert ipaddress.ip_address("2001:db8::3") in pool
    assert pool.auto_assign
    assert pool.admits("a", {}) and pool.admits("b", {"team": "x"}) and not pool.admits("b", {})


def test_reversed_pool_range_is_refused() -> None:
    with pytest.raises(InvalidObject, match=r"spec.addresses\[0\]: range .* starts after it ends"):
        load.address_pool(
            {
                "apiVersion": constants.API_VERSION,
                "kind": constants.ADDRESS_POOL,
                "metadata": {"name": "p"},
                "spec": {"addresses": ["192.0.2.9-192.0.2.1"]},
            }
        )


def _cel_rules() -> set[tuple[str, str, str, str]]:
    """(kind, location, fieldPath, message) of every CEL rule in the CRDs."""
    found: set[tuple[str, str, str, str]] = set()

    def walk(kind: str, node: dict[str, Any], location: str) -> None:
        for rule in node.get("x-kubernetes-validations", ()):
            found.add((kind, location, rule.get("fieldPath", "").lstrip("."), rule["message"]))
        for name, sub in node.get("properties", {}).items():
            walk(kind, sub, f"{location}.{name}" if location else name)
        if "items" in node:
            walk(kind, node["items"], f"{location}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(kind, node["additionalProperties"], f"{location}.*")

    for kind, crd in schema.crds().items():
        walk(kind, crd.schema, "")
    return found


def test_python_rules_mirror_every_cel_rule() -> None:
    python = {
        (kind, location, rule.field_path, rule.message)
        for (kind, location), rules in RULES.items()
        for rule in rules
    }
    cel = _cel_rules()
    assert cel - python == set(), "CEL rules without a Python mirror"
    assert python - cel == set(), "Python rules without a CEL original"


def test_every_schema_field_has_a_description() -> None:
    """`kubectl explain` must teach the API: no field without a description."""
    missing: list[str] = []

    def walk(kind: str, node: dict[str, Any], path: str) -> None:
        if path and path != "metadata" and not node.get("description"):
            missing.append(f"{kind}.{path}")
        for name, sub in node.get("properties", {}).items():
            if name != "metadata":
                walk(kind, sub, f"{path}.{name}" if path else name)
        if "items" in node and node["items"].get("type") == "object":
            walk(kind, node["items"], f"{path}[]")

    for kind, crd in schema.crds().items():
        walk(kind, crd.schema, "")
    assert missing == []


def test_validation_never_crashes_on_shuffled_types() -> None:
    """Any field replaced by a value of the wrong type gives field errors, not exceptions."""
    base = example_objects()[2][1]
    wrong: list[Any] = [None, 1, "x", [], {}, True, -1, [1], {"a": 1}]

    def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        out = [prefix]
        if isinstance(node, dict):
            for k, v in node.items():
                out += paths(v, (*prefix, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                out += paths(v, (*prefix, i))
        return out

    for path in paths(base["spec"])[1:]:
        for value in wrong:
            obj = copy.deepcopy(base)
            node = obj["spec"]
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            with contextlib.suppress(InvalidObject):
                load.virtual_server(obj)


def test_readme_virtual_servers_are_valid_and_cover_every_method() -> None:
    import re

    text = (ROOT / "README.md").read_text()
    objects = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    methods = set()
    for obj in objects:
        obj["metadata"]["namespace"] = "default"
        methods.add(load.virtual_server(obj).spec.forwarding.method)
    assert methods == set(ForwardingMethod), "one README example per forwarding method"


def _cel_marks_rule(first: int, last: int) -> bool:
    """The CRD's CEL rule for a firewall-mark range, in Python integer arithmetic."""
    return first // 16384 == last // 16384 and (last // 8192) % 2 == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2**32 - 1), st.integers(0, 40000))
@example(8191, 0)
@example(8191, 1)
@example(16383, 1)
@example(16384, 8191)
@example(16384, 8192)
@example(2**32 - 8193, 0)
def test_the_cel_mark_rule_is_exactly_no_masquerade_bit_in_the_range(first: int, span: int) -> None:
    """CEL has no bitwise operators: its division form refuses exactly the ranges with 0x2000."""
    last = min(first + span, 2**32 - 1)
    mirror = RULES[("AddressPool", "spec.firewallMarks[]")][1]
    has_bit = any(m & constants.MASQUERADE_MARK for m in range(first, min(last, first + 16384) + 1))
    assert _cel_marks_rule(first, last) == (not has_bit)
    assert mirror.check({"first": first, "last": last}) == (not has_bit)
    assert mirror.check({"first": first}) == (not first & constants.MASQUERADE_MARK)


def test_address_pool_with_firewall_marks_only() -> None:
    pool = load.address_pool(
        {
            "apiVersion": constants.API_VERSION,
            "kind": constants.ADDRESS_POOL,
            "metadata": {"name": "marks"},
            "spec": {"firewallMarks": [{"first": 16}, {"first": 100, "last": 199}]},
        }
    )
    assert pool.ranges == () and [r.size for r in pool.firewall_marks] == [1, 100]
    assert pool.grants(16) and pool.grants(150) and not pool.grants(17)


def test_virtual_server_status_firewall_mark_is_read() -> None:
    obj = {
        "apiVersion": constants.API_VERSION,
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"fwmark": 16, "backends": {"static": [{"address": "198.51.100.1"}]}},
        "status": {"firewallMark": 16, "addressPool": "marks"},
    }
    vs = load.virtual_server(obj)
    assert vs.spec.fwmark == 16 and vs.status_fwmark == 16
    del obj["status"]
    assert load.virtual_server(obj).status_fwmark is None
