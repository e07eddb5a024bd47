"""Whether a director reaches a real server on-link: the kernel's route lookup, as facts.

DR rewrites only the destination MAC address, so a DR real server must be on a segment the
director is attached to at layer 2: the route to it has no gateway and leaves through a device
that has neighbours (not ``NOARP`` or point-to-point, as tunnels and WireGuard are). A pod on
another node is behind that node (a gateway, or an overlay device) and is refused. The lookup
is the kernel's own (``ip route get``), so policy routing, host routes to pods and overlays all
count exactly as they do for the packets.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from ipvs_agent.desired import Route
from ipvs_agent.model import IPAddress

RTN_UNICAST = 1
RTN_LOCAL = 2
IFF_LOOPBACK = 0x8
IFF_POINTOPOINT = 0x10
IFF_NOARP = 0x80


def route_fact(msg: Any, link: Any | None) -> Route:
    """The :class:`Route` of one ``RTM_NEWROUTE`` answer to ``route get`` and its device."""
    kind = int(msg["type"])
    name = "" if link is None else str(link.get_attr("IFLA_IFNAME") or "")
    device = f" dev {name}" if name else ""
    if kind == RTN_LOCAL:
        return Route(True, "a local address")
    if kind != RTN_UNICAST:
        return Route(False, f"no usable route (route type {kind})")
    gateway = msg.get_attr("RTA_GATEWAY")
    if gateway is None:
        via = msg.get_attr("RTA_VIA")
        if via is not None:
            gateway = via.get("addr") if isinstance(via, dict) else via
    if gateway is not None:
        return Route(False, f"via {gateway}{device}")
    flags = 0 if link is None else int(link["flags"])
    if flags & (IFF_NOARP | IFF_POINTOPOINT) and not flags & IFF_LOOPBACK:
        return Route(False, f"{device.strip()} has no L2 neighbours (a tunnel or NOARP device)")
    return Route(True, device.strip())


def lookup(rtnl: Any, addresses: Iterable[IPAddress]) -> dict[IPAddress, Route]:
    """Ask the kernel for the route to each address (from the netns ``rtnl`` is bound to)."""
    facts: dict[IPAddress, Route] = {}
    links: dict[int, Any] = {}
    for address in sorted(addresses, key=lambda a: (a.version, int(a))):
        try:
            answer = rtnl.route("get", dst=str(address))
        except NetlinkError as error:
            if error.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES, errno.EINVAL):
                facts[address] = Route(False, f"no route: {os.strerror(error.code)}")
            continue  # anything else: no fact, the address is taken as on-link
        if not answer:
            continue
        msg = answer[0]
        oif = msg.get_attr("RTA_OIF")
        link = None
        if oif is not None:
            if oif not in links:
                try:
                    links[oif] = rtnl.link("get", index=oif)[0]
                except NetlinkError:
                    links[oif] = None
            link = links[oif]
        facts[address] = route_fact(msg, link)
    return facts
