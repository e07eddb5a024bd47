"""Condition types and reasons of the v1alpha1 API, and a helper that keeps transitions honest.

Conditions follow the Kubernetes API conventions: ``lastTransitionTime`` moves only when
``status`` changes, and every condition records the generation it was computed for.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

# VirtualServer condition types.
READY: Final = "Ready"
PROGRAMMED: Final = "Programmed"
ADDRESS_ALLOCATED: Final = "AddressAllocated"

# Service condition type: which nodes announce the Service's addresses (layer 2, BGP).
SERVICE_ANNOUNCED: Final = "ipvs.io/Announced"
ANNOUNCED: Final = "Announced"
NOT_ANNOUNCED: Final = "NotAnnounced"

# IPVSNode condition types.
KERNEL_SUPPORTED: Final = "KernelSupported"

# Reasons (CamelCase, as the conventions ask).
ALLOCATED: Final = "Allocated"
ADDRESS_CONFLICT: Final = "AddressConflict"
ADDRESS_NOT_IN_POOL: Final = "AddressNotInPool"
POOL_NOT_FOUND: Final = "PoolNotFound"
POOL_EXHAUSTED: Final = "PoolExhausted"
UNSUPPORTED: Final = "Unsupported"
INVALID_SPEC: Final = "InvalidSpec"
NO_BACKENDS: Final = "NoBackends"
PENDING: Final = "Pending"
ALL_PROGRAMMED: Final = "AllProgrammed"
KERNEL_ERROR: Final = "KernelError"
#: A firewall-mark VirtualServer: an AddressPool grants the mark to its namespace, or none does.
FIREWALL_MARK_ADMITTED: Final = "FirewallMarkAdmitted"
FIREWALL_MARK_NOT_ADMITTED: Final = "FirewallMarkNotAdmitted"
#: Still held while the pool it came from is missing or not ready (AddressAllocated stays True).
ADDRESS_RETAINED: Final = "AddressRetained"
FIREWALL_MARK_RETAINED: Final = "FirewallMarkRetained"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | None,
    reason: str,
    message: str,
    generation: int,
    at: str | None = None,
) -> list[dict[str, Any]]:
    """Return a new condition list with ``type_`` set; the transition time moves on change only."""
    text = "Unknown" if status is None else ("True" if status else "False")
    old = next((c for c in conditions if c.get("type") == type_), None)
    moved = old is None or old.get("status") != text
    new = {
        "type": type_,
        "status": text,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": (at or now()) if moved else old["lastTransitionTime"],  # type: ignore[index]
    }
    return [c for c in conditions if c.get("type") != type_] + [new]
