"""Validate and default objects with the CRDs' own OpenAPI schemas, as the API server would.

Objects given to ``ipvs-agent plan -f`` never meet an API server, yet must be judged by the
same contract. The schema is read from the CRD files (the single source), and the CEL rules are
run through their Python mirrors in :mod:`ipvs_api.rules`. Unlike the API server, unknown fields
are an error here (as with ``kubectl --validate=strict``): offline they are almost always typos.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

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
    crd = crds()[kind]
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
