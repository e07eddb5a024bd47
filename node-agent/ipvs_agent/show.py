"""``ipvs-agent status``: the live table in ``ipvsadm -Ln`` layout, with Kubernetes names."""

from __future__ import annotations

from collections.abc import Mapping

from ipvs_agent.model import (
    AddressFamily,
    ForwardingMethod,
    KernelInfo,
    ObservedTable,
    ServiceFlag,
    ServiceKey,
)

_FORWARD = {
    ForwardingMethod.MASQ: "Masq",
    ForwardingMethod.LOCALNODE: "Local",
    ForwardingMethod.TUNNEL: "Tunnel",
    ForwardingMethod.ROUTE: "Route",
}


def _service_line(key: ServiceKey) -> str:
    if key.fwmark:
        return f"FWM  {key.fwmark}{' IPv6' if key.af is AddressFamily.INET6 else ''}"
    proto = {6: "TCP", 17: "UDP", 132: "SCTP"}.get(key.protocol, str(key.protocol))
    host = f"[{key.address}]" if key.af is AddressFamily.INET6 else key.address
    return f"{proto:<4} {host}:{key.port}"


def render_table(
    table: ObservedTable, owners: Mapping[ServiceKey, str], info: KernelInfo | None = None
) -> str:
    """The table as text; services are named after their VirtualServer, or marked foreign."""
    lines = []
    if info is not None:
        lines.append(
            f"IP Virtual Server version {info.version} (size={info.connection_table_size})"
        )
    lines.append("Prot LocalAddress:Port Scheduler Flags                 VirtualServer")
    lines.append("  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn")
    for key in sorted(table):
        svc = table[key].service
        flags = []
        if svc.flags & ServiceFlag.PERSISTENT:
            flags.append(f"persistent {svc.timeout}")
        if svc.flags & ServiceFlag.ONEPACKET:
            flags.append("ops")
        if svc.pe_name:
            flags.append(f"pe {svc.pe_name}")
        head = f"{_service_line(key)} {svc.scheduler}{' ' + ' '.join(flags) if flags else ''}"
        owner = owners.get(key, "(not managed by ipvs-operator)")
        lines.append(f"{head:<54} {owner}")
        for dkey in sorted(table[key].dests):
            od = table[key].dests[dkey]
            d, s = od.dest, od.stats
            lines.append(
                f"  -> {dkey!s:<28} {_FORWARD[d.forwarding]:<7} {d.weight:<6} "
                f"{s.active_connections:<10} {s.inactive_connections}"
            )
    return "\n".join(lines) + "\n"
