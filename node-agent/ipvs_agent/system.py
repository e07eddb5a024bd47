"""The real host behind the reconciler's ``Host`` interface.

The director side: virtual addresses on the dummy interface and the nftables table. The real-
server side (``RealServerSide``): the kernel's route to DR real servers, and the setup of the
node's own network namespace and of pods' namespaces for the DR and TUN services they serve.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping

from pyroute2.netlink.exceptions import NetlinkError

from ipvs_agent.desired import NODE_NETNS, RealServerNetns, Route, merge_specs
from ipvs_agent.host import routes, sysctl
from ipvs_agent.host._netns import HostError, netns_path
from ipvs_agent.host.addresses import VipInterface
from ipvs_agent.host.nftables import DEFAULT_MARK, NftTable
from ipvs_agent.host.podnetns import Ident, PodNamespaces
from ipvs_agent.host.realserver import (
    OWNER,
    RealServerChanges,
    RealServerHost,
    RealServerSpec,
)
from ipvs_agent.model import IPAddress, ServiceKey

log = logging.getLogger(__name__)

_HOST_ERRORS = (HostError, OSError, NetlinkError)


class LinuxHost:
    """Virtual addresses on the agent's interface; ownership and masquerade in its nft table;
    real-server setup in the node's namespace and in pods' namespaces.

    ``read_only`` (for ``ipvs-agent plan``) reads the ownership record and routes but changes
    nothing. ``pods`` says where pods' namespaces are found (default: ``/run/netns`` and
    ``/proc/*/ns/net``); ``sysctl_root`` where the real-server sysctls are written (see
    ``RealServerHost``).
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
    ) -> None:
        self.read_only = read_only
        self.netns = netns
        self.sysctl_root = sysctl_root
        self.vips = VipInterface(interface, netns=netns)
        self.nft = NftTable(mark=mark, netns=netns)
        self.node_rs = RealServerHost(netns=netns, sysctl_root=sysctl_root)
        self.pods = pods or PodNamespaces(
            own=netns_path(netns) if netns is not None else "/proc/self/ns/net"
        )

    def close(self) -> None:
        self.vips.close()
        self.node_rs.close()

    def owned(self) -> set[ServiceKey]:
        return self.nft.read_owned()

    def record(self, owned: set[ServiceKey], masquerade: set[ServiceKey]) -> None:
        if not self.read_only:
            self.nft.sync(owned, masquerade)

    def sync_addresses(self, wanted: set[IPAddress]) -> None:
        if self.read_only:
            return
        self.vips.ensure()
        changes = self.vips.sync(wanted)
        if changes.changed:
            log.info("virtual addresses: %s", changes)

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
        found: set[IPAddress] = set()
        for msg in rtnl.addr("dump"):
            raw = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if raw is None or msg["index"] in ours:
                continue
            address = ipaddress.ip_address(raw)
            if not (address.is_link_local or address.is_loopback):
                found.add(address)
        return found

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
            _log_changes("node", self.node_rs.sync(wanted.get(NODE_NETNS, RealServerSpec())))
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


def prepare_node(
    kernel_release: str, netns: str | None = None, root: str = sysctl.PROC_SYS
) -> sysctl.ApplyResult:
    """Set the sysctls a director relies on (docs/operations.md lists them with reasons)."""
    result = sysctl.apply(sysctl.required(kernel_release), netns=netns, root=root)
    for change in result.changed:
        log.info("sysctl %s", change)
    for item in result.missing:
        log.warning("sysctl %s does not exist on this kernel", item.name)
    return result
