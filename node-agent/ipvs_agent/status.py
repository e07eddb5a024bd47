"""The IPVSNode status an agent reports: pure, so what is written is what the tests see."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ipvs_agent.desired import Outcome, State
from ipvs_agent.health.verdict import RealServerHealth
from ipvs_agent.model import KernelInfo
from ipvs_api import conditions


def kernel_status(info: KernelInfo) -> dict[str, Any]:
    return {
        "release": info.release,
        "ipvsVersion": info.version,
        "connectionTableSize": info.connection_table_size,
        "schedulers": sorted(info.schedulers),
        "tunnelTypes": sorted(info.tunnel_types),
    }


def entry(
    key: str, outcome: Outcome, announcement: tuple[str, tuple[str, ...]] | None = None
) -> dict[str, Any]:
    namespace, _, name = key.partition("/")
    out: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "observedGeneration": outcome.generation,
        "roles": sorted(str(r) for r in outcome.roles),
        "state": str(outcome.state),
        "realServers": outcome.real_servers,
        "drainingRealServers": outcome.draining_real_servers,
    }
    if outcome.reason:
        out["reason"] = outcome.reason
    if outcome.message:
        out["message"] = outcome.message[:4096]
    if announcement is not None:
        mode, where = announcement
        # Layer2: the interfaces answered on; BGP: the peers the route reaches.
        field = "peers" if mode == "BGP" else "interfaces"
        out["announcement"] = {"mode": mode, field: list(where)}
    if outcome.down_real_servers:
        out["downRealServers"] = outcome.down_real_servers
    if outcome.health:
        out["realServerHealth"] = [_health(h) for h in outcome.health[:MAX_HEALTH]]
    return out


#: Real servers named per VirtualServer (the rest only counted); the CRD allows 64.
MAX_HEALTH = 64


def _health(h: RealServerHealth) -> dict[str, Any]:
    out: dict[str, Any] = {"address": h.address, "state": str(h.attention)}
    if h.port:
        out["port"] = h.port
    if h.message:
        out["message"] = h.message[:256]
    return out


class EntryMemo:
    """Each VirtualServer's entry from one report to the next, kept while its outcome and
    announcement are the same, with its JSON size once :func:`split` asked for it.

    A report is rebuilt after every pass, and one endpoint change alters one entry of
    thousands: building, sizing and comparing the others again was most of what a change
    pass cost after its kernel write. Unchanged entries are the same dicts, which the
    comparisons in :class:`~ipvs_agent.report.NodeReporter` then pass by identity. Only the
    last report's entries are kept.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Outcome, Any, dict[str, Any]]] = {}
        #: Each entry's JSON size, with the entry it is of (by key: a size is used only for
        #: that very dict, so a report thread may ask while a newer report is built).
        self._sizes: dict[str, tuple[Mapping[str, Any], int]] = {}

    def entries(
        self,
        outcomes: Mapping[str, Outcome],
        announcements: Mapping[str, tuple[str, tuple[str, ...]]],
    ) -> list[dict[str, Any]]:
        kept: dict[str, tuple[Outcome, Any, dict[str, Any]]] = {}
        out: list[dict[str, Any]] = []
        for key in sorted(outcomes):
            outcome, announcement = outcomes[key], announcements.get(key)
            found = self._entries.get(key)
            if (
                found is None
                or not (found[0] is outcome or found[0] == outcome)
                or found[1] != announcement
            ):
                found = (outcome, announcement, entry(key, outcome, announcement))
            kept[key] = found
            out.append(found[2])
        sizes = self._sizes
        self._sizes = {k: sizes[k] for k in kept.keys() & sizes.keys() if sizes[k][0] is kept[k][2]}
        self._entries = kept
        return out

    def size(self, e: Mapping[str, Any]) -> int:
        """The JSON size of an entry, remembered while the entry is the same dict."""
        key = f"{e.get('namespace', '')}/{e.get('name', '')}"
        found = self._sizes.get(key)
        if found is not None and found[0] is e:
            return found[1]
        size = _size(e)
        self._sizes[key] = (e, size)
        return size


def node_status(
    outcomes: Mapping[str, Outcome],
    kernel: KernelInfo | None,
    agent_version: str,
    synced_at: str,
    previous_conditions: Sequence[dict[str, Any]] = (),
    kernel_error: str = "",
    node_settings: Mapping[str, tuple[str, str]] | None = None,
    announcements: Mapping[str, tuple[str, tuple[str, ...]]] | None = None,
    bgp: Mapping[str, Any] | None = None,
    connection_sync: Mapping[str, Any] | None = None,
    memo: EntryMemo | None = None,
) -> dict[str, Any]:
    """The whole ``status`` of this node's IPVSNode, with every entry (:func:`split` then
    spreads the entries over as many objects as keep each one small); ``memo`` keeps the
    unchanged entries of the last report (:class:`EntryMemo`)."""
    failed = sorted(k for k, o in outcomes.items() if o.state is State.FAILED)
    conds = list(previous_conditions)
    conds = conditions.set_condition(
        conds,
        conditions.KERNEL_SUPPORTED,
        not kernel_error,
        "IPVSAvailable" if not kernel_error else "IPVSUnavailable",
        kernel_error or f"IPVS {kernel.version if kernel else '?'}",
        0,
    )
    conds = conditions.set_condition(
        conds,
        conditions.READY,
        not kernel_error and not failed,
        "Reconciled" if not failed and not kernel_error else "SomeFailed",
        f"{len(failed)} VirtualServer(s) failed: {', '.join(failed[:5])}"
        if failed
        else kernel_error or "every VirtualServer is programmed or pending",
        0,
    )
    status: dict[str, Any] = {
        "agentVersion": agent_version,
        "lastSyncTime": synced_at,
        "virtualServers": (
            memo.entries(outcomes, announcements or {})
            if memo is not None
            else [entry(k, outcomes[k], (announcements or {}).get(k)) for k in sorted(outcomes)]
        ),
        "conditions": conds,
    }
    if kernel is not None:
        status["kernel"] = kernel_status(kernel)
    if bgp is not None:
        status["bgp"] = dict(bgp)
    if connection_sync is not None:
        status["connectionSync"] = dict(connection_sync)
    if node_settings:
        status["nodeSettings"] = [
            {"name": name, "value": value, "previous": previous}
            for name, (value, previous) in sorted(node_settings.items())
        ]
    return status


def same_report(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal apart from the sync time and condition timestamps, so unchanged reports aren't sent."""

    def strip(s: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in s.items() if k != "lastSyncTime"}
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in s.get("conditions", [])
        ]
        return out

    return strip(a) == strip(b)


# -- slices: every object bounded, whatever the number of VirtualServers ------------------

#: Bytes of entries in one object. etcd refuses objects over 1.5 MiB; each write sends its
#: object whole and wakes every watcher with it, so a change should cost a small write. At
#: about 150 bytes per plain entry this holds some 1700 VirtualServers, so a node of an
#: ordinary cluster keeps all its entries in its IPVSNode.
SLICE_BYTES = 256 * 1024
#: Slices at most: 1 GiB of entries (two names whose hashes agree would never part).
MAX_SLICES = 4096


@dataclass(frozen=True)
class Slices:
    """A node's report as written: the IPVSNode's status (its entries those of slice 0), and
    the entries of slices 1.. (each an IPVSNodeReport)."""

    head: dict[str, Any]
    rest: tuple[tuple[dict[str, Any], ...], ...]

    @property
    def count(self) -> int:
        return 1 + len(self.rest)


def slice_of(namespace: str, name: str, count: int) -> int:
    """The slice a VirtualServer's entry is in: a hash of its name, so one VirtualServer
    changing rewrites one object, and an entry moves only when the count changes."""
    return zlib.crc32(f"{namespace}/{name}".encode()) % count


def _size(entry: Mapping[str, Any]) -> int:
    return len(json.dumps(entry, separators=(",", ":")))


def slice_count(
    entries: Sequence[Mapping[str, Any]],
    previous: int = 1,
    budget: int = SLICE_BYTES,
    size: Callable[[Mapping[str, Any]], int] | None = None,
) -> int:
    """The number of slices (a power of two) that keeps each within ``budget``.

    The previous count stays while it fits and is not four times more than needed, so a node
    near a boundary does not move every entry back and forth as entries come and go. A slice
    of one entry fits whatever its size (an entry is bounded by the CRD: messages are cut).
    """
    # Each entry with its comma, and a list's brackets: the JSON size of each slice's list.
    measure = size or _size
    sizes = [(str(e["namespace"]), str(e["name"]), measure(e) + 1) for e in entries]
    total = sum(size for _, _, size in sizes)

    def fits(count: int) -> bool:
        used = [1] * count
        held = [0] * count
        for namespace, name, size in sizes:
            i = slice_of(namespace, name, count)
            used[i] += size
            held[i] += 1
        return all(u <= budget or h <= 1 for u, h in zip(used, held, strict=True))

    count = previous if 1 <= previous <= MAX_SLICES and previous & (previous - 1) == 0 else 1
    while count > 1 and total * 4 <= budget * count and fits(count // 2):
        count //= 2
    while count < MAX_SLICES and not fits(count):
        count *= 2
    return count


def split(
    status: Mapping[str, Any],
    previous: int = 1,
    budget: int = SLICE_BYTES,
    size: Callable[[Mapping[str, Any]], int] | None = None,
) -> Slices:
    """Spread ``status``'s entries over slices; the head also says how many there are.
    ``size``: an entry's JSON size (:meth:`EntryMemo.size` remembers it)."""
    entries = list(status.get("virtualServers") or ())
    count = slice_count(entries, previous, budget, size)
    parts: list[list[dict[str, Any]]] = [[] for _ in range(count)]
    for e in entries:
        parts[slice_of(str(e["namespace"]), str(e["name"]), count)].append(e)
    head = dict(status)
    head["virtualServers"] = parts[0]
    head["reportSlices"] = count
    head["virtualServerCount"] = len(entries)
    return Slices(head, tuple(tuple(p) for p in parts[1:]))


def slice_name(node: str, index: int) -> str:
    """The IPVSNodeReport holding slice ``index`` (>= 1) of ``node``'s entries."""
    suffix = f".{index}"
    if len(node) + len(suffix) > 253:  # a DNS subdomain name's limit
        digest = f"{zlib.crc32(node.encode()):08x}"
        node = f"{node[: 253 - len(suffix) - 9].rstrip('.-')}-{digest}"
    return node + suffix
