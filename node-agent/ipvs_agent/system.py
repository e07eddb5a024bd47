"""The real host behind the reconciler's ``Host`` interface: dummy interface + nftables table."""

from __future__ import annotations

import logging

from ipvs_agent.host import sysctl
from ipvs_agent.host.addresses import VipInterface
from ipvs_agent.host.nftables import DEFAULT_MARK, NftTable
from ipvs_agent.model import IPAddress, ServiceKey

log = logging.getLogger(__name__)


class LinuxHost:
    """Virtual addresses on the agent's interface; ownership and masquerade in its nft table.

    ``read_only`` (for ``ipvs-agent plan``) reads the ownership record but changes nothing.
    """

    def __init__(
        self,
        interface: str = "ipvs0",
        *,
        netns: str | None = None,
        mark: int = DEFAULT_MARK,
        read_only: bool = False,
    ) -> None:
        self.read_only = read_only
        self.vips = VipInterface(interface, netns=netns)
        self.nft = NftTable(mark=mark, netns=netns)

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


def prepare_node(kernel_release: str, netns: str | None = None) -> sysctl.ApplyResult:
    """Set the sysctls a director relies on (docs/operations.md lists them with reasons)."""
    result = sysctl.apply(sysctl.required(kernel_release), netns=netns)
    for change in result.changed:
        log.info("sysctl %s", change)
    for item in result.missing:
        log.warning("sysctl %s does not exist on this kernel", item.name)
    return result
