"""The kernel IPVS table as plain values: what the planner wants and what the kernel has.

These types speak the kernel's language (address families, protocol numbers, flag bits, the
forwarding-method codes of ``include/uapi/linux/ip_vs.h``) so that the diff between desired and
observed tables is a comparison of values, and the netlink layer only encodes them.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=1 << 16)
def parse_address(text: str) -> IPAddress:
    """``ipaddress.ip_address`` for virtual addresses, remembered: every pass parses the same
    few thousand VIPs of the table's keys again (the bound is far above a node's table).

    Raises ValueError like ``ip_address``."""
    return ipaddress.ip_address(text)


def address_text(address: IPAddress) -> str:
    """``str(address)``; IPv4 in C (``inet_ntoa``): a plan from nothing writes every real
    server's address, and ``ipaddress`` formats it octet by octet in Python."""
    if isinstance(address, ipaddress.IPv4Address):
        return socket.inet_ntoa(int(address).to_bytes(4, "big"))
    return str(address)


class AddressFamily(IntEnum):
    INET = 2
    INET6 = 10

    @classmethod
    def of(cls, addr: IPAddress) -> AddressFamily:
        return cls.INET if addr.version == 4 else cls.INET6


class Protocol(IntEnum):
    TCP = 6
    UDP = 17
    SCTP = 132


class ForwardingMethod(IntEnum):
    """IPVS_DEST_ATTR_FWD_METHOD values (IP_VS_CONN_F_* masks)."""

    MASQ = 0
    LOCALNODE = 1
    TUNNEL = 2
    ROUTE = 3


class TunnelType(IntEnum):
    IPIP = 0
    GUE = 1
    GRE = 2


class TunnelFlags(IntEnum):
    NOCSUM = 0
    CSUM = 1
    REMCSUM = 2


class ServiceFlag(IntEnum):
    """IP_VS_SVC_F_* bits; SCHED1/2 are sh-/mh-fallback and sh-/mh-port."""

    PERSISTENT = 0x0001
    HASHED = 0x0002  # set by the kernel, never by us
    ONEPACKET = 0x0004
    SCHED1 = 0x0008
    SCHED2 = 0x0010
    SCHED3 = 0x0020


#: The flag bits we manage; HASHED is the kernel's own and is masked out of comparisons.
MANAGED_FLAGS = (
    ServiceFlag.PERSISTENT
    | ServiceFlag.ONEPACKET
    | ServiceFlag.SCHED1
    | ServiceFlag.SCHED2
    | ServiceFlag.SCHED3
)


@dataclass(frozen=True, order=True, slots=True)
class ServiceKey:
    """What identifies a virtual service in the kernel: (af, protocol, address, port) or fwmark.

    For a firewall-mark service ``protocol`` and ``port`` are 0 and ``address`` is the
    family's unspecified address, as the kernel reports it.
    """

    af: AddressFamily
    protocol: int
    address: str
    port: int
    fwmark: int = 0
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Kept: a pass hashes each key a dozen times (tables, sets, the ownership record),
        # and the generated __hash__ builds and hashes a tuple of the five fields each time.
        object.__setattr__(
            self, "_hash", hash((self.af, self.protocol, self.address, self.port, self.fwmark))
        )

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def for_address(cls, addr: IPAddress, protocol: Protocol, port: int) -> ServiceKey:
        return cls(AddressFamily.of(addr), int(protocol), str(addr), port)

    @classmethod
    def for_fwmark(cls, af: AddressFamily, fwmark: int) -> ServiceKey:
        unspecified = "0.0.0.0" if af is AddressFamily.INET else "::"
        return cls(af, 0, unspecified, 0, fwmark)

    def __str__(self) -> str:
        if self.fwmark:
            return f"FWM {self.fwmark} {'IPv6' if self.af is AddressFamily.INET6 else 'IPv4'}"
        proto = {6: "TCP", 17: "UDP", 132: "SCTP"}.get(self.protocol, str(self.protocol))
        host = f"[{self.address}]" if self.af is AddressFamily.INET6 else self.address
        return f"{proto} {host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Service:
    """The settable attributes of one virtual service."""

    key: ServiceKey
    scheduler: str = "wlc"
    flags: int = 0
    timeout: int = 0
    #: IPv4: the netmask as a 32-bit integer (0xffffffff = /32); IPv6: the prefix length.
    netmask: int = 0xFFFFFFFF
    pe_name: str = ""


@dataclass(frozen=True, order=True, slots=True)
class DestKey:
    """A real server within a service: address and port (0 = the packet's port)."""

    address: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Dest:
    """The settable attributes of one real server (destination)."""

    key: DestKey
    forwarding: ForwardingMethod = ForwardingMethod.MASQ
    weight: int = 1
    upper_threshold: int = 0
    lower_threshold: int = 0
    tunnel_type: TunnelType = TunnelType.IPIP
    tunnel_port: int = 0
    tunnel_flags: TunnelFlags = TunnelFlags.NOCSUM
    #: Address family of the real server when it differs from the service's (TUN only).
    af: AddressFamily | None = None


@dataclass(frozen=True, slots=True)
class DestStats:
    """Read-only counters the kernel reports with each destination."""

    active_connections: int = 0
    inactive_connections: int = 0
    persistent_connections: int = 0
    connections: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True, slots=True)
class ServiceStats:
    connections: int = 0
    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True, slots=True)
class ObservedDest:
    dest: Dest
    stats: DestStats = field(default_factory=DestStats)


@dataclass(frozen=True, slots=True)
class ObservedService:
    service: Service
    dests: Mapping[DestKey, ObservedDest]
    stats: ServiceStats = field(default_factory=ServiceStats)


@dataclass(frozen=True, slots=True)
class DesiredService:
    service: Service
    dests: Mapping[DestKey, Dest]


#: A whole table, as desired or as observed.
DesiredTable = Mapping[ServiceKey, DesiredService]
ObservedTable = Mapping[ServiceKey, ObservedService]


@dataclass(frozen=True, slots=True)
class KernelInfo:
    """What GET_INFO and module probing say about this kernel."""

    version: str
    connection_table_size: int
    release: str = ""
    schedulers: tuple[str, ...] = ()
    tunnel_types: tuple[str, ...] = ()
    #: Schedulers of :data:`ipvs_agent.kernel.PRELOAD_SCHEDULERS` this kernel has but has not
    #: loaded: a virtual service may not use one until it is loaded (first use can deadlock).
    unloaded: tuple[str, ...] = ()


class SyncState(IntEnum):
    """IP_VS_STATE_*: the role of a connection sync daemon (a director runs both at once)."""

    MASTER = 1
    BACKUP = 2


#: What the kernel uses when a sync daemon is started without these settings.
SYNC_DEFAULT_GROUP = "224.0.0.81"
SYNC_DEFAULT_PORT = 8848
SYNC_DEFAULT_TTL = 1


@dataclass(frozen=True, slots=True)
class SyncDaemon:
    """One IPVS connection sync daemon (IPVS_CMD_NEW_DAEMON / GET_DAEMON).

    A master multicasts the connections its director creates; a backup receives the other
    directors' and enters them into its own table. ``max_len`` 0 lets the kernel size
    messages from the interface's MTU; ``group`` "" and ``port``/``ttl`` 0 are the kernel's
    defaults (224.0.0.81, 8848, 1). A backup listens on ``port`` + its thread index.
    """

    state: SyncState
    interface: str
    sync_id: int = 0
    max_len: int = 0
    group: str = ""
    port: int = 0
    ttl: int = 0

    def matches(self, running: SyncDaemon) -> bool:
        """Whether ``running`` (as the kernel reports it, defaults filled in) is this one."""
        return (
            self.state == running.state
            and self.interface == running.interface
            and self.sync_id == running.sync_id
            and (self.max_len in (0, running.max_len))
            and (self.group or SYNC_DEFAULT_GROUP) == (running.group or SYNC_DEFAULT_GROUP)
            and (self.port or SYNC_DEFAULT_PORT) == (running.port or SYNC_DEFAULT_PORT)
            and (self.ttl or SYNC_DEFAULT_TTL) == (running.ttl or SYNC_DEFAULT_TTL)
        )


@dataclass(frozen=True, slots=True)
class Timeouts:
    """IPVS connection timeouts in seconds (IPVS_CMD_SET_CONFIG); 0 leaves one unchanged."""

    tcp: int = 0
    tcp_fin: int = 0
    udp: int = 0
