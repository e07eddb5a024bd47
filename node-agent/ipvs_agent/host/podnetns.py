"""Finding a pod's network namespace by the pod's IP address.

The agent knows a pod only as an endpoint address on its node. Every network namespace on the
node is reachable as a file: the named ones under ``/run/netns`` (containerd and CRI-O pin pod
namespaces there) and those of processes, ``/proc/PID/ns/net`` (with the host's PID namespace).
One namespace has many such files, so they are told apart by their nsfs inode. Each namespace
is entered once to read its addresses — and whether it holds something of the agent's
real-server setup, so an agent that restarts still cleans pods it prepared before — and the
answer is cached by inode: a pod's address does not change while its namespace lives.
Namespaces that had no address when first seen (a pod whose CNI setup was still running) are
read again when an address is looked for and not found.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pyroute2 import IPRoute

from ipvs_agent.host._netns import NETNS_RUN_DIR, entered
from ipvs_agent.host.realserver import OWNER, RS_INTERFACE
from ipvs_agent.model import IPAddress

log = logging.getLogger(__name__)

#: A namespace's identity: (st_dev, st_ino) of its nsfs file.
Ident = tuple[int, int]


@dataclass(frozen=True)
class NetnsInfo:
    """What one namespace holds: its addresses, and whether the agent set something up there."""

    addresses: frozenset[IPAddress]
    prepared: bool = False


def ident_of(path: str) -> Ident | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def list_namespaces(netns_dirs: Sequence[str], proc: str | None) -> dict[Ident, str]:
    """Every namespace file found, one path per namespace (a named one preferred)."""
    found: dict[Ident, str] = {}
    paths: list[str] = []
    for directory in netns_dirs:
        try:
            paths.extend(os.path.join(directory, n) for n in sorted(os.listdir(directory)))
        except OSError:
            continue
    if proc:
        try:
            pids = sorted((n for n in os.listdir(proc) if n.isdigit()), key=int)
        except OSError:
            pids = []
        paths.extend(f"{proc}/{pid}/ns/net" for pid in pids)
    for path in paths:
        ident = ident_of(path)
        if ident is not None:
            found.setdefault(ident, path)
    return found


def probe(path: str) -> NetnsInfo:
    """Enter the namespace and read its addresses and any trace of the agent's setup."""
    with entered(path):
        rtnl = IPRoute()
    try:
        addresses: set[IPAddress] = set()
        for msg in rtnl.addr("dump"):
            raw = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if raw is None:
                continue
            address = ipaddress.ip_address(raw)
            if not (address.is_link_local or address.is_loopback):
                addresses.add(address)
        prepared = False
        for link in rtnl.link("dump"):
            alias = str(link.get_attr("IFLA_IFALIAS") or "")
            if link.get_attr("IFLA_IFNAME") == RS_INTERFACE or alias.startswith(OWNER):
                prepared = True
    finally:
        rtnl.close()
    return NetnsInfo(frozenset(addresses), prepared)


class PodNamespaces:
    """The namespaces on this node other than the agent's own, and the addresses they hold.

    ``netns_dirs`` and ``proc`` say where to look (``proc=None``: not at processes); ``own`` is
    the agent's own namespace (a path), never counted as a pod's.
    """

    def __init__(
        self,
        netns_dirs: Sequence[str] = (NETNS_RUN_DIR,),
        proc: str | None = "/proc",
        own: str = "/proc/self/ns/net",
        *,
        lister: Callable[[Sequence[str], str | None], dict[Ident, str]] = list_namespaces,
        prober: Callable[[str], NetnsInfo] = probe,
    ) -> None:
        self.netns_dirs = tuple(netns_dirs)
        self.proc = proc
        self.own = own
        self._lister = lister
        self._prober = prober
        self._known: dict[Ident, NetnsInfo] = {}
        #: Live namespaces at the last refresh: identity → a path to enter it.
        self.live: dict[Ident, str] = {}
        #: Namespaces that could not be entered at their last reading, with the error.
        self.unreadable: dict[Ident, str] = {}
        self.refreshed = False

    def where(self) -> str:
        """Where namespaces were looked for, and how many could not be entered (and why)."""
        places = [*self.netns_dirs, *([f"{self.proc}/*/ns/net"] if self.proc else [])]
        text = ", ".join(places) or "nowhere"
        if not self.live:
            text += "; no network namespace is visible there (is the node's /run/netns mounted?)"
        if self.unreadable:
            first = next(iter(self.unreadable.values()))
            text += (
                f"; {len(self.unreadable)} namespace(s) could not be entered, e.g. {first} "
                "(entering a pod's namespace needs CAP_SYS_ADMIN, /proc/PID/ns/net of other "
                "processes also CAP_SYS_PTRACE and the host's PID namespace)"
            )
        return text

    def _read(self, ident: Ident, path: str) -> NetnsInfo:
        try:
            info = self._prober(path)
        except OSError as error:  # gone between listing and entering, not one, or forbidden
            log.debug("cannot read network namespace %s: %s", path, error)
            self.unreadable[ident] = f"{path}: {error.strerror or error}"
            info = NetnsInfo(frozenset())
        else:
            self.unreadable.pop(ident, None)
        self._known[ident] = info
        return info

    def refresh(self) -> None:
        """List the namespaces again; read the new ones; forget those that are gone."""
        own = ident_of(self.own)
        live = self._lister(self.netns_dirs, self.proc)
        if own is not None:
            live.pop(own, None)
        self.live = live
        for ident in list(self._known):
            if ident not in live:
                del self._known[ident]
                self.unreadable.pop(ident, None)
        for ident, path in live.items():
            if ident not in self._known:
                self._read(ident, path)
        self.refreshed = True

    def prepared(self) -> set[Ident]:
        """Live namespaces found holding the agent's setup when they were first read."""
        return {ident for ident, info in self._known.items() if info.prepared}

    def locate(self, addresses: Iterable[IPAddress]) -> dict[IPAddress, list[Ident]]:
        """The namespaces holding each address (after :meth:`refresh`)."""
        wanted = set(addresses)
        found = self._match(wanted)
        if wanted - set(found):
            for ident, info in list(self._known.items()):
                if not info.addresses:
                    self._read(ident, self.live[ident])
            found = self._match(wanted)
        return found

    def _match(self, wanted: set[IPAddress]) -> dict[IPAddress, list[Ident]]:
        found: dict[IPAddress, list[Ident]] = {}
        for ident, info in sorted(self._known.items()):
            for address in info.addresses & wanted:
                found.setdefault(address, []).append(ident)
        return found

    def mark(self, ident: Ident, prepared: bool) -> None:
        """Record that the agent set up (or cleared) a namespace."""
        info = self._known.get(ident)
        if info is not None:
            self._known[ident] = NetnsInfo(info.addresses, prepared)
