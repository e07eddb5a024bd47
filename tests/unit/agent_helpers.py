"""Builders shared by the agent's unit tests: valid objects in a line, tables applied in memory."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from ipvs_agent.host.nftables import Ruleset
from ipvs_agent.host.state import Repair
from ipvs_agent.model import (
    DesiredTable,
    ObservedDest,
    ObservedService,
    ObservedTable,
    ServiceKey,
)
from ipvs_agent.ops import Op, OpKind
from ipvs_api import load
from ipvs_api.endpoints import Endpoint, endpoints_from_slices
from ipvs_api.types import VirtualServer


def vs(
    name: str = "web",
    namespace: str = "ns",
    created: str = "",
    status_address: str = "",
    generation: int = 1,
    **spec: Any,
) -> VirtualServer:
    """A validated VirtualServer from spec fields (defaults fill the rest)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "generation": generation}
    if created:
        meta["creationTimestamp"] = created
    obj: dict[str, Any] = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": meta,
        "spec": spec,
    }
    if status_address:
        obj["status"] = {"address": status_address}
    return load.virtual_server(obj)


def slice_(
    addresses: list[tuple[str, dict[str, bool], str | None]],
    ports: list[tuple[str, int, str]],
    family: str = "IPv4",
) -> dict[str, Any]:
    """An EndpointSlice: (address, conditions, nodeName) endpoints and (name, port, proto) ports."""
    return {
        "addressType": family,
        "endpoints": [{"addresses": [a], "conditions": c, "nodeName": n} for a, c, n in addresses],
        "ports": [{"name": n, "port": p, "protocol": pr} for n, p, pr in ports],
    }


def endpoints(*slices: dict[str, Any]) -> tuple[Endpoint, ...]:
    return endpoints_from_slices(slices)


def observed_from(desired: DesiredTable) -> dict[ServiceKey, ObservedService]:
    """What the kernel would report right after programming ``desired`` (no traffic yet)."""
    return {
        k: ObservedService(s.service, {dk: ObservedDest(d) for dk, d in s.dests.items()})
        for k, s in desired.items()
    }


def apply_ops(table: ObservedTable, ops: list[Op]) -> dict[ServiceKey, ObservedService]:
    """Apply operations to an in-memory table with the kernel's semantics (errors raise); a new
    real server goes to the head of its list, which dumps show first."""
    out = {k: ObservedService(s.service, dict(s.dests), s.stats) for k, s in table.items()}
    for op in ops:
        key = op.service.key
        if op.kind is OpKind.ADD_SERVICE:
            assert key not in out, f"EEXIST {op}"
            out[key] = ObservedService(op.service, {})
            continue
        assert key in out, f"ESRCH {op}"
        current = out[key]
        if op.kind is OpKind.EDIT_SERVICE:
            out[key] = replace(current, service=op.service)
        elif op.kind is OpKind.DEL_SERVICE:
            del out[key]
        else:
            assert op.dest is not None
            dests = dict(current.dests)
            dkey = op.dest.key
            if op.kind is OpKind.ADD_DEST:
                assert dkey not in dests, f"EEXIST {op}"
                dests = {dkey: ObservedDest(op.dest), **dests}
            elif op.kind is OpKind.EDIT_DEST:
                assert dkey in dests, f"ENOENT {op}"
                dests[dkey] = replace(dests[dkey], dest=op.dest)
            else:
                assert dkey in dests, f"ENOENT {op}"
                del dests[dkey]
            out[key] = replace(current, dests=dests)
    return out


class FakeHost:
    """The agent's host state in memory: the ownership record, masquerade, guard, addresses."""

    def __init__(self, owned: set[ServiceKey] | None = None) -> None:
        self.owned_keys: set[ServiceKey] = set(owned or ())
        self.masquerade: set[ServiceKey] = set()
        self.addresses: set[Any] = set()
        self.records: list[set[ServiceKey]] = []
        self.rulesets: list[Ruleset] = []

    def recorded(self) -> Ruleset:
        return Ruleset.of(self.owned_keys, self.masquerade)

    def owned(self) -> set[ServiceKey]:
        return set(self.owned_keys)

    def record(self, ruleset: Ruleset) -> list[Repair]:
        self.owned_keys, self.masquerade = set(ruleset.owned), set(ruleset.masquerade)
        self.records.append(set(ruleset.owned))
        self.rulesets.append(ruleset)
        return []

    def sync_addresses(self, wanted: set[Any]) -> None:
        self.addresses = set(wanted)


class StubMirror:
    """A mirror whose contents the test sets; ``run`` does nothing."""

    def __init__(self, name: str, items: list[dict[str, Any]], synced: bool = True) -> None:
        self.name = name
        self._items = items
        self.synced = threading.Event()
        if synced:
            self.synced.set()

    def items(self) -> list[dict[str, Any]]:
        return list(self._items)

    def run(self, stop: threading.Event) -> None:
        stop.wait()

    def stop(self) -> None:
        pass


class CountingEvent(threading.Event):
    """The agent's wake-up event (``changed``), counting the times something set it: a pass
    runs only when it is set, or at a resync or drain check."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()
