"""The real host behind the reconciler's ``Host`` interface.

The director side: virtual addresses on the dummy interface, the nftables tables (ownership,
masquerade, the VIP guard) with their second record in the state file, and the node-wide
sysctls the programmed services need. The real-server side (``RealServerSide``): the kernel's
route to DR real servers, and the setup of the node's own network namespace and of pods'
namespaces for the DR and TUN services they serve.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace

from pyroute2.netlink.exceptions import NetlinkError

from ipvs_agent.audit import HostReading
from ipvs_agent.desired import NODE_NETNS, RealServerNetns, Route, merge_specs
from ipvs_agent.host import routes, sysctl
from ipvs_agent.host._netns import HostError, entered, netns_path
from ipvs_agent.host.addresses import VipInterface
from ipvs_agent.host.nftables import DEFAULT_MARK, LiveTable, NftTable, Ruleset, render
from ipvs_agent.host.nftables import rendered_digest as digest_of
from ipvs_agent.host.podnetns import Ident, PodNamespaces
from ipvs_agent.host.realserver import (
    OWNER,
    RealServerChanges,
    RealServerHost,
    RealServerSpec,
)
from ipvs_agent.host.state import Repair, State, StateFile
from ipvs_agent.model import IPAddress, ServiceKey

log = logging.getLogger(__name__)

_HOST_ERRORS = (HostError, OSError, NetlinkError)


class LinuxHost:
    """Virtual addresses on the agent's interface; ownership, masquerade and the VIP guard in
    its nftables tables and state file; node sysctls; real-server setup in the node's namespace
    and in pods' namespaces.

    ``read_only`` (for ``ipvs-agent plan``) reads the ownership record and routes but changes
    nothing. ``pods`` says where pods' namespaces are found (default: ``/run/netns`` and
    ``/proc/*/ns/net``); ``sysctl_root`` where sysctls are written (see ``RealServerHost``);
    ``state_dir`` where the state file lives (None: in memory only).
    """

    def __init__(
        self,
        interface: str = "ipvs0",
        *,
        netns: str | None = None,
        mark: int = DEFAULT_MARK,
        read_only: bool = False,
        pods: PodNamespaces | None = None,
        sysctl_root: str = sysctl.PROC_SYS,
        state_dir: str | None = None,
    ) -> None:
        self.read_only = read_only
        self.netns = netns
        self.sysctl_root = sysctl_root
        self.vips = VipInterface(interface, netns=netns)
        self.nft = NftTable(mark=mark, netns=netns)
        self.state = StateFile(state_dir, netns=netns)
        self.node_rs = RealServerHost(netns=netns, sysctl_root=sysctl_root)
        self.pods = pods or PodNamespaces(
            own=netns_path(netns) if netns is not None else "/proc/self/ns/net"
        )
        #: The ruleset this agent last wrote, and the tables as the current pass saw them.
        self._last: Ruleset | None = None
        self._live: LiveTable | None = None
        self._live_fresh = False
        self._held: set[IPAddress] = set()
        self._pending: list[Repair] = []
        self._sysctl_problems: set[str] = set()

    def close(self) -> None:
        self.vips.close()
        self.node_rs.close()

    def reader(self) -> HostTablesReader:
        """A reader of the agent's tables and VIPs with resources of its own, for the
        auditor's thread (``ipvs_agent.audit``)."""
        return HostTablesReader(self.vips.name, self.nft.mark, self.netns)

    # ---------------------------------------------------------------- ownership and guard

    def recorded(self) -> Ruleset:
        """The union of every record of ownership: the nftables table, the state file and what
        this process wrote; a flushed firewall alone does not make the agent forget."""
        self._live = self.nft.live()
        self._live_fresh = True
        state = self.state.load()
        owned = set(state.owned)
        masquerade = set(state.masquerade)
        if self._live is not None:
            owned |= self._live.owned
            masquerade |= self._live.masquerade
        if self._last is not None:
            owned |= self._last.owned
            masquerade |= self._last.masquerade
        return Ruleset.of(owned, masquerade)

    def owned(self) -> set[ServiceKey]:
        return set(self.recorded().owned)

    def _drift(self, live: LiveTable | None, state: State) -> str | None:
        if self._last is not None:
            if self.nft.matches(self._last, live):
                return None
        elif state.digest is None or (live is not None and live.digest == state.digest):
            return None
        if live is None:
            return "the nftables table inet ipvs-operator was gone (a flushed ruleset?)"
        return "the nftables tables ipvs-operator had been changed by someone else"

    def record(self, ruleset: Ruleset) -> list[Repair]:
        """Write the state file, then both nftables tables (only if they differ); returns the
        drift found, which this write repaired."""
        live = self._live if self._live_fresh else self.nft.live()
        self._live_fresh = False
        state = self.state.load()
        repairs, self._pending = self._pending, []
        drift = self._drift(live, state)
        if drift is not None:
            repairs.append(Repair("nftables", drift))
        if self.read_only:
            return repairs
        text = render(ruleset, self.nft.mark)
        digest = digest_of(text)
        # Beside the kernel first: a flush after this point still leaves the record. When the
        # file just read says it already, writing it again would change nothing.
        wanted = replace(state, owned=ruleset.owned, masquerade=ruleset.masquerade, digest=digest)
        if wanted != state:
            self.state.save(wanted)
        if not self.nft.matches(ruleset, live):
            self.nft.apply(text)
            live = self.nft.written(ruleset, text)
        self._last = ruleset
        self._live, self._live_fresh = live, True  # the pass's next record() reads no table
        for repair in repairs:
            log.warning("repaired drift: %s", repair.detail)
        return repairs

    def sync_addresses(self, wanted: set[IPAddress]) -> None:
        if self.read_only:
            return
        self.vips.ensure()
        changes = self.vips.sync(wanted)
        if changes.changed:
            log.info("virtual addresses: %s", changes)
        lost = changes.added & self._held
        if lost:
            shown = ", ".join(sorted(map(str, lost)))
            where = self.vips.name
            self._pending.append(
                Repair("addresses", f"virtual addresses {shown} had been removed from {where}")
            )
        self._held = set(wanted)

    # ---------------------------------------------------------------- node sysctls

    def _ipv6_interfaces(self) -> dict[str, tuple[str, str]]:
        """(accept_ra, forwarding) of every interface, as the namespace's sysctls say."""
        found: dict[str, tuple[str, str]] = {}
        with entered(self.netns):
            base = os.path.join(self.sysctl_root, "net/ipv6/conf")
            try:
                names = os.listdir(base)
            except OSError:
                return found
            for name in names:
                try:
                    with (
                        open(os.path.join(base, name, "accept_ra")) as a,
                        open(os.path.join(base, name, "forwarding")) as f,
                    ):
                        found[name] = (a.read().strip(), f.read().strip())
                except OSError:
                    continue
        return found

    def tune(self, wanted: Sequence[sysctl.Sysctl]) -> None:
        """Set the node-wide sysctls the programmed services need, noting what each replaced.

        Before IPv6 forwarding is turned on, interfaces that accept router advertisements only
        while not forwarding are told to keep accepting them (``accept_ra=2``).
        """
        if self.read_only or not wanted:
            return
        items = list(wanted)
        if sysctl.IPV6_FORWARDING in items:
            with entered(self.netns):
                current = sysctl.read(sysctl.IPV6_FORWARDING, root=self.sysctl_root)
            if current != "1":
                items = sysctl.keep_router_advertisements(self._ipv6_interfaces()) + items
        changed: list[sysctl.Change] = []
        for item in items:  # one at a time: a refused write must not keep the others from going
            try:
                result = sysctl.apply([item], netns=self.netns, root=self.sysctl_root)
            except OSError as error:
                problem = f"cannot set {item}: {error.strerror or error}"
                if problem not in self._sysctl_problems:
                    log.warning("%s (under %s)", problem, self.sysctl_root)
                self._sysctl_problems.add(problem)
                continue
            changed += result.changed
            for missing in result.missing:
                log.warning("sysctl %s does not exist on this kernel", missing.name)
        self._note(changed)

    def _note(self, changes: Sequence[sysctl.Change]) -> None:
        if not changes or self.read_only:
            return
        for change in changes:
            log.info("sysctl %s", change)
        state = self.state.load()
        self.state.save(state.with_sysctls((c.sysctl.path, c.sysctl.value, c.old) for c in changes))

    # ---------------------------------------------------------------- uninstall

    def remove_addresses(self) -> list[str]:
        """Delete the agent's dummy device, and with it every VIP."""
        vips = sorted(map(str, self.vips.addresses()))
        if not self.vips.delete():
            return []
        return [f"deleted {self.vips.name} with {', '.join(vips) or 'no addresses'}"]

    def remove_tables(self) -> list[str]:
        return ["deleted the nftables tables ipvs-operator"] if self.nft.delete() else []

    def clear_real_servers(self) -> list[str]:
        """Undo the real-server setup in the node's namespace and in every pod's it marked."""
        done: list[str] = []
        changes = self.node_rs.clear()
        if changes.changed:
            done.append(f"real-server setup in the node's namespace removed: {changes}")
        self.pods.refresh()
        for ident in sorted(self.pods.prepared()):
            path = self.pods.live[ident]
            with RealServerHost(netns=path, sysctl_root=self.sysctl_root) as host:
                cleared = host.clear()
            self.pods.mark(ident, False)
            done.append(f"real-server setup in {path} removed: {cleared}")
        return done

    def restore_sysctls(self) -> tuple[list[str], list[str]]:
        """Put back each sysctl the agent changed, unless someone changed it again since.

        Returns (restored, left alone), one line each.
        """
        restored: list[str] = []
        left: list[str] = []
        for path, note in sorted(self.state.load().sysctls.items()):
            item = sysctl.Sysctl(path, note.previous, "restored by ipvs-agent cleanup")
            with entered(self.netns):
                current = sysctl.read(item, root=self.sysctl_root)
            if current is None:
                continue
            if current != note.value:
                left.append(f"sysctl {item.name} left at {current}: changed since the agent set it")
                continue
            sysctl.apply([item], netns=self.netns, root=self.sysctl_root)
            restored.append(f"sysctl {item.name} restored: {note.value} -> {note.previous}")
        return restored, left

    def node_changes(self) -> Mapping[str, tuple[str, str]]:
        """Every node-wide sysctl the agent changed: sysctl name -> (value, previous)."""
        return {
            sysctl.Sysctl(path, note.value, "").name: (note.value, note.previous)
            for path, note in sorted(self.state.load().sysctls.items())
        }

    def local_addresses(self) -> set[IPAddress]:
        """The namespace's own addresses, but not VIPs on the agent's devices or link-local ones
        (for ``ipvs-agent apply`` without a Node manifest: which static real servers are here)."""
        rtnl = self.vips.rtnl
        ours = {
            int(link["index"])
            for link in rtnl.link("dump")
            if link.get_attr("IFLA_IFNAME") in (self.vips.name, self.node_rs.interface)
            or str(link.get_attr("IFLA_IFALIAS") or "").startswith(OWNER)
        }
        return {
            r.address
            for r in self.vips.reader.dump()
            if r.ifindex not in ours and not (r.address.is_link_local or r.address.is_loopback)
        }

    def interfaces(self) -> dict[str, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
        """The interfaces that are up, with their addresses (for layer-2 announcement)."""
        from ipvs_agent.announce.responder import read_nics

        return read_nics(self.vips.rtnl, self.vips.reader)

    # ---------------------------------------------------------------- real servers

    def routes(self, addresses: set[IPAddress]) -> Mapping[IPAddress, Route]:
        return routes.lookup(self.vips.rtnl, addresses)

    def sync_real_servers(
        self, wanted: Mapping[RealServerNetns, RealServerSpec]
    ) -> Mapping[RealServerNetns, str]:
        """Set up the node's namespace and the pods' that serve DR/TUN; undo it elsewhere."""
        if self.read_only:
            return {}
        errors: dict[RealServerNetns, str] = {}
        try:
            changes = self.node_rs.sync(wanted.get(NODE_NETNS, RealServerSpec()))
            _log_changes("node", changes)
            self._note(changes.sysctls)
        except _HOST_ERRORS as error:
            errors[NODE_NETNS] = str(error)
        pods = {t: spec for t, spec in wanted.items() if t.pod_ip is not None}
        if pods or self.pods.prepared() or not self.pods.refreshed:
            try:
                self.pods.refresh()
            except OSError as error:
                for target in pods:
                    errors[target] = f"cannot list network namespaces: {error}"
                return errors
        errors.update(self._sync_pods(pods))
        return errors

    def _sync_pods(
        self, pods: Mapping[RealServerNetns, RealServerSpec]
    ) -> dict[RealServerNetns, str]:
        errors: dict[RealServerNetns, str] = {}
        located = self.pods.locate(t.pod_ip for t in pods if t.pod_ip is not None)
        setups: dict[Ident, tuple[RealServerSpec, list[RealServerNetns]]] = {}
        for target in sorted(pods, key=str):
            assert target.pod_ip is not None
            found = located.get(target.pod_ip, [])
            if not found:
                errors[target] = (
                    f"no network namespace on this node holds {target.pod_ip} (looked in "
                    f"{self.pods.where()})"
                )
            elif len(found) > 1:
                paths = ", ".join(self.pods.live[i] for i in found)
                errors[target] = f"{target.pod_ip} is held by several network namespaces: {paths}"
            else:
                spec, targets = setups.get(found[0], (RealServerSpec(), []))
                setups[found[0]] = (merge_specs(spec, pods[target]), [*targets, target])
        for ident, (spec, targets) in setups.items():
            path = self.pods.live[ident]
            try:
                with RealServerHost(netns=path, sysctl_root=self.sysctl_root) as host:
                    self.pods.mark(ident, True)  # marked first: a failure half-way is undone too
                    _log_changes(", ".join(map(str, targets)), host.sync(spec))
            except _HOST_ERRORS as error:
                for target in targets:
                    errors[target] = f"{path}: {error}"
        for ident in sorted(self.pods.prepared() - set(setups)):
            path = self.pods.live[ident]
            try:
                with RealServerHost(netns=path, sysctl_root=self.sysctl_root) as host:
                    _log_changes(path, host.clear())
                self.pods.mark(ident, False)
            except _HOST_ERRORS as error:  # retried next pass; a vanished pod needs nothing
                log.warning("cannot undo the real-server setup in %s: %s", path, error)
        return errors


def _log_changes(where: str, changes: RealServerChanges) -> None:
    if changes.changed:
        log.info("real server setup in %s: %s", where, changes)
    for item in changes.missing_sysctls:
        log.warning("sysctl %s does not exist in %s", item.name, where)


class HostTablesReader:
    """Reads what a full pass would check of the host — the agent's nftables tables and the
    addresses on its interface — with its own ``nft`` runs and netlink sockets."""

    def __init__(self, interface: str, mark: int, netns: str | None) -> None:
        self.nft = NftTable(mark=mark, netns=netns)
        self.vips = VipInterface(interface, netns=netns)

    def read(self) -> HostReading:
        return HostReading(self.nft.live(), frozenset(self.vips.addresses()))

    def matches(self, ruleset: Ruleset, live: LiveTable | None) -> bool:
        return self.nft.matches(ruleset, live)

    def close(self) -> None:
        self.vips.close()
