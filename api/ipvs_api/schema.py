"""Validate and default objects with the CRDs' own OpenAPI schemas, as the API server would.

Objects given to ``ipvs-agent plan -f`` never meet an API server, yet must be judged by the
same contract. The schema is read from the CRD files (the single source), and the CEL rules are
run through their Python mirrors in :mod:`ipvs_api.rules`. Unlike the API server, unknown fields
are an error here (as with ``kubectl --validate=strict``): offline they are almost always typos.
Each kind's schema is compiled once into one check per node (:func:`compile_schema`): the
agent validates every VirtualServer at start, thousands of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, TypeAlias

import yaml

from ipvs_api import constants
from ipvs_api.errors import FieldError
from ipvs_api.rules import RULES

Schema = dict[str, Any]


@dataclass(frozen=True)
class CRD:
    """The parts of one CustomResourceDefinition that validation needs."""

    kind: str
    plural: str
    namespaced: bool
    schema: Schema
    document: dict[str, Any]


def crd_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (file name, CRD document) for every CRD shipped in ``crds/``."""
    folder = resources.files("ipvs_api.crds")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            yield entry.name, yaml.load(entry.read_text(encoding="utf-8"), Loader=_LOADER)


#: libyaml's loader where PyYAML was built with it: the pure-Python one takes about a second
#: for the CRDs (several under load), which the operator spent in its first reconcile.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@cache
def crds() -> dict[str, CRD]:
    """The project's CRDs by kind, loaded once."""
    found: dict[str, CRD] = {}
    for _, doc in crd_documents():
        spec = doc["spec"]
        version = next(v for v in spec["versions"] if v["name"] == constants.VERSION)
        kind = spec["names"]["kind"]
        found[kind] = CRD(
            kind=kind,
            plural=spec["names"]["plural"],
            namespaced=spec["scope"] == "Namespaced",
            schema=version["schema"]["openAPIV3Schema"],
            document=doc,
        )
    return found


def validate(kind: str, obj: dict[str, Any]) -> tuple[dict[str, Any], list[FieldError]]:
    """Return the defaulted copy of ``obj`` and every error the API server would report."""
    check = _validator(kind)
    errors: list[FieldError] = []
    # The envelope is copied as it is; the body is copied by the walk that checks it.
    out = {k: _copy(v) if k in _ENVELOPE else None for k, v in obj.items()}
    out.update(check({k: v for k, v in obj.items() if k not in _ENVELOPE}, errors))
    return out, errors


_ENVELOPE = ("apiVersion", "kind", "metadata")

#: Checks a value against a compiled schema, appending errors, and returns its defaulted copy.
Validator = Callable[[Any, list[FieldError]], Any]


@cache
def _validator(kind: str) -> Validator:
    """The body schema of ``kind`` (``metadata`` is the API server's), compiled once: the agent
    validates thousands of objects at start, and reading the schema dict anew at every node
    was most of that."""
    crd = crds()[kind]
    props = {k: v for k, v in crd.schema["properties"].items() if k != "metadata"}
    return compile_schema(kind, {**crd.schema, "properties": props})


def compile_schema(kind: str, schema: Schema) -> Validator:
    """Compile ``schema`` (the root of ``kind``'s objects) into one check per node.

    Each node keeps only what it tests, with its :data:`~ipvs_api.rules.RULES` looked up here
    by its location, which is static. Each check returns the value's copy with defaults filled
    (its dicts and lists new, its scalars shared), so a validation walks an object once. Field
    paths are only spelt out for an error: nodes pass their parent's path down as a tuple.
    """
    check = _compile(kind, schema, "", False)

    def run(value: Any, errors: list[FieldError]) -> Any:
        return check(value, None, "", errors)

    return run


def _copy(value: Any) -> Any:
    """A copy of a JSON tree whose dicts and lists are new; its scalars are immutable and
    shared (``copy.deepcopy`` was a fifth of a validation)."""
    if isinstance(value, dict):
        return {k: _copy(v) if isinstance(v, _CONTAINERS) else v for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) if isinstance(v, _CONTAINERS) else v for v in value]
    return value


_CONTAINERS = (dict, list)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


#: Where a node is in the object: (its parent's path, its key or list index, whether that is
#: an index); None above the root. Cheap to pass down; spelt out by :func:`_path` on error.
_Path: TypeAlias = "_Here | None"
_Here: TypeAlias = "tuple[_Path, Any, bool]"
#: A compiled node: checks ``value`` (at key ``key`` under ``parent``), appending errors, and
#: returns its defaulted copy; never changes ``value``.
_Check = Callable[[Any, _Path, Any, list[FieldError]], Any]
#: A node's CEL mirrors as (check, fieldPath, message).
_Rules = tuple[tuple[Callable[[Any], bool], str, str], ...]
#: A node's enum (None without one) and its members as the error lists them.
_Enum = tuple[Container[Any] | None, str]

_NO_ENUM: _Enum = (None, "")


def _path(parent: _Path, key: Any, index: bool) -> str:
    """The field path of a node, e.g. ``spec.ports[0].port``."""
    base = "" if parent is None else _path(*parent)
    return f"{base}[{key}]" if index else _join(base, key)


def _compile(kind: str, schema: Schema, location: str, index: bool) -> _Check:
    """Compile the node ``schema`` found at ``location`` (``spec.ports[].port``); ``index``
    says whether its values are list items, which their paths spell ``[i]``."""
    rules = tuple(
        (rule.check, rule.field_path, rule.message) for rule in RULES.get((kind, location), ())
    )
    declared = None if schema.get("x-kubernetes-int-or-string") else schema.get("type")
    if declared == "string":
        return _string(schema, index, _enum(schema, hashable=True), rules)
    if declared == "integer":
        return _integer(schema, index, _enum(schema, hashable=True), rules)
    if declared == "boolean":
        return _boolean(index, _enum(schema, hashable=True), rules)
    if declared == "object":
        return _object(kind, schema, location, index, _enum(schema, hashable=False), rules)
    if declared == "array":
        return _array(kind, schema, location, index, _enum(schema, hashable=False), rules)
    return _any(kind, schema, location, index, _enum(schema, hashable=False), rules)


def _enum(schema: Schema, hashable: bool) -> _Enum:
    """The node's enum as a set where its values are sure to be hashable (after their type
    check), else as the list itself; membership is ``==`` either way."""
    if "enum" not in schema:
        return _NO_ENUM
    members: list[Any] = schema["enum"]
    supported = ", ".join(f'"{v}"' for v in members)
    if hashable:
        try:
            return frozenset(members), supported
        except TypeError:
            pass
    return members, supported


def _type_error(value: Any, expected: str, parent: _Path, key: Any, index: bool) -> FieldError:
    return FieldError(
        _path(parent, key, index), f"Invalid value: {value!r}: must be of type {expected}"
    )


def _enum_error(value: Any, supported: str, parent: _Path, key: Any, index: bool) -> FieldError:
    return FieldError(
        _path(parent, key, index), f"Unsupported value: {value!r}: supported values: {supported}"
    )


def _apply(
    rules: _Rules, value: Any, parent: _Path, key: Any, index: bool, errors: list[FieldError]
) -> None:
    """Run a node's CEL mirrors on its defaulted copy (only once the node and all below it are
    valid: CEL rules see well-typed values)."""
    path: str | None = None
    for check, field_path, message in rules:
        if not check(value):
            if path is None:
                path = _path(parent, key, index)
            errors.append(FieldError(_join(path, field_path) if field_path else path, message))


def _string(schema: Schema, index: bool, enum: _Enum, rules: _Rules) -> _Check:
    members, supported = enum
    max_length: int | None = schema.get("maxLength")
    min_length: int | None = schema.get("minLength")
    pattern: str | None = schema.get("pattern")
    search = None if pattern is None else re.compile(pattern).search

    def check(value: Any, parent: _Path, key: Any, errors: list[FieldError]) -> Any:
        if not isinstance(value, str):
            errors.append(_type_error(value, "string", parent, key, index))
            return _copy(value)
        before = len(errors)
        if members is not None and value not in members:
            errors.append(_enum_error(value, supported, parent, key, index))
        if max_length is not None and len(value) > max_length:
            errors.append(
                FieldError(
                    _path(parent, key, index), f"Too long: may not be more than {max_length} bytes"
                )
            )
        if min_length is not None and len(value) < min_length:
            errors.append(
                FieldError(
                    _path(parent, key, index),
                    f"Invalid value: {value!r}: should be at least {min_length} chars long",
                )
            )
        if search is not None and not search(value):
            errors.append(
                FieldError(
                    _path(parent, key, index), f"Invalid value: {value!r}: should match '{pattern}'"
                )
            )
        if rules and len(errors) == before:
            _apply(rules, value, parent, key, index, errors)
        return value

    return check


def _integer(schema: Schema, index: bool, enum: _Enum, rules: _Rules) -> _Check:
    members, supported = enum
    minimum: int | None = schema.get("minimum")
    maximum: int | None = schema.get("maximum")

    def check(value: Any, parent: _Path, key: Any, errors: list[FieldError]) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            errors.append(_type_error(value, "integer", parent, key, index))
            return _copy(value)
        before = len(errors)
        if members is not None and value not in members:
            errors.append(_enum_error(value, supported, parent, key, index))
        if minimum is not None and value < minimum:
            errors.append(
                FieldError(
                    _path(parent, key, index),
                    f"Invalid value: {value}: should be greater than or equal to {minimum}",
                )
            )
        if maximum is not None and value > maximum:
            errors.append(
                FieldError(
                    _path(parent, key, index),
                    f"Invalid value: {value}: should be less than or equal to {maximum}",
                )
            )
        if rules and len(errors) == before:
            _apply(rules, value, parent, key, index, errors)
        return value

    return check


def _boolean(index: bool, enum: _Enum, rules: _Rules) -> _Check:
    members, supported = enum

    def check(value: Any, parent: _Path, key: Any, errors: list[FieldError]) -> Any:
        if not isinstance(value, bool):
            errors.append(_type_error(value, "boolean", parent, key, index))
            return _copy(value)
        before = len(errors)
        if members is not None and value not in members:
            errors.append(_enum_error(value, supported, parent, key, index))
        if rules and len(errors) == before:
            _apply(rules, value, parent, key, index, errors)
        return value

    return check


def _object(
    kind: str, schema: Schema, location: str, index: bool, enum: _Enum, rules: _Rules
) -> _Check:
    members, supported = enum
    declared: dict[str, Schema] = schema.get("properties", {})
    props = {
        name: _compile(kind, sub, _join(location, name), False) for name, sub in declared.items()
    }
    additional = schema.get("additionalProperties")
    extra = (
        _compile(kind, additional, _join(location, "*"), False)
        if isinstance(additional, dict)
        else None
    )
    closed = not schema.get("x-kubernetes-preserve-unknown-fields") and (
        bool(declared) or additional is False
    )
    max_properties: int | None = schema.get("maxProperties")
    # A default goes through its property's check like a value given, which copies it: an
    # object never shares a dict or list with the schema or another object.
    defaults = tuple(
        (name, sub["default"], props[name]) for name, sub in declared.items() if "default" in sub
    )
    # Names with a default are never missing once the defaults are filled.
    required = tuple(n for n in schema.get("required", ()) if "default" not in declared.get(n, {}))

    def check(value: Any, parent: _Path, key: Any, errors: list[FieldError]) -> Any:
        if not isinstance(value, dict):
            errors.append(_type_error(value, "object", parent, key, index))
            return _copy(value)
        before = len(errors)
        if members is not None and value not in members:
            errors.append(_enum_error(value, supported, parent, key, index))
        if max_properties is not None and len(value) > max_properties:
            errors.append(
                FieldError(
                    _path(parent, key, index),
                    f"Too many: {len(value)}: must have at most {max_properties} items",
                )
            )
        for name in required:
            if name not in value:
                errors.append(FieldError(_join(_path(parent, key, index), name), "Required value"))
        here = (parent, key, index)
        out: dict[str, Any] = {}
        for name, item in value.items():
            sub = props.get(name)
            if sub is not None:
                out[name] = sub(item, here, name, errors)
            elif extra is not None:
                out[name] = extra(item, here, name, errors)
            else:
                if closed:
                    errors.append(FieldError(_join(_path(*here), name), "unknown field"))
                out[name] = _copy(item)
        for name, default, sub in defaults:  # after the fields given, as the walk filled them
            if name not in value:
                out[name] = sub(default, here, name, errors)
        if rules and len(errors) == before:
            _apply(rules, out, parent, key, index, errors)
        return out

    return check


def _array(
    kind: str, schema: Schema, location: str, index: bool, enum: _Enum, rules: _Rules
) -> _Check:
    members, supported = enum
    item_location = f"{location}[]"
    item = (
        _compile(kind, schema["items"], item_location, True)
        if "items" in schema
        else _lazy(kind, {}, item_location, True)
    )
    min_items: int | None = schema.get("minItems")
    max_items: int | None = schema.get("maxItems")
    list_type = schema.get("x-kubernetes-list-type")
    unique = list_type in ("set", "map")
    map_keys: list[str] | None = None if list_type != "map" else schema.get(_MAP_KEYS)

    def check(value: Any, parent: _Path, key: Any, errors: list[FieldError]) -> Any:
        if not isinstance(value, list):
            errors.append(_type_error(value, "array", parent, key, index))
            return _copy(value)
        before = len(errors)
        if members is not None and value not in members:
            errors.append(_enum_error(value, supported, parent, key, index))
        if min_items is not None and len(value) < min_items:
            errors.append(
                FieldError(
                    _path(parent, key, index),
                    f"Invalid value: {len(value)}: should have at least {min_items} items",
                )
            )
        if max_items is not None and len(value) > max_items:
            errors.append(
                FieldError(
                    _path(parent, key, index),
                    f"Too many: {len(value)}: must have at most {max_items} items",
                )
            )
        here = (parent, key, index)
        out = [item(element, here, i, errors) for i, element in enumerate(value)]
        if unique:
            _duplicates(out, here, list_type == "set", map_keys, errors)
        if rules and len(errors) == before:
            _apply(rules, out, parent, key, index, errors)
        return out

    return check


_MAP_KEYS = "x-kubernetes-list-map-keys"


def _duplicates(
    value: list[Any], here: _Here, whole: bool, map_keys: list[str] | None, errors: list[FieldError]
) -> None:
    """Report the items of a set (``whole``) or map list that repeat an earlier one, compared
    as the API server does: by the items' (keys') representations."""
    seen: set[Any] = set()
    for i, item in enumerate(value):
        if whole:
            key: Any = repr(item)
        elif isinstance(item, dict):
            if map_keys is None:
                raise KeyError(_MAP_KEYS)
            key = tuple(repr(item.get(k)) for k in map_keys)
        else:
            continue
        if key in seen:
            errors.append(FieldError(f"{_path(*here)}[{i}]", f"Duplicate value: {item!r}"))
        seen.add(key)


def _lazy(kind: str, schema: Schema, location: str, index: bool) -> _Check:
    """A node compiled on first use: items of a list without ``items`` may be lists too, to
    any depth, so they cannot all be compiled ahead."""
    compiled: list[_Check] = []

    def check(value: Any, parent: _Path, key: Any, errors: list[FieldError]) -> Any:
        if not compiled:
            compiled.append(_compile(kind, schema, location, index))
        return compiled[0](value, parent, key, errors)

    return check


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


def _any(
    kind: str, schema: Schema, location: str, index: bool, enum: _Enum, rules: _Rules
) -> _Check:
    """A node whose values may be of several types (int-or-string, number, untyped): after
    the type test, the checks for the type the value has, as the other nodes make them."""
    members, supported = enum
    expected = (
        "integer or string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
    )
    integers = _integer(schema, index, _NO_ENUM, ())
    strings = _string(schema, index, _NO_ENUM, ())
    objects = _object(kind, schema, location, index, _NO_ENUM, ())
    arrays = _array(kind, schema, location, index, _NO_ENUM, ())

    def check(value: Any, parent: _Path, key: Any, errors: list[FieldError]) -> Any:
        before = len(errors)
        if not _type_ok(schema, value):
            errors.append(_type_error(value, str(expected), parent, key, index))
            return _copy(value)
        if members is not None and value not in members:
            errors.append(_enum_error(value, supported, parent, key, index))
        if isinstance(value, int) and not isinstance(value, bool):
            out = integers(value, parent, key, errors)
        elif isinstance(value, str):
            out = strings(value, parent, key, errors)
        elif isinstance(value, dict):
            out = objects(value, parent, key, errors)
        elif isinstance(value, list):
            out = arrays(value, parent, key, errors)
        else:
            out = value
        if rules and len(errors) == before:
            _apply(rules, out, parent, key, index, errors)
        return out

    return check
