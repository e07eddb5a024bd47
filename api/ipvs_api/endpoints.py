"""A Service's endpoints, read from its EndpointSlices the way kube-proxy reads them.

Shared by the agent (which programs real servers from them) and the operator (which counts them
for status), so both agree on what "ready" and "draining" mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ipvs_api.rules import parse_ip
from ipvs_api.types import IPAddress

#: Label that ties an EndpointSlice to its Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend address with the ports of the slice it came from.

    ``ready`` endpoints take new connections. ``serving`` and ``terminating`` ones still answer
    but are going away: they are real servers at weight 0, draining.
    """

    address: IPAddress
    ports: tuple[EndpointPort, ...]
    node_name: str | None = None
    ready: bool = True
    serving: bool = True
    terminating: bool = False

    @property
    def draining(self) -> bool:
        return not self.ready and self.serving and self.terminating

    def port_named(self, name: str, protocol: str) -> int | None:
        return next((p.port for p in self.ports if p.name == name and p.protocol == protocol), None)


def _flag(conditions: Mapping[str, Any], key: str, default: bool) -> bool:
    value = conditions.get(key)
    return default if value is None else bool(value)


def endpoints_from_slices(slices: Iterable[Mapping[str, Any]]) -> tuple[Endpoint, ...]:
    """All IP endpoints of the given slices; FQDN slices and malformed entries are skipped."""
    found: list[Endpoint] = []
    for s in slices:
        if s.get("addressType") not in ("IPv4", "IPv6"):
            continue
        ports = tuple(
            EndpointPort(p.get("name") or "", int(p["port"]), p.get("protocol") or "TCP")
            for p in s.get("ports") or ()
            if isinstance(p, Mapping) and isinstance(p.get("port"), int)
        )
        for e in s.get("endpoints") or ():
            conditions = e.get("conditions") or {}
            ready = _flag(conditions, "ready", True)
            for text in (e.get("addresses") or ())[:1]:  # the first address is the one to use
                addr = parse_ip(str(text))
                if addr is None:
                    continue
                found.append(
                    Endpoint(
                        address=addr,
                        ports=ports,
                        node_name=e.get("nodeName"),
                        ready=ready,
                        serving=_flag(conditions, "serving", ready),
                        terminating=_flag(conditions, "terminating", False),
                    )
                )
    return tuple(found)
