"""The sysctls a director relies on, as data with the reason for each, and a writer for them.

:func:`needed` is pure: the programmed services pick what applies (forwarding only for NAT,
conntrack only for masquerade, ...) and the kernel release too (``conn_reuse_mode`` only matters
on the kernels with the 1-second SYN delay). :func:`apply` writes ``/proc/sys`` and reports each
change with the value it replaced, so the agent can record it, report it and undo it. IPVS
connection timeouts (tcp, tcpfin, udp) are not sysctls: the netlink layer sets them
(IPVS_CMD_SET_CONFIG).

``net.*`` sysctls are per network namespace; ``apply(netns=...)`` writes those of another one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ipvs_agent.host._netns import entered

PROC_SYS = "/proc/sys"


@dataclass(frozen=True)
class Sysctl:
    """One setting: its path under /proc/sys, the value to write and why.

    ``accept`` lists other current values that are good enough and left alone (rp_filter 0
    and 2 both serve where only strict mode 1 breaks things).
    """

    path: str
    value: str
    reason: str
    accept: frozenset[str] = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        """The ``sysctl(8)`` name: dots between components, and ``/`` for a dot within one."""
        return ".".join(part.replace(".", "/") for part in self.path.split("/"))

    def satisfied_by(self, current: str) -> bool:
        return current == self.value or current in self.accept

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


def sysctl(name: str, value: int | str, reason: str, accept: Iterable[str] = ()) -> Sysctl:
    """A :class:`Sysctl` from its dotted name (no component of which contains a dot)."""
    return Sysctl(name.replace(".", "/"), str(value), reason, frozenset(accept))


def interface_sysctl(
    family: str, interface: str, key: str, value: int | str, reason: str, accept: Iterable[str] = ()
) -> Sysctl:
    """``net.<family>.conf.<interface>.<key>``; the interface name may contain dots."""
    return Sysctl(f"net/{family}/conf/{interface}/{key}", str(value), reason, frozenset(accept))


def kernel_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a ``uname -r`` string such as ``6.1.0-56-amd64``; None if unreadable."""
    match = re.match(r"\s*(\d+)\.(\d+)", release)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


IP_FORWARD = sysctl(
    "net.ipv4.ip_forward",
    1,
    "IPv4 NAT: replies from real servers are forwarded back to clients through the director. "
    "DR and TUN need no forwarding (IPVS sends their packets out itself).",
)
IPV6_FORWARDING = sysctl(
    "net.ipv6.conf.all.forwarding",
    1,
    "IPv6 NAT: the same for IPv6 (the kernel forwards IPv6 only with 'all' on). Interfaces that "
    "accept router advertisements get accept_ra=2 first, so they keep their SLAAC routes.",
)
VS_CONNTRACK = sysctl(
    "net.ipv4.vs.conntrack",
    1,
    "NAT with traffic policy Cluster: keep conntrack entries for IPVS connections, so the "
    "agent's nftables masquerade sees traffic to real servers on other nodes (IPv4 and IPv6).",
)
VS_EXPIRE_NODEST_CONN = sysctl(
    "net.ipv4.vs.expire_nodest_conn",
    1,
    "When a real server is deleted, drop its connection entries at their next packet, so "
    "clients see a reset and reconnect instead of waiting on a server that is gone.",
)
VS_EXPIRE_QUIESCENT_TEMPLATE = sysctl(
    "net.ipv4.vs.expire_quiescent_template",
    1,
    "Persistence: a real server set to weight 0 (draining) loses its persistence templates, so "
    "sticky clients move to other real servers instead of following it until the timeout.",
)
VS_CONN_REUSE_MODE = sysctl(
    "net.ipv4.vs.conn_reuse_mode",
    0,
    "On kernels 4.1 to 5.8 mode 1 with conntrack=1 delays a SYN that reuses a source port of "
    "an expiring connection by one second (kubernetes#70747, fixed in Linux 5.9).",
)
ARP_ANNOUNCE = sysctl(
    "net.ipv4.conf.all.arp_announce",
    2,
    "IPv4 NAT: replies leave the director with a VIP as source; never use it as the sender "
    "address of ARP requests, so neighbours do not learn a VIP at this node's MAC by accident.",
)


def conn_reuse_mode_needed(kernel_release: str) -> bool:
    """True on the kernels with the 1-second delay: 4.1 (the sysctl's birth) to 5.8."""
    version = kernel_version(kernel_release)
    return version is not None and (4, 1) <= version < (5, 9)


@dataclass(frozen=True)
class Needs:
    """What the programmed services ask of the node (see :func:`needed`)."""

    services: bool = False
    nat4: bool = False
    nat6: bool = False
    masquerade: bool = False
    persistence: bool = False


def needed(needs: Needs, kernel_release: str) -> list[Sysctl]:
    """The node-wide sysctls the programmed services need on a kernel of ``kernel_release``.

    Nothing is set for what is not programmed: a DR-only node keeps its forwarding settings, an
    IPv4-only node its IPv6 ones. ARP for VIPs is filtered per address by the agent's nftables
    ``arp`` table instead of the node-wide ``arp_ignore``.
    """
    wanted: list[Sysctl] = []
    if needs.nat4:
        wanted.append(IP_FORWARD)
    if needs.nat6:
        wanted.append(IPV6_FORWARDING)
    if needs.masquerade:
        wanted.append(VS_CONNTRACK)
        if conn_reuse_mode_needed(kernel_release):
            wanted.append(VS_CONN_REUSE_MODE)
    if needs.services:
        wanted.append(VS_EXPIRE_NODEST_CONN)
    if needs.persistence:
        wanted.append(VS_EXPIRE_QUIESCENT_TEMPLATE)
    if needs.nat4:
        wanted.append(ARP_ANNOUNCE)
    return wanted


def keep_router_advertisements(interfaces: Mapping[str, tuple[str, str]]) -> list[Sysctl]:
    """``accept_ra=2`` for each interface that accepts router advertisements only while it
    does not forward (``accept_ra`` 1, the default), given (accept_ra, forwarding) per name.

    Turning IPv6 forwarding on would otherwise make the kernel ignore their RAs, and a SLAAC
    node would lose its IPv6 default route. Loopback and interfaces that already ignore RAs
    (0) or already accept them while forwarding (2) are left alone, and so are the agent's own
    devices (``ipvs0``, ``ipvs-rs0``, its tunnels), which never take router advertisements.
    """
    return [
        interface_sysctl(
            "ipv6",
            name,
            "accept_ra",
            2,
            "keeps accepting router advertisements once IPv6 forwarding is on (SLAAC routes)",
        )
        for name, (accept_ra, _forwarding) in sorted(interfaces.items())
        if name not in ("all", "default", "lo") and not name.startswith("ipvs") and accept_ra == "1"
    ]


@dataclass(frozen=True)
class Change:
    """A sysctl that :func:`apply` rewrote, and the value it had."""

    sysctl: Sysctl
    old: str

    def __str__(self) -> str:
        return f"{self.sysctl.name}: {self.old} -> {self.sysctl.value}"


@dataclass(frozen=True)
class ApplyResult:
    """What :func:`apply` did: the changes, and the settings this kernel does not have.

    A missing ``net.ipv4.vs.*`` entry means the ip_vs module is not loaded yet; a missing
    interface entry, that the interface does not exist.
    """

    changed: tuple[Change, ...] = ()
    missing: tuple[Sysctl, ...] = ()


def _normal(text: str) -> str:
    return " ".join(text.split())


def read(item: Sysctl, *, root: str = PROC_SYS) -> str | None:
    """The current value (whitespace normalised), or None if the kernel lacks the entry."""
    try:
        return _normal((Path(root) / item.path).read_text())
    except FileNotFoundError:
        return None


def apply(
    sysctls: Iterable[Sysctl], *, netns: str | None = None, root: str = PROC_SYS
) -> ApplyResult:
    """Write every setting whose current value is not acceptable; report what changed.

    ``root`` is for tests. Writing a value that the kernel refuses raises ``OSError``.
    """
    changed: list[Change] = []
    missing: list[Sysctl] = []
    with entered(netns):
        for item in sysctls:
            current = read(item, root=root)
            if current is None:
                missing.append(item)
                continue
            if item.satisfied_by(current):
                continue
            (Path(root) / item.path).write_text(item.value + "\n")
            changed.append(Change(item, current))
    return ApplyResult(tuple(changed), tuple(missing))
