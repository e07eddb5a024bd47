"""Counting a VirtualServer's real servers for ``status.realServers``. Pure.

The agents program real servers from the EndpointSlices themselves; the operator only counts
them, with the same reading of the slices (:mod:`ipvs_api.endpoints`) and the same filters the
agents apply — family (only TUN crosses families), and a port to send to — so the count says
what the directors will program.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ipvs_api.endpoints import Endpoint
from ipvs_api.types import ForwardingMethod, IPAddress, IPFamily, VirtualServer


@dataclass(frozen=True)
class Counts:
    ready: int = 0
    total: int = 0

    @property
    def summary(self) -> str:
        return f"{self.ready}/{self.total}"


def _family_ok(vs: VirtualServer, family: IPFamily, address: IPAddress) -> bool:
    return vs.spec.forwarding.method is ForwardingMethod.TUN or IPFamily.of(address) is family


def _has_port(vs: VirtualServer, ep: Endpoint) -> bool:
    """True when the endpoint resolves at least one of the VirtualServer's ports."""
    if not vs.spec.ports:
        return True  # firewall-mark service: every port
    for port in vs.spec.ports:
        target = port.target_port
        if not isinstance(target, str) or ep.port_named(target, str(port.protocol)) is not None:
            return True
    return False


def count(vs: VirtualServer, endpoints: Iterable[Endpoint]) -> Counts:
    """Ready and total (ready + draining) real servers, each address counted once."""
    family = IPFamily.of(vs.address) if vs.address is not None else vs.spec.family
    if vs.spec.backends.service is None:
        servers = [s for s in vs.spec.backends.static if _family_ok(vs, family, s.address)]
        weight = vs.spec.backends.default_weight
        ready = sum(1 for s in servers if (weight if s.weight is None else s.weight) > 0)
        return Counts(ready, len(servers))
    state: dict[IPAddress, bool] = {}
    for ep in endpoints:
        if not (ep.ready or ep.draining):
            continue
        if not _family_ok(vs, family, ep.address) or not _has_port(vs, ep):
            continue
        state[ep.address] = state.get(ep.address, False) or ep.ready
    weight_ok = vs.spec.backends.default_weight > 0
    ready = sum(1 for r in state.values() if r) if weight_ok else 0
    return Counts(ready, len(state))
