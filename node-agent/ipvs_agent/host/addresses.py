"""Virtual addresses held on a dummy device the agent owns, so IPVS sees them as local.

IPVS only intercepts packets in LOCAL_IN (and LOCAL_OUT): a virtual address must be one of the
node's own addresses, yet it must not disturb routing or be announced like a real interface
address. A dummy device (``NOARP``, always up) holding each VIP as a host address (/32, /128)
gives exactly that, as kube-proxy's ``kube-ipvs0`` does. The agent changes addresses on its own
device only; every other device and address of the node is left alone.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Iterable
from typing import Any, NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ipvs_agent.host._netns import HostError, entered
from ipvs_agent.host.rtnl import AddressReader
from ipvs_agent.model import IPAddress

DEFAULT_INTERFACE = "ipvs0"

IFF_UP = 0x1
IFF_NOARP = 0x80
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40


def host_prefix(address: IPAddress) -> int:
    """The prefix length of a single-address route: 32 for IPv4, 128 for IPv6."""
    return 32 if address.version == 4 else 128


#: Addresses a log line names before it only counts the rest.
SHOWN = 5


class AddressChanges(NamedTuple):
    """What :meth:`VipInterface.sync` did: the addresses it added and removed."""

    added: frozenset[IPAddress]
    removed: frozenset[IPAddress]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    def __str__(self) -> str:
        """For the log: counts, and the addresses themselves only while they are few (a node
        taking 2000 VIPs at once must not write them all on one line)."""

        def part(verb: str, addresses: frozenset[IPAddress]) -> str:
            shown = sorted(addresses, key=lambda a: (a.version, a))
            listed = ", ".join(map(str, shown[:SHOWN]))
            more = f" and {len(shown) - SHOWN} more" if len(shown) > SHOWN else ""
            return f"{verb} {len(shown)} ({listed}{more})"

        parts = [part("added", self.added)] if self.added else []
        parts += [part("removed", self.removed)] if self.removed else []
        return "; ".join(parts) or "unchanged"


def host_addresses(reader: AddressReader, index: int) -> dict[IPAddress, int]:
    """Address → prefix length of every address on device ``index`` but link-local ones."""
    return {
        r.address: r.prefixlen
        for r in reader.dump(index)
        if not r.address.is_link_local  # the kernel's own fe80:: address, never a VIP
    }


def sync_host_addresses(
    rtnl: Any, reader: AddressReader, index: int, wanted: Iterable[IPAddress], device: str
) -> AddressChanges:
    """Make device ``index`` hold exactly ``wanted`` as /32 and /128 addresses.

    IPv6 addresses are added with ``nodad``: a VIP must be usable at once, not tentative.
    ``reader`` reads the device's addresses (in ``rtnl``'s namespace); ``rtnl`` changes them.
    """
    want = {ipaddress.ip_address(str(a)) for a in wanted}
    have = host_addresses(reader, index)
    removed: set[IPAddress] = set()
    added: set[IPAddress] = set()
    for address, prefix in sorted(have.items(), key=lambda item: str(item[0])):
        if address not in want or prefix != host_prefix(address):
            try:
                rtnl.addr("del", index=index, address=str(address), prefixlen=prefix)
            except NetlinkError as error:
                if error.code not in (errno.EADDRNOTAVAIL, errno.ENODEV):
                    raise HostError(f"cannot remove {address} from {device}: {error}") from error
            if address not in want:
                removed.add(address)
    for address in sorted(want, key=str):
        if have.get(address) == host_prefix(address):
            continue
        extra = {"flags": IFA_F_NODAD} if address.version == 6 else {}
        try:
            rtnl.addr(
                "add", index=index, address=str(address), prefixlen=host_prefix(address), **extra
            )
        except NetlinkError as error:
            if error.code != errno.EEXIST:
                raise HostError(f"cannot add {address} to {device}: {error}") from error
        added.add(address)
    return AddressChanges(frozenset(added), frozenset(removed))


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


class VipInterface:
    """The agent's dummy device and the virtual addresses on it.

    ``netns`` (a name under ``/run/netns`` or a path) selects the network namespace; by default
    the namespace the agent runs in. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, name: str = DEFAULT_INTERFACE, *, netns: str | None = None) -> None:
        if not 0 < len(name) <= 15 or "/" in name or any(c.isspace() for c in name):
            raise ValueError(f"invalid interface name {name!r}")
        self.name = name
        self.netns = netns
        self._ipr: Any = None
        self._reader: AddressReader | None = None

    def __enter__(self) -> VipInterface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @property
    def rtnl(self) -> Any:
        """The pyroute2 ``IPRoute``, opened inside the namespace on first use and kept there."""
        if self._ipr is None:
            with entered(self.netns):
                self._ipr = IPRoute()
        return self._ipr

    @property
    def reader(self) -> AddressReader:
        """Reads the namespace's addresses (a raw dump: see host.rtnl)."""
        if self._reader is None:
            self._reader = AddressReader(self.netns)
        return self._reader

    def _link(self) -> Any | None:
        found = self.rtnl.link_lookup(ifname=self.name)
        if not found:
            return None
        return self.rtnl.link("get", index=found[0])[0]

    def _index(self) -> int | None:
        link = self._link()
        return None if link is None else int(link["index"])

    def exists(self) -> bool:
        return self._index() is not None

    def ensure(self) -> bool:
        """Create the device if it is missing and keep it up and ``NOARP``; True if created.

        A device of that name that is not a dummy belongs to someone else: refuse rather than
        take it over.
        """
        link = self._link()
        created = False
        if link is None:
            try:
                self.rtnl.link("add", ifname=self.name, kind="dummy")
                created = True
            except NetlinkError as error:
                if error.code != errno.EEXIST:
                    raise HostError(f"cannot create dummy device {self.name}: {error}") from error
            link = self._link()
            if link is None:
                raise HostError(f"dummy device {self.name} vanished right after creation")
        elif _kind(link) != "dummy":
            raise HostError(
                f"device {self.name} exists and is a {_kind(link) or 'device of unknown kind'}, "
                "not the agent's dummy; refusing to use it"
            )
        wanted = IFF_UP | IFF_NOARP
        if link["flags"] & wanted != wanted:
            self.rtnl.link("set", index=link["index"], flags=wanted, change=wanted)
        return created

    def addresses(self) -> set[IPAddress]:
        """The virtual addresses on the device now (empty if the device is missing)."""
        index = self._index()
        return set() if index is None else set(host_addresses(self.reader, index))

    def tentative(self) -> set[IPAddress]:
        """IPv6 addresses on the device still waiting for duplicate address detection."""
        index = self._index()
        if index is None:
            return set()
        return {r.address for r in self.reader.dump(index) if r.flags & IFA_F_TENTATIVE}

    def sync(self, wanted: Iterable[IPAddress]) -> AddressChanges:
        """Make the device hold exactly ``wanted`` (as host addresses); creates it if missing.

        Returns what was added and removed; an address already present with the wrong prefix
        length is replaced and counted as added.
        """
        self.ensure()
        index = self._index()
        if index is None:
            raise HostError(f"dummy device {self.name} is missing")
        return sync_host_addresses(self.rtnl, self.reader, index, wanted, self.name)

    def alias(self) -> str:
        """The device's ``ifalias`` (empty if unset or the device is missing)."""
        link = self._link()
        return "" if link is None else str(link.get_attr("IFLA_IFALIAS") or "")

    def set_alias(self, text: str) -> None:
        """Write the ``ifalias``: a note in the kernel that lives and dies with the device."""
        index = self._index()
        if index is None:
            raise HostError(f"dummy device {self.name} is missing")
        if self.alias() != text:
            self.rtnl.link("set", index=index, ifalias=text)

    def delete(self) -> bool:
        """Remove the device and with it every address on it (uninstall); True if it existed."""
        link = self._link()
        if link is None:
            return False
        if _kind(link) != "dummy":
            raise HostError(f"device {self.name} is not a dummy; refusing to delete it")
        try:
            self.rtnl.link("del", index=link["index"])
        except NetlinkError as error:
            if error.code != errno.ENODEV:
                raise HostError(f"cannot delete {self.name}: {error}") from error
        return True
