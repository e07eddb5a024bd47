"""The IPVSNode status an agent reports: pure, so what is written is what the tests see."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ipvs_agent.desired import Outcome, State
from ipvs_agent.health.verdict import RealServerHealth
from ipvs_agent.model import KernelInfo
from ipvs_api import conditions

#: Entries reported per node; the CRD allows 20000, far beyond what one node programs.
MAX_ENTRIES = 20000


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
) -> dict[str, Any]:
    """The whole ``status`` of this node's IPVSNode."""
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
        "virtualServers": [
            entry(k, outcomes[k], (announcements or {}).get(k)) for k in sorted(outcomes)
        ][:MAX_ENTRIES],
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
