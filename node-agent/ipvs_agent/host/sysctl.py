"""The sysctls a director relies on, as data with the reason for each, and a writer for them.

:func:`required` is pure: the kernel release picks what applies (``conn_reuse_mode`` only
matters on the kernels with the 1-second SYN delay). :func:`apply` writes ``/proc/sys`` and
reports each change, so the agent can log what it did to the node. IPVS connection timeouts
(tcp, tcpfin, udp) are not sysctls: the netlink layer sets them (IPVS_CMD_SET_CONFIG).

``net.*`` sysctls are per network namespace; ``apply(netns=...)`` writes those of another one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
    "NAT replies from real servers are forwarded back to clients through the director, and "
    "IPVS sends DR/TUN packets out again after LOCAL_IN: the director is a router.",
)
IPV6_FORWARDING = sysctl(
    "net.ipv6.conf.all.forwarding",
    1,
    "The same for IPv6 virtual services. Interfaces that learn their address from router "
    "advertisements need accept_ra=2 once forwarding is on.",
)
VS_CONNTRACK = sysctl(
    "net.ipv4.vs.conntrack",
    1,
    "Keep conntrack entries for IPVS connections, so the agent's nftables masquerade (and any "
    "NAT or stateful firewall) sees NAT traffic to real servers on other nodes. Applies to IPv4 "
    "and IPv6 services.",
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
    "A real server set to weight 0 (draining) loses its persistence templates, so sticky "
    "clients move to other real servers instead of following it until the timeout.",
)
VS_CONN_REUSE_MODE = sysctl(
    "net.ipv4.vs.conn_reuse_mode",
    0,
    "On kernels 4.1 to 5.8 mode 1 with conntrack=1 delays a SYN that reuses a source port of "
    "an expiring connection by one second (kubernetes#70747, fixed in Linux 5.9).",
)
ARP_IGNORE = sysctl(
    "net.ipv4.conf.all.arp_ignore",
    1,
    "Every director holds the VIPs on its dummy device; answer ARP only for addresses of the "
    "interface asked, so directors do not all claim every VIP on the LAN (strict ARP).",
)
ARP_ANNOUNCE = sysctl(
    "net.ipv4.conf.all.arp_announce",
    2,
    "Never use a VIP as the sender address of ARP requests, so neighbours do not learn a VIP "
    "at this node's MAC address by accident.",
)


def conn_reuse_mode_needed(kernel_release: str) -> bool:
    """True on the kernels with the 1-second delay: 4.1 (the sysctl's birth) to 5.8."""
    version = kernel_version(kernel_release)
    return version is not None and (4, 1) <= version < (5, 9)


def required(kernel_release: str, *, ipv6: bool = True, strict_arp: bool = True) -> list[Sysctl]:
    """The sysctls a director needs on a kernel of ``kernel_release`` (``uname -r``).

    ``ipv6``: the node serves IPv6 VIPs; ``strict_arp``: the VIPs are announced by something
    else (BGP, an L2 speaker) and the kernel must not answer ARP for them.
    """
    wanted = [IP_FORWARD]
    if ipv6:
        wanted.append(IPV6_FORWARDING)
    wanted += [VS_CONNTRACK, VS_EXPIRE_NODEST_CONN, VS_EXPIRE_QUIESCENT_TEMPLATE]
    if conn_reuse_mode_needed(kernel_release):
        wanted.append(VS_CONN_REUSE_MODE)
    if strict_arp:
        wanted += [ARP_IGNORE, ARP_ANNOUNCE]
    return wanted


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
