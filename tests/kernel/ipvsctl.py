"""Program IPVS in a director netns with pyroute2 (``IPVS``, ``IPVSService``, ``IPVSDest``).

Two pyroute2 0.9.7 encoding gaps are worked around here, both seen against the
Debian 6.1 kernel:

* IPVS_DEST_ATTR_TUN_PORT is declared ``uint16`` (host order) but the kernel reads
  it as be16, so the port is passed through ``socket.htons`` to arrive right.
* IPVS_SVC_ATTR_NETMASK is declared ``ip4addr``; for IPv6 services the kernel wants
  the prefix length as a raw 32-bit value (ipvsadm sends 128), and rejects a
  service without it (EINVAL). "128.0.0.0" packs to those bytes on little endian.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from pyroute2 import IPVS, IPVSDest, IPVSService

from tests.kernel.topology import Netns, RealServer, Topology

FWD_MASQ = 0
FWD_TUNNEL = 2
FWD_ROUTE = 3
TUN_TYPES = {"ipip": 0, "gue": 1, "gre": 2}
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

if sys.byteorder != "little":  # the netmask trick below assumes little endian
    raise ImportError("tests.kernel.ipvsctl assumes a little-endian host")


@contextlib.contextmanager
def ipvs_socket(director: Netns) -> Iterator[Any]:
    """A pyroute2 IPVS socket opened inside (and bound to) the director's netns."""
    with director.entered():
        ipvs = IPVS()
    try:
        yield ipvs
    finally:
        ipvs.close()


def service(vip: str, port: int, protocol: str = "tcp", scheduler: str = "rr", **extra: Any) -> Any:
    """An IPVSService for ``vip:port`` (v4 or v6)."""
    attrs: dict[str, Any] = {
        "addr": vip,
        "port": port,
        "protocol": PROTOCOLS[protocol],
        "sched_name": scheduler,
    }
    if ":" in vip:
        attrs["af"] = socket.AF_INET6
        attrs["netmask"] = "128.0.0.0"  # raw u32 128, see module docstring
    attrs.update(extra)
    return IPVSService(**attrs)


def dest_for(topology: Topology, real_server: RealServer, weight: int = 1) -> Any:
    """The IPVSDest for a real server, with the topology's forwarding method."""
    attrs: dict[str, Any] = {"addr": real_server.rip, "port": topology.port, "weight": weight}
    if topology.method == "nat":
        attrs["fwd_method"] = FWD_MASQ
    elif topology.method == "dr":
        attrs["fwd_method"] = FWD_ROUTE
    else:
        assert topology.tun_type is not None
        attrs["fwd_method"] = FWD_TUNNEL
        attrs["tun_type"] = TUN_TYPES[topology.tun_type]
        attrs["tun_port"] = socket.htons(topology.tun_port)  # be16 on the wire
    return IPVSDest(**attrs)


def add_service(
    ipvs: Any,
    topology: Topology,
    protocol: str = "tcp",
    scheduler: str = "rr",
    weights: Sequence[int] | None = None,
) -> Any:
    """Create the VIP service and one dest per real server; return the service."""
    svc = service(topology.vip, topology.port, protocol, scheduler)
    ipvs.service("add", service=svc)
    weights = weights if weights is not None else [1] * len(topology.real_servers)
    for real_server, weight in zip(topology.real_servers, weights, strict=True):
        ipvs.dest("add", service=svc, dest=dest_for(topology, real_server, weight))
    return svc


def ipvsadm_list(director: Netns) -> str:
    """``ipvsadm -Ln --tun-info`` in the director netns, for cross-checks and messages."""
    return director.run("ipvsadm", "-Ln", "--tun-info").stdout


def ipvsadm(director: Netns, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ipvsadm in the director netns (the VM sees the host's /usr/sbin/ipvsadm)."""
    return director.run("ipvsadm", *args)
