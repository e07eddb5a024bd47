"""Objects as the API server serves them, for tests and benchmarks of what the agent keeps.

A manifest (``examples/``, a test's dict) is what a user wrote; what a list or watch returns
has more: ``uid``, versions, ``managedFields`` (one entry per writer, each with the set of
fields it owns), the ``kubectl.kubernetes.io/last-applied-configuration`` annotation that
``kubectl apply`` leaves (the whole manifest again, as JSON), and the status the operator
writes. :func:`served` adds all that the way kubectl and the operator leave it, so that
``ipvs_agent.trim`` and the agent's memory are judged on realistic objects.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ipvs_agent.trim import VIRTUAL_SERVER_STATUS
from ipvs_api import constants, schema

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
TIME = "2026-12-03T19:00:00Z"


def _fields(value: Any) -> dict[str, Any]:
    """A managedFields ``fieldsV1`` set for ``value`` (``f:`` per key; list items as the API
    server records atomic lists: the list itself)."""
    if isinstance(value, dict):
        return {f"f:{k}": _fields(v) if isinstance(v, dict) else {} for k, v in value.items()}
    return {}


def _condition(kind: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": TIME,
    }


def operator_status(obj: dict[str, Any], nodes: int = 3) -> dict[str, Any]:
    """A VirtualServer status as the operator writes it (``ipvs_operator.status.compute``)
    once every director programmed it: confirmed address, conditions, counts, announcement."""
    spec = obj.get("spec") or {}
    generation = int(obj["metadata"].get("generation", 1))
    status: dict[str, Any] = {"observedGeneration": generation}
    if "address" in spec:
        status["address"] = spec["address"]
        status["addressPool"] = "default"
    if "fwmark" in spec:
        status["firewallMark"] = spec["fwmark"]
        status["addressPool"] = "marks"
    reals = len((spec.get("backends") or {}).get("static") or ()) or 3
    status["conditions"] = [
        _condition("AddressAllocated", True, "Allocated", "address allocated", generation),
        _condition(
            "Programmed", True, "AllProgrammed", f"programmed on {nodes} director(s)", generation
        ),
        _condition("Ready", True, "Serving", f"serving to {reals} real server(s)", generation),
    ]
    status["nodes"] = {"desired": nodes, "programmed": nodes, "summary": f"{nodes}/{nodes}"}
    status["realServers"] = {"ready": reals, "total": reals, "summary": f"{reals}/{reals}"}
    status["announcement"] = {"mode": "Layer2", "nodes": [f"node-{i}" for i in range(nodes)]}
    return status


def status_written(obj: dict[str, Any], version: str) -> dict[str, Any]:
    """A served VirtualServer after one of the operator's status writes: a new version, the
    operator's conditions and counts (for 4 directors) beside the confirmed address, pool and
    mark it had, the status writer's managedFields; spec and generation untouched."""
    later = copy.deepcopy(obj)
    later["metadata"]["resourceVersion"] = version
    confirmed = (obj.get("status") or {}).items()
    kept = {k: v for k, v in confirmed if k in VIRTUAL_SERVER_STATUS}
    later["status"] = {**operator_status(later, nodes=4), **kept}
    later["metadata"]["managedFields"] = [{"manager": "ipvs-operator", "subresource": "status"}]
    return later


def served(
    manifest: dict[str, Any],
    index: int = 0,
    *,
    status: dict[str, Any] | None = None,
    defaults: bool = False,
) -> dict[str, Any]:
    """``manifest`` as a list or watch returns it after ``kubectl apply`` and, for a
    VirtualServer without a ``status``, the operator's status writes; with ``defaults`` the
    CRD's defaults filled in, as the API server stores an ipvs.io object."""
    obj = copy.deepcopy(manifest)
    if defaults and str(obj.get("apiVersion", "")).startswith(constants.GROUP + "/"):
        obj = schema.validate(str(obj["kind"]), obj)[0]
    applied = {k: v for k, v in manifest.items() if k != "status"}
    meta = obj.setdefault("metadata", {})
    meta.setdefault("uid", f"6c0f3b4e-1d2a-4c8e-9f7a-{index:012d}")
    meta.setdefault("resourceVersion", str(100_000 + index))
    meta.setdefault("generation", 1)
    meta.setdefault("creationTimestamp", TIME)
    meta.setdefault("labels", {"app.kubernetes.io/name": "web", "team": "edge"})
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        LAST_APPLIED: json.dumps(applied, separators=(",", ":"), sort_keys=True) + "\n",
    }
    body_fields = {k: _fields(v) for k, v in applied.items() if k not in ("apiVersion", "kind")}
    body_fields["f:metadata"] = {
        "f:annotations": {".": {}, f"f:{LAST_APPLIED}": {}},
        "f:labels": {".": {}, **{f"f:{k}": {} for k in meta["labels"]}},
    }
    meta["managedFields"] = [
        {
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "apiVersion": obj.get("apiVersion", "v1"),
            "time": TIME,
            "fieldsType": "FieldsV1",
            "fieldsV1": body_fields,
        }
    ]
    if status is None and obj.get("kind") == "VirtualServer" and "status" not in obj:
        status = operator_status(obj)
    if status is not None:
        obj["status"] = status
    if "status" in obj:
        meta["managedFields"].append(
            {
                "manager": "ipvs-operator",
                "operation": "Update",
                "apiVersion": obj.get("apiVersion", "v1"),
                "time": TIME,
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:status": _fields(obj["status"])},
                "subresource": "status",
            }
        )
    return obj
