"""The compiled schema walker judges every object exactly as the generic walker it replaced.

``schema.validate`` compiles each CRD schema once into checks; the generic walker below (a
verbatim copy of the one it replaced, which re-read the schema dict at every node) is kept as
the oracle. For every example, corpus case and valid spec, for every field of the examples
replaced by a value of the wrong type, and for objects generated from the CRD schemas and
mutated at random, both must return the same defaulted object (key order and scalar types
included) and the same errors in the same order.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.bench_kernel import virtual_server as bench_virtual_server
from ipvs_api import constants, schema
from ipvs_api.errors import FieldError
from ipvs_api.rules import RULES
from tests.served import served
from tests.unit.test_health_api import VALID_SPECS
from tests.unit.test_health_api import virtual_server as health_virtual_server
from tests.unit.test_validation import CORPUS, corpus_object, example_objects

Schema = dict[str, Any]


# --- The oracle: the generic walker as it was before compilation, verbatim. ---------------


def _oracle_validate(kind: str, obj: dict[str, Any]) -> tuple[dict[str, Any], list[FieldError]]:
    """Return the defaulted copy of ``obj`` and every error the API server would report."""
    crd = schema.crds()[kind]
    out = _copy(obj)
    errors: list[FieldError] = []
    body = {k: v for k, v in out.items() if k not in ("apiVersion", "kind", "metadata")}
    props = {k: v for k, v in crd.schema["properties"].items() if k != "metadata"}
    node_schema = {**crd.schema, "properties": props}
    _walk(kind, node_schema, body, "", "", errors)
    out.update(body)
    return out, errors


def _copy(value: Any) -> Any:
    """A copy of a JSON tree whose dicts and lists are new (defaults are filled into them);
    its scalars are immutable and shared. A fifth of a validation was ``copy.deepcopy``."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "boolean": (bool,),
}


def _type_ok(schema: Schema, value: Any) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
    t = schema.get("type")
    if t is None:
        return True
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[t])


def _walk(
    kind: str, schema: Schema, value: Any, path: str, location: str, errors: list[FieldError]
) -> None:
    """Check ``value`` against ``schema``, filling defaults in place, then run the CEL mirrors.

    ``location`` is the schema location without list indices (``spec.ports[]``), the key under
    which :data:`ipvs_api.rules.RULES` files the rules for this node.
    """
    before = len(errors)
    if not _type_ok(schema, value):
        expected = (
            "integer or string" if schema.get("x-kubernetes-int-or-string") else schema["type"]
        )
        errors.append(FieldError(path, f"Invalid value: {value!r}: must be of type {expected}"))
        return
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(f'"{v}"' for v in schema["enum"])
        errors.append(
            FieldError(path, f"Unsupported value: {value!r}: supported values: {supported}")
        )
    if isinstance(value, int) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(
                FieldError(
                    path,
                    f"Invalid value: {value}: should be greater than or equal to "
                    f"{schema['minimum']}",
                )
            )
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(
                FieldError(
                    path,
                    f"Invalid value: {value}: should be less than or equal to {schema['maximum']}",
                )
            )
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(
                FieldError(path, f"Too long: may not be more than {schema['maxLength']} bytes")
            )
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(
                FieldError(
                    path,
                    f"Invalid value: {value!r}: should be at least {schema['minLength']} "
                    "chars long",
                )
            )
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(
                FieldError(path, f"Invalid value: {value!r}: should match '{schema['pattern']}'")
            )
    if isinstance(value, dict):
        _walk_object(kind, schema, value, path, location, errors)
    if isinstance(value, list):
        _walk_array(kind, schema, value, path, location, errors)
    if len(errors) == before:
        for rule in RULES.get((kind, location), ()):
            if not rule.check(value):
                errors.append(
                    FieldError(
                        _join(path, rule.field_path) if rule.field_path else path, rule.message
                    )
                )


def _walk_object(
    kind: str,
    schema: Schema,
    value: dict[str, Any],
    path: str,
    location: str,
    errors: list[FieldError],
) -> None:
    props: dict[str, Schema] = schema.get("properties", {})
    extra = schema.get("additionalProperties")
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(
            FieldError(
                path, f"Too many: {len(value)}: must have at most {schema['maxProperties']} items"
            )
        )
    for name, sub in props.items():
        if name not in value and "default" in sub:
            value[name] = _copy(sub["default"])
    for name in schema.get("required", ()):
        if name not in value:
            errors.append(FieldError(_join(path, name), "Required value"))
    for name, item in value.items():
        if name in props:
            _walk(kind, props[name], item, _join(path, name), _join(location, name), errors)
        elif isinstance(extra, dict):
            _walk(kind, extra, item, _join(path, name), _join(location, "*"), errors)
        elif not schema.get("x-kubernetes-preserve-unknown-fields") and (props or extra is False):
            errors.append(FieldError(_join(path, name), "unknown field"))


def _walk_array(
    kind: str, schema: Schema, value: list[Any], path: str, location: str, errors: list[FieldError]
) -> None:
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(
            FieldError(
                path,
                f"Invalid value: {len(value)}: should have at least {schema['minItems']} items",
            )
        )
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(
            FieldError(
                path, f"Too many: {len(value)}: must have at most {schema['maxItems']} items"
            )
        )
    items = schema.get("items", {})
    for i, item in enumerate(value):
        _walk(kind, items, item, f"{path}[{i}]", f"{location}[]", errors)
    list_type = schema.get("x-kubernetes-list-type")
    seen: set[Any] = set()
    for i, item in enumerate(value):
        if list_type == "set":
            key: Any = repr(item)
        elif list_type == "map" and isinstance(item, dict):
            key = tuple(repr(item.get(k)) for k in schema["x-kubernetes-list-map-keys"])
        else:
            continue
        if key in seen:
            errors.append(FieldError(f"{path}[{i}]", f"Duplicate value: {item!r}"))
        seen.add(key)


# --- Comparing the two. ------------------------------------------------------------------


def _exact(value: Any) -> Any:
    """``value`` as nested tuples that also compare key order and scalar types (``1`` is not
    ``True`` here, nor ``{"a": 1, "b": 2}`` ``{"b": 2, "a": 1}``)."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _exact(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_exact(v) for v in value))
    return (type(value).__name__, value)


def _outcome(validate: Any, kind: str, obj: dict[str, Any]) -> Any:
    """What one validator makes of ``obj``: output and errors, or the exception it raised;
    the input must come back untouched."""
    given_obj = copy.deepcopy(obj)
    try:
        out, errors = validate(kind, given_obj)
    except Exception as e:
        return ("raised", type(e).__name__, str(e))
    assert _exact(given_obj) == _exact(obj), "validation must not touch its input"
    return ("ok", _exact(out), [(type(e.path).__name__, e.path, e.message) for e in errors])


def assert_same(obj: dict[str, Any], kind: str | None = None) -> None:
    kind = kind or str(obj["kind"])
    compiled = _outcome(schema.validate, kind, obj)
    assert compiled == _outcome(_oracle_validate, kind, obj)


# --- Fixed inputs: examples, the invalid corpus, valid specs, benchmark objects. ---------


def _bases() -> list[tuple[str, dict[str, Any]]]:
    found = list(example_objects())
    found += [(f"corpus:{case['name']}", corpus_object(case)) for case in CORPUS]
    found += [(f"spec:{name}", health_virtual_server(spec)) for name, spec in VALID_SPECS.items()]
    found += [(f"bench:{i}", bench_virtual_server(i, 3)) for i in (0, 7)]
    found += [(f"served:{i}", served(bench_virtual_server(i, 3), i)) for i in (0, 1)]
    found += [
        (f"served-defaulted:{name}", served(obj, i, defaults=True))
        for i, (name, obj) in enumerate(example_objects())
    ]
    return found


BASES = _bases()


@pytest.mark.parametrize(("name", "obj"), BASES, ids=[name for name, _ in BASES])
def test_fixed_objects_are_judged_alike(name: str, obj: dict[str, Any]) -> None:
    assert_same(obj)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


_DELETE = object()
WRONG: list[Any] = [None, 1, 0, -1, 70000, 2**40, 1.5, "x", "", [], {}, True, [1], {"a": 1}]


@pytest.mark.parametrize(
    ("name", "obj"), example_objects(), ids=[name for name, _ in example_objects()]
)
def test_every_field_of_every_example_replaced_or_removed_is_judged_alike(
    name: str, obj: dict[str, Any]
) -> None:
    for path in _paths(obj)[1:]:
        if path[0] in ("apiVersion", "kind", "metadata"):
            continue
        for value in [*WRONG, _DELETE]:
            changed = copy.deepcopy(obj)
            node = changed
            for key in path[:-1]:
                node = node[key]
            if value is _DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
            assert_same(changed)


# --- Generated inputs: instances of the CRD schemas, and mutated fixed objects. ----------


def _enum_values() -> list[Any]:
    found: list[Any] = []

    def walk(node: Schema) -> None:
        found.extend(node.get("enum", ()))
        for sub in node.get("properties", {}).values():
            walk(sub)
        if "items" in node:
            walk(node["items"])
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"])

    for crd in schema.crds().values():
        walk(crd.schema)
    return sorted(set(found), key=repr)


#: Strings that pass or nearly pass the CRDs' patterns and rules.
STRINGS: list[str] = [
    *(v for v in _enum_values() if isinstance(v, str)),
    "",
    "a",
    "web",
    "http",
    "8080",
    "Http",
    "a-",
    "0",
    "192.0.2.10",
    "198.51.100.11",
    "2001:db8::10",
    "::1",
    "::ffff:192.0.2.1",
    "127.0.0.1",
    "169.254.1.1",
    "fe80::1",
    "fe80::1%eth0",
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.1",
    "192.0.2.0/28",
    "192.0.2.1/24",
    "192.0.2.10-192.0.2.20",
    "192.0.2.20-192.0.2.10",
    "100ms",
    "1s",
    "2s",
    "5ms",
    "1m30s",
    "2h",
    "200-299",
    "299-200",
    "200-299,401",
    "65000:100",
    "no-export",
    "sh-fallback",
    "mh-port",
    "/healthz",
    "example.com",
    "x" * 70,
]

_WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([2**31, -(2**63), 65536]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.integers(0, 2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(0, 2), max_size=2),
)


@functools.cache
def _regex(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True)


@st.composite
def instance(draw: st.DrawFn, node: Schema) -> Any:
    """A value for ``node``: mostly of its shape, now and then of the wrong type, with values
    at and just past every bound, duplicates in lists and unknown fields in objects."""
    if draw(st.integers(0, 14)) == 0:
        return draw(_WRONG)
    if node.get("x-kubernetes-int-or-string"):
        return draw(st.one_of(st.integers(-1, 70000), st.sampled_from(STRINGS)))
    if "enum" in node and draw(st.integers(0, 3)) > 0:
        return draw(st.sampled_from(node["enum"]))
    kind = node.get("type")
    if kind == "string":
        choices = [st.sampled_from(STRINGS), st.text(max_size=node.get("maxLength", 16) + 2)]
        if "pattern" in node:
            choices.append(_regex(node["pattern"]))
        return draw(st.one_of(choices))
    if kind == "integer":
        low, high = node.get("minimum", -5), node.get("maximum", 2**32)
        return draw(
            st.one_of(st.integers(low, min(high, low + 100)), st.sampled_from([low - 1, high + 1]))
        )
    if kind == "boolean":
        return draw(st.booleans())
    if kind == "array":
        count = draw(st.integers(0, min(node.get("maxItems", 3) + 1, 4)))
        items = [draw(instance(node.get("items", {}))) for _ in range(count)]
        if items and draw(st.integers(0, 3)) == 0:
            items.append(copy.deepcopy(items[0]))
        return items
    if kind == "object":
        out: dict[str, Any] = {}
        required = node.get("required", ())
        for name, sub in node.get("properties", {}).items():
            if draw(st.integers(0, 9 if name in required else 2)) > 1:
                out[name] = draw(instance(sub))
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for name in draw(st.lists(st.sampled_from(["a", "b.c", "team"]), max_size=2)):
                out[name] = draw(instance(extra))
        if draw(st.integers(0, 9)) == 0:
            out[draw(st.sampled_from(["bogus", "Ports", "x"]))] = draw(_WRONG)
        return out
    return draw(_WRONG)


@st.composite
def generated_object(draw: st.DrawFn) -> dict[str, Any]:
    """An object of any of the CRDs' kinds, its body drawn from the kind's schema."""
    kind = draw(st.sampled_from(sorted(schema.crds())))
    obj: dict[str, Any] = {
        "apiVersion": constants.API_VERSION,
        "kind": kind,
        "metadata": {"name": "g", "namespace": "default"},
    }
    for name, sub in schema.crds()[kind].schema["properties"].items():
        if name not in ("apiVersion", "kind", "metadata") and draw(st.integers(0, 9)) > 0:
            obj[name] = draw(instance(sub))
    if draw(st.integers(0, 19)) == 0:
        obj["bogus"] = 1
    return obj


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(generated_object())
def test_objects_generated_from_the_schemas_are_judged_alike(obj: dict[str, Any]) -> None:
    assert_same(obj)


@st.composite
def mutated_object(draw: st.DrawFn) -> dict[str, Any]:
    """A fixed object with one to three fields replaced, removed, added or duplicated."""
    obj: dict[str, Any] = copy.deepcopy(draw(st.sampled_from(BASES))[1])
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj)[1:] if p[0] not in ("apiVersion", "kind", "metadata")]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        target = parent[path[-1]]
        action = draw(st.sampled_from(["replace", "delete", "add", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = draw(
                st.one_of(_WRONG, st.sampled_from(STRINGS), st.integers(-1, 2**32 + 1))
            )
        elif action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(target, dict):
            target[draw(st.sampled_from(["bogus", "name", "port", "static", "0"]))] = draw(
                st.one_of(_WRONG, st.sampled_from(STRINGS))
            )
        elif action == "duplicate" and isinstance(target, list) and target:
            target.insert(draw(st.integers(0, len(target))), copy.deepcopy(target[0]))
    return obj


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated_object())
def test_mutated_objects_are_judged_alike(obj: dict[str, Any]) -> None:
    assert_same(obj)


# --- Keywords the CRDs do not use (yet), on a made-up schema. -----------------------------

#: Every keyword the walker knows, including those no CRD uses today: untyped nodes and lists
#: without ``items``, ``number``, ``minLength``, ``minItems``, ``additionalProperties: false``,
#: ``x-kubernetes-preserve-unknown-fields``, enums of objects, a map list keyed twice, a
#: required field with a default.
SYNTHETIC: Schema = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["name", "count"],
            "maxProperties": 9,
            "properties": {
                "name": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]"},
                "ratio": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
                "anything": {},
                "untypedList": {"items": {}},
                "bare": {"type": "array"},
                "choice": {"enum": [{"a": 1}, [1], "x", 2]},
                "count": {"type": "integer", "enum": [1, 2, 3], "default": 1},
                "flag": {"type": "boolean", "enum": [True]},
                "closed": {
                    "type": "object",
                    "additionalProperties": False,
                    "default": {},
                    "properties": {"tags": {"type": "array", "default": ["t"], "minItems": 1}},
                },
                "open": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": True,
                    "properties": {"keep": {"type": "integer", "minimum": 3}},
                },
                "pairs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 4,
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["k", "v"],
                    "items": {"type": "object", "properties": {"k": {}, "v": {"default": 0}}},
                },
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "port": {"x-kubernetes-int-or-string": True, "maxLength": 3, "minimum": 1},
            },
        }
    },
}


@st.composite
def synthetic_object(draw: st.DrawFn) -> dict[str, Any]:
    anything = st.recursive(
        _WRONG,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3)
        ),
        max_leaves=8,
    )
    spec: dict[str, Any] = draw(instance(SYNTHETIC["properties"]["spec"]))
    if isinstance(spec, dict):
        for name in ("anything", "untypedList", "bare", "open"):
            if draw(st.booleans()):
                spec[name] = draw(anything)
    return {"spec": spec}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(synthetic_object())
def test_keywords_no_crd_uses_are_judged_alike(obj: dict[str, Any]) -> None:
    oracle_errors: list[FieldError] = []
    expected = _copy(obj)
    _walk("Synthetic", SYNTHETIC, expected, "", "", oracle_errors)
    given_obj = copy.deepcopy(obj)
    errors: list[FieldError] = []
    got = schema.compile_schema("Synthetic", SYNTHETIC)(given_obj, errors)
    assert _exact(got) == _exact(expected)
    assert [(e.path, e.message) for e in errors] == [(e.path, e.message) for e in oracle_errors]
    assert _exact(given_obj) == _exact(obj), "the check copies, never fills its input"


# --- Defaults are fresh every time, and the copy shares scalars only. ---------------------


def _containers(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value, *(c for v in value.values() for c in _containers(v))]
    if isinstance(value, list):
        return [value, *(c for v in value for c in _containers(v))]
    return []


def test_two_validations_share_no_default_dict_or_list() -> None:
    obj = health_virtual_server(
        {
            "ports": [{"port": 80}],
            "healthCheck": {"type": "HTTP", "http": {}},
            "backends": {"static": [{"address": "198.51.100.11"}]},
        }
    )
    first, errors = schema.validate(constants.VIRTUAL_SERVER, obj)
    assert errors == []
    second, _ = schema.validate(constants.VIRTUAL_SERVER, obj)
    assert first == second
    ids = {id(c) for c in _containers(first)}
    assert ids.isdisjoint(id(c) for c in _containers(second))
    assert ids.isdisjoint(id(c) for c in _containers(obj)), "the input is copied, not filled"
    in_schema = {id(c) for crd in schema.crds().values() for c in _containers(crd.schema)}
    assert ids.isdisjoint(in_schema), "defaults are copies of the schema's, never the same"
    first["spec"]["scheduler"]["name"] = "rr"
    first["spec"]["forwarding"]["extra"] = 1
    third, _ = schema.validate(constants.VIRTUAL_SERVER, obj)
    assert third == second


def test_the_copy_shares_scalars_and_renews_containers() -> None:
    obj: dict[str, Any] = bench_virtual_server(3, 2)
    out, _ = schema.validate(constants.VIRTUAL_SERVER, obj)
    assert out["spec"]["address"] is obj["spec"]["address"]
    assert out["metadata"] is not obj["metadata"] and out["metadata"] == obj["metadata"]
    assert out["spec"]["backends"]["static"][1] is not obj["spec"]["backends"]["static"][1]
