"""Kernel operations: the output of the diff and the input of the netlink layer.

Each operation maps to one IPVS generic-netlink command. ``str()`` renders it like the
equivalent ``ipvsadm`` command line, which is what ``ipvs-agent plan`` prints and what an
operator of LVS already reads fluently.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ipvs_agent.model import (
    Dest,
    ForwardingMethod,
    Service,
    ServiceFlag,
    TunnelFlags,
    TunnelType,
)


class OpKind(StrEnum):
    ADD_SERVICE = "add-service"  # IPVS_CMD_NEW_SERVICE
    EDIT_SERVICE = "edit-service"  # IPVS_CMD_SET_SERVICE
    DEL_SERVICE = "del-service"  # IPVS_CMD_DEL_SERVICE (its destinations go with it)
    ADD_DEST = "add-dest"  # IPVS_CMD_NEW_DEST
    EDIT_DEST = "edit-dest"  # IPVS_CMD_SET_DEST
    DEL_DEST = "del-dest"  # IPVS_CMD_DEL_DEST


@dataclass(frozen=True)
class Op:
    kind: OpKind
    service: Service
    dest: Dest | None = None

    def __str__(self) -> str:
        return ipvsadm_line(self)


_SERVICE_FLAG = {
    OpKind.ADD_SERVICE: "-A",
    OpKind.EDIT_SERVICE: "-E",
    OpKind.DEL_SERVICE: "-D",
    OpKind.ADD_DEST: "-a",
    OpKind.EDIT_DEST: "-e",
    OpKind.DEL_DEST: "-d",
}
_METHOD = {
    ForwardingMethod.MASQ: "-m",
    ForwardingMethod.ROUTE: "-g",
    ForwardingMethod.TUNNEL: "-i",
    ForwardingMethod.LOCALNODE: "-g",
}


def _service_arg(svc: Service) -> str:
    key = svc.key
    if key.fwmark:
        six = " -6" if key.af == 10 else ""
        return f"-f {key.fwmark}{six}"
    proto = {6: "-t", 17: "-u", 132: "--sctp-service"}[key.protocol]
    host = f"[{key.address}]" if key.af == 10 else key.address
    return f"{proto} {host}:{key.port}"


def _scheduler_flags(svc: Service) -> list[str]:
    names = {
        ServiceFlag.SCHED1: "flag-1",
        ServiceFlag.SCHED2: "flag-2",
        ServiceFlag.SCHED3: "flag-3",
    }
    if svc.scheduler in ("sh", "mh"):
        names = {
            ServiceFlag.SCHED1: f"{svc.scheduler}-fallback",
            ServiceFlag.SCHED2: f"{svc.scheduler}-port",
        }
    return [name for bit, name in names.items() if svc.flags & bit]


def ipvsadm_line(op: Op) -> str:
    """The ipvsadm command that would do the same as ``op``."""
    parts = [_SERVICE_FLAG[op.kind], _service_arg(op.service)]
    svc = op.service
    if op.kind in (OpKind.ADD_SERVICE, OpKind.EDIT_SERVICE):
        parts += ["-s", svc.scheduler]
        flags = _scheduler_flags(svc)
        if flags:
            parts += ["-b", ",".join(flags)]
        if svc.flags & ServiceFlag.PERSISTENT:
            parts += ["-p", str(svc.timeout)]
            if svc.key.af == 2 and svc.netmask != 0xFFFFFFFF:
                parts += ["-M", _dotted(svc.netmask)]
            elif svc.key.af == 10 and svc.netmask != 128:
                parts += ["-M", str(svc.netmask)]
        if svc.flags & ServiceFlag.ONEPACKET:
            parts.append("-o")
        if svc.pe_name:
            parts += ["--pe", svc.pe_name]
    if op.dest is not None:
        d = op.dest
        host = f"[{d.key.address}]" if ":" in d.key.address else d.key.address
        parts += ["-r", f"{host}:{d.key.port}"]
        if op.kind in (OpKind.ADD_DEST, OpKind.EDIT_DEST):
            parts.append(_METHOD[d.forwarding])
            if d.forwarding is ForwardingMethod.TUNNEL:
                parts += ["--tun-type", d.tunnel_type.name.lower()]
                if d.tunnel_type is TunnelType.GUE:
                    parts += ["--tun-port", str(d.tunnel_port)]
                if d.tunnel_flags is not TunnelFlags.NOCSUM:
                    parts.append(f"--tun-{d.tunnel_flags.name.lower()}")
            parts += ["-w", str(d.weight)]
            if d.upper_threshold:
                parts += ["-x", str(d.upper_threshold)]
            if d.lower_threshold:
                parts += ["-y", str(d.lower_threshold)]
    return "ipvsadm " + " ".join(parts)


def _dotted(mask: int) -> str:
    return ".".join(str((mask >> shift) & 0xFF) for shift in (24, 16, 8, 0))
