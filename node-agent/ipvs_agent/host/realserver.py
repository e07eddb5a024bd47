"""Preparing a real server of DR and TUN services: the VIP held silently, and decapsulation.

With DR and TUN the director leaves the destination address alone, so the real server must
accept packets to the VIP as its own and answer clients from it directly:

* the VIP sits as a host address on a dummy device the agent owns (``ipvs-rs0``, ``NOARP``);
  ``arp_ignore=1`` and ``arp_announce=2`` keep the host from answering ARP for it or using it
  as an ARP sender (else the real server steals the VIP from the director on the LAN);
* TUN needs a decapsulation device: the agent creates its own tunnel device bound to the real
  server's address (``local`` = the RIP the director tunnels to, remote any), never the
  kernel's shared fallback devices (``tunl0``, ``gre0``...), which other software such as
  Calico uses. ipip and gue decapsulate through an ``ipip`` device (IPv4 outer, IPv4 inner),
  a ``sit`` device (IPv4 outer, IPv6 inner) or an ``ip6tnl`` device (IPv6 outer, any inner);
  gre through ``gre`` / ``ip6gre``. gue also needs a fou receive port (``ip fou add port P
  gue``), which only the iproute2 CLI can make;
* decapsulated packets arrive on the tunnel device while the route back to the client leaves
  through another, so strict reverse-path filtering would drop them: ``rp_filter`` 0 on the
  device and 0 or 2 on ``all`` (the kernel uses the larger of the two).

:func:`render` turns a :class:`RealServerSpec` into that host state (pure); a
:class:`RealServerHost` applies it to a network namespace (the node's own by default, or a
pod's) and undoes what is no longer needed. Ownership is written into the kernel itself: every
tunnel device of the agent carries an ``ifalias`` starting with ``ipvs-operator``, and the
dummy's ``ifalias`` lists the fou ports the agent added. Node-wide sysctls are left as set.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from ipvs_agent.host._netns import HostError, run
from ipvs_agent.host.addresses import (
    IFF_UP,
    AddressChanges,
    VipInterface,
    sync_host_addresses,
)
from ipvs_agent.host.sysctl import PROC_SYS, Change, Sysctl, apply, interface_sysctl
from ipvs_agent.model import IPAddress, TunnelType

RS_INTERFACE = "ipvs-rs0"
OWNER = "ipvs-operator"
_DECAP_ALIAS = f"{OWNER} decap"
_DUMMY_ALIAS = f"{OWNER} real-server"

IPPROTO_IPIP = 4
IPPROTO_IPV6 = 41


@dataclass(frozen=True)
class Decap:
    """One kind of tunnel this real server must decapsulate, addressed to ``local``.

    ``local`` is the real server's address the director sends the outer packet to (the
    destination's address in the IPVS table); ``port`` is the fou port of gue.
    """

    type: TunnelType
    local: IPAddress
    port: int = 0

    def __post_init__(self) -> None:
        if self.type is TunnelType.GUE and not 0 < self.port < 65536:
            raise ValueError("gue decapsulation needs its fou port (1-65535)")
        if self.type is not TunnelType.GUE and self.port:
            raise ValueError(f"{self.type.name.lower()} takes no port")


@dataclass(frozen=True)
class RealServerSpec:
    """What a real server must accept: its VIPs (DR and TUN) and the tunnels it decapsulates."""

    vips: frozenset[IPAddress] = frozenset()
    decap: frozenset[Decap] = frozenset()


@dataclass(frozen=True)
class TunnelDevice:
    """A decapsulation device the agent owns: kind, bound address and inner protocol."""

    name: str
    kind: str  # ipip | sit | ip6tnl | gre | ip6gre
    local: str
    #: IFLA_IPTUN_PROTO for ipip/sit/ip6tnl: the inner protocol accepted (0 = any).
    proto: int = 0
    #: The IPv4 VIPs, held by the device too: reverse-path filtering in loose mode (2) drops
    #: every packet arriving on a device without an IPv4 address.
    addresses: frozenset[IPAddress] = frozenset()

    @property
    def alias(self) -> str:
        return f"{_DECAP_ALIAS} {self.kind} local {self.local}"


@dataclass(frozen=True, order=True)
class FouPort:
    """A fou receive port for gue, per outer address family (4 or 6)."""

    port: int
    family: int

    def __str__(self) -> str:
        return f"{self.port}/{self.family}"


@dataclass(frozen=True)
class RealServerSetup:
    """The rendered host state of a real server (see :func:`render`)."""

    interface: str
    vips: frozenset[IPAddress]
    tunnels: frozenset[TunnelDevice]
    fou: frozenset[FouPort]
    sysctls: tuple[Sysctl, ...]

    @property
    def empty(self) -> bool:
        return not (self.vips or self.tunnels or self.fou)


def _by_name(device: TunnelDevice) -> str:
    return device.name


_TAG = {"ipip": "i4", "sit": "s4", "ip6tnl": "i6", "gre": "g4", "ip6gre": "g6"}


def tunnel_device(kind: str, local: IPAddress, proto: int = 0) -> TunnelDevice:
    """The device for (kind, local, proto), with a stable name of at most 15 characters."""
    digest = hashlib.sha256(f"{kind} {local} {proto}".encode()).hexdigest()[:8]
    return TunnelDevice(f"ipvs{_TAG[kind]}-{digest}", kind, str(local), proto)


def _devices(decap: Decap, inner_families: set[int]) -> list[TunnelDevice]:
    outer = decap.local.version
    if decap.type is TunnelType.GRE:
        return [tunnel_device("gre" if outer == 4 else "ip6gre", decap.local)]
    # ipip, and gue whose decapsulated payload goes through the same IP-in-IP handlers
    if outer == 6:
        return [tunnel_device("ip6tnl", decap.local, 0)]
    devices = []
    if 4 in inner_families or not inner_families:
        devices.append(tunnel_device("ipip", decap.local, IPPROTO_IPIP))
    if 6 in inner_families:
        devices.append(tunnel_device("sit", decap.local, IPPROTO_IPV6))
    return devices


def render(spec: RealServerSpec, interface: str = RS_INTERFACE) -> RealServerSetup:
    """The devices, addresses, fou ports and sysctls that make ``spec`` work."""
    vips = frozenset(ipaddress.ip_address(str(v)) for v in spec.vips)
    inner: set[int] = {v.version for v in vips}
    tunnels: set[TunnelDevice] = set()
    fou: set[FouPort] = set()
    vips4 = frozenset(v for v in vips if v.version == 4)
    for decap in spec.decap:
        for device in _devices(decap, inner):
            tunnels.add(device if device.kind == "sit" else replace(device, addresses=vips4))
        if decap.type is TunnelType.GUE:
            fou.add(FouPort(decap.port, decap.local.version))
    sysctls: list[Sysctl] = []
    if any(v.version == 4 for v in vips):
        for scope in ("all", interface):
            sysctls.append(
                interface_sysctl(
                    "ipv4", scope, "arp_ignore", 1,
                    "answer ARP only for addresses of the interface asked: never for the VIP",
                )
            )  # fmt: skip
            sysctls.append(
                interface_sysctl(
                    "ipv4", scope, "arp_announce", 2,
                    "never send ARP with the VIP as sender address",
                )
            )  # fmt: skip
    if tunnels:
        sysctls.append(
            interface_sysctl(
                "ipv4", "all", "rp_filter", 2,
                "decapsulated packets arrive on the tunnel device, not the client's route: "
                "strict reverse-path filtering (1) would drop them",
                accept=("0", "2"),
            )
        )  # fmt: skip
        for device in sorted(tunnels, key=_by_name):
            sysctls.append(
                interface_sysctl(
                    "ipv4", device.name, "rp_filter", 0,
                    "no reverse-path check on the decapsulation device",
                )
            )  # fmt: skip
    return RealServerSetup(interface, vips, frozenset(tunnels), frozenset(fou), tuple(sysctls))


def parse_fou_show(text: str) -> set[FouPort]:
    """The gue and fou ports in ``ip fou show`` output (``port 6080 gue [-6] ...``)."""
    ports: set[FouPort] = set()
    for line in text.splitlines():
        tokens = line.split()
        if "port" not in tokens:
            continue
        at = tokens.index("port")
        if at + 1 >= len(tokens) or not tokens[at + 1].isdigit():
            continue
        ports.add(FouPort(int(tokens[at + 1]), 6 if "-6" in tokens else 4))
    return ports


def fou_record(ports: Iterable[FouPort]) -> str:
    """The dummy's ``ifalias``: which fou ports the agent added (the kernel keeps no owner)."""
    return f"{_DUMMY_ALIAS} fou=" + ",".join(str(p) for p in sorted(set(ports)))


def parse_fou_record(alias: str) -> set[FouPort]:
    match = re.search(r"fou=([0-9/,]*)", alias)
    if match is None:
        return set()
    ports = set()
    for item in match.group(1).split(","):
        port, _, family = item.partition("/")
        if port.isdigit() and family in ("4", "6"):
            ports.add(FouPort(int(port), int(family)))
    return ports


NO_ADDRESS_CHANGES = AddressChanges(frozenset(), frozenset())


@dataclass(frozen=True)
class RealServerChanges:
    """What :meth:`RealServerHost.sync` changed."""

    addresses: AddressChanges = NO_ADDRESS_CHANGES
    tunnels_added: tuple[str, ...] = ()
    tunnels_removed: tuple[str, ...] = ()
    fou_added: tuple[FouPort, ...] = ()
    fou_removed: tuple[FouPort, ...] = ()
    sysctls: tuple[Change, ...] = ()
    missing_sysctls: tuple[Sysctl, ...] = ()
    interface_removed: bool = False

    @property
    def changed(self) -> bool:
        return bool(
            self.addresses.changed
            or self.tunnels_added
            or self.tunnels_removed
            or self.fou_added
            or self.fou_removed
            or self.sysctls
            or self.interface_removed
        )


class RealServerHost:
    """Applies a :class:`RealServerSpec` to one network namespace, idempotently.

    ``netns``: a name under ``/run/netns`` or a path such as ``/proc/PID/ns/net``; None is the
    agent's own namespace. ``ip`` is the iproute2 binary, used for fou only. ``sysctl_root`` is
    where ``/proc/sys`` is writable: a container's own is read-only, so the agent writes through
    a mount of the node's (``/host/proc/sys``); ``net.*`` files there resolve in the namespace of
    the writing thread, so one mount serves the node and every pod.
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        interface: str = RS_INTERFACE,
        ip: str = "ip",
        sysctl_root: str = PROC_SYS,
    ) -> None:
        self.netns = netns
        self.interface = interface
        self.ip = ip
        self.sysctl_root = sysctl_root
        self._vips = VipInterface(interface, netns=netns)

    def __enter__(self) -> RealServerHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._vips.close()

    # ------------------------------------------------------------ reading

    def owned_tunnels(self) -> dict[str, int]:
        """Name → index of every tunnel device carrying the agent's ifalias."""
        found: dict[str, int] = {}
        for link in self._vips.rtnl.link("dump"):
            alias = link.get_attr("IFLA_IFALIAS") or ""
            if alias.startswith(_DECAP_ALIAS + " "):
                found[link.get_attr("IFLA_IFNAME")] = int(link["index"])
        return found

    def owned_fou(self) -> set[FouPort]:
        return parse_fou_record(self._vips.alias()) if self._vips.exists() else set()

    def live_fou(self) -> set[FouPort]:
        """Every fou/gue port in the namespace (loads the fou module if ``ip fou`` needs it)."""
        proc = run([self.ip, "fou", "show"], netns=self.netns)
        if proc.returncode != 0:
            run(["modprobe", "fou"], netns=self.netns)
            proc = run([self.ip, "fou", "show"], netns=self.netns)
        if proc.returncode != 0:
            raise HostError(f"ip fou show failed (is the fou module available?): {proc.stderr}")
        return parse_fou_show(proc.stdout)

    # ------------------------------------------------------------ applying

    def sync(self, spec: RealServerSpec) -> RealServerChanges:
        """Make the namespace serve ``spec``; an empty spec undoes everything the agent did."""
        setup = render(spec, self.interface)
        if setup.empty:
            return self.clear()
        addresses = self._vips.sync(setup.vips)
        added, removed = self._sync_tunnels(setup.tunnels)
        fou_added, fou_removed = self._sync_fou(setup.fou)
        result = apply(setup.sysctls, netns=self.netns, root=self.sysctl_root)
        return RealServerChanges(
            addresses=addresses,
            tunnels_added=added,
            tunnels_removed=removed,
            fou_added=fou_added,
            fou_removed=fou_removed,
            sysctls=result.changed,
            missing_sysctls=result.missing,
        )

    def clear(self) -> RealServerChanges:
        """Remove the agent's tunnel devices, fou ports and dummy (with its VIPs)."""
        _, removed = self._sync_tunnels(frozenset())
        fou_removed: tuple[FouPort, ...] = ()
        if self._vips.exists():
            _, fou_removed = self._sync_fou(frozenset())
        vips = self._vips.addresses()
        gone = self._vips.delete()
        return RealServerChanges(
            addresses=AddressChanges(frozenset(), frozenset(vips)),
            tunnels_removed=removed,
            fou_removed=fou_removed,
            interface_removed=gone,
        )

    def _sync_tunnels(
        self, wanted: frozenset[TunnelDevice]
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        rtnl = self._vips.rtnl
        owned = self.owned_tunnels()
        by_name = {device.name: device for device in wanted}
        removed: list[str] = []
        for name, index in sorted(owned.items()):
            if name not in by_name:
                self._delete_link(index, name)
                removed.append(name)
        added: list[str] = []
        for device in sorted(wanted, key=_by_name):
            known = owned.get(device.name)
            if known is not None:
                index = known
            elif rtnl.link_lookup(ifname=device.name):
                index = self._adopt(device)
            else:
                index = self._create(device)
                added.append(device.name)
            link = rtnl.link("get", index=index)[0]
            if not link["flags"] & IFF_UP:
                rtnl.link("set", index=index, flags=IFF_UP, change=IFF_UP)
            sync_host_addresses(rtnl, self._vips.reader, index, device.addresses, device.name)
        return tuple(added), tuple(removed)

    def _create(self, device: TunnelDevice) -> int:
        rtnl = self._vips.rtnl
        # pyroute2 names IFLA_INFO_DATA attributes <kind>_<attr>: ipip_local, ip6gre_local...
        data: dict[str, Any] = {f"{device.kind}_local": device.local}
        if device.kind in ("ipip", "sit", "ip6tnl"):
            data[f"{device.kind}_proto"] = device.proto
        try:
            rtnl.link("add", ifname=device.name, kind=device.kind, **data)
        except NetlinkError as error:
            raise HostError(
                f"cannot create {device.kind} device {device.name} (local {device.local}): {error}"
            ) from error
        found = rtnl.link_lookup(ifname=device.name)
        if not found:
            raise HostError(f"tunnel device {device.name} vanished right after creation")
        # The alias is the ownership mark: written right after creation, before anything else.
        rtnl.link("set", index=found[0], ifalias=device.alias)
        return int(found[0])

    def _adopt(self, device: TunnelDevice) -> int:
        """A device of the agent's name but without its alias: left by a crash between
        creation and the alias write, if it is of the right kind; anything else is foreign."""
        rtnl = self._vips.rtnl
        index = int(rtnl.link_lookup(ifname=device.name)[0])
        link = rtnl.link("get", index=index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        kind = None if info is None else info.get_attr("IFLA_INFO_KIND")
        if kind != device.kind or link.get_attr("IFLA_IFALIAS"):
            raise HostError(f"device {device.name} exists and is not the agent's; not touching it")
        rtnl.link("set", index=index, ifalias=device.alias)
        return index

    def _delete_link(self, index: int, name: str) -> None:
        try:
            self._vips.rtnl.link("del", index=index)
        except NetlinkError as error:
            raise HostError(f"cannot delete tunnel device {name}: {error}") from error

    def _sync_fou(
        self, wanted: frozenset[FouPort]
    ) -> tuple[tuple[FouPort, ...], tuple[FouPort, ...]]:
        owned = self.owned_fou()
        if not wanted and not owned:
            return (), ()
        live = self.live_fou()
        added: list[FouPort] = []
        removed: list[FouPort] = []
        for port in sorted(owned - wanted):
            if port in live:
                self._fou("del", port)
                removed.append(port)
        # A port someone else made stays theirs: only ports the agent adds enter the record.
        record = (owned & wanted) | {p for p in wanted if p not in live}
        self._vips.set_alias(fou_record(record | owned))  # recorded before the kernel has it
        for port in sorted(wanted - live):
            self._fou("add", port)
            added.append(port)
        self._vips.set_alias(fou_record(record))
        return tuple(added), tuple(removed)

    def _fou(self, action: str, port: FouPort) -> None:
        argv = [self.ip, "fou", action, "port", str(port.port)]
        if action == "add":
            argv.append("gue")
        if port.family == 6:
            argv.append("-6")
        proc = run(argv, netns=self.netns)
        if proc.returncode != 0:
            raise HostError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
