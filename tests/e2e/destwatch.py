"""Watch one IPVS service's real servers from inside the node, cheaply (bench_endpoints.py).

A reader of the kernel that depends on nothing of the agent's: one generic-netlink socket,
the IPVS family resolved once, and per poll a single ``IPVS_CMD_GET_DEST`` dump of the one
service asked about — the cost of a poll does not grow with the table (``ipvsadm -Ln`` and
``/proc/net/ip_vs`` read all 2000 services; a process per poll costs more than the poll).

:class:`Watches` runs each watch in a thread, so that the host can arm it, then write the
EndpointSlice, then collect the result: the elapsed time counts from the moment the watch
was armed.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

NETLINK_GENERIC = 16
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
IPVS_CMD_GET_SERVICE = 4
IPVS_CMD_GET_DEST = 8
IPVS_CMD_ATTR_SERVICE = 1
IPVS_CMD_ATTR_DEST = 2
IPVS_SVC_ATTR_AF = 1
IPVS_SVC_ATTR_PROTOCOL = 2
IPVS_SVC_ATTR_ADDR = 3
IPVS_SVC_ATTR_PORT = 4
IPVS_DEST_ATTR_ADDR = 1
IPVS_DEST_ATTR_PORT = 2
IPVS_DEST_ATTR_WEIGHT = 4
IPVS_DEST_ATTR_ADDR_FAMILY = 11

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_GENL = struct.Struct("=BBH")  # genlmsghdr
_NLA = struct.Struct("=HH")
RECV_BUFFER = 65536
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}


def _attr(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _attrs(data: bytes | memoryview, start: int, end: int) -> dict[int, memoryview]:
    found: dict[int, memoryview] = {}
    view = memoryview(data)
    while start + _NLA.size <= end:
        size, kind = _NLA.unpack_from(view, start)
        if size < _NLA.size:
            break
        found[kind & ~NLA_F_NESTED & 0x3FFF] = view[start + _NLA.size : start + size]
        start += (size + 3) & ~3
    return found


class IPVSReader:
    """Generic netlink, IPVS family: the dests of one service, the count of services."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.settimeout(timeout)
        self.sock.bind((0, 0))
        self.seq = 0
        self.lock = threading.Lock()
        name = _attr(CTRL_ATTR_FAMILY_NAME, b"IPVS\0")
        (reply,) = self._request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, name, 0, 1)
        self.family = struct.unpack_from("=H", reply[CTRL_ATTR_FAMILY_ID])[0]

    def _request(
        self, family: int, cmd: int, payload: bytes, flags: int, version: int, hint: bytes = b""
    ) -> list[dict[int, memoryview]]:
        """Send one request; the top-level attributes of every data message of the reply
        (none from a datagram that does not contain ``hint``)."""
        with self.lock:
            self.seq += 1
            seq = self.seq
            body = _GENL.pack(cmd, version, 0) + payload
            self.sock.send(_HDR.pack(_HDR.size + len(body), family, NLM_F_REQUEST | flags, seq, 0)
                           + body)  # fmt: skip
            out: list[dict[int, memoryview]] = []
            while True:
                data = self.sock.recv(RECV_BUFFER)
                offset = 0
                skip = bool(hint) and hint not in data  # the cheap poll: one bytes search
                while offset + _HDR.size <= len(data):
                    length, kind, _, got, _ = _HDR.unpack_from(data, offset)
                    if length < _HDR.size:
                        raise OSError("malformed netlink reply")
                    end = offset + length
                    if got == seq:
                        if kind == NLMSG_ERROR:
                            code = struct.unpack_from("=i", data, offset + _HDR.size)[0]
                            if code:
                                raise OSError(-code, os.strerror(-code))
                            return out  # the ack of a non-dump request
                        if kind == NLMSG_DONE:
                            return out
                        if not skip:
                            out.append(_attrs(data, offset + _HDR.size + _GENL.size, end))
                    offset = (end + 3) & ~3
                if not flags & NLM_F_DUMP and (out or skip):
                    return out

    def dests(
        self, vip: str, port: int, protocol: str = "TCP", *, hint: bytes = b""
    ) -> dict[str, int]:
        """``{"address:port": weight}`` of the service ``protocol vip:port``; absent: {}.

        ``hint``: bytes that any reply holding what the caller looks for contains (an
        address attribute, :func:`address_hint`); a reply without them is not decoded, {}.
        """
        address = ipaddress.ip_address(vip)
        af = socket.AF_INET if address.version == 4 else socket.AF_INET6
        service = b"".join(
            (
                _attr(IPVS_SVC_ATTR_AF, struct.pack("=H", af)),
                _attr(IPVS_SVC_ATTR_PROTOCOL, struct.pack("=H", PROTOCOLS[protocol])),
                _attr(IPVS_SVC_ATTR_ADDR, address.packed.ljust(16, b"\0")),
                _attr(IPVS_SVC_ATTR_PORT, struct.pack("!H", port)),
            )
        )
        payload = _attr(IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED, service)
        try:
            replies = self._request(self.family, IPVS_CMD_GET_DEST, payload, NLM_F_DUMP, 1, hint)
        except OSError as error:
            if error.errno == 3:  # ESRCH: no such service
                return {}
            raise
        found: dict[str, int] = {}
        for reply in replies:
            nested = reply.get(IPVS_CMD_ATTR_DEST)
            if nested is None:
                continue
            dest = _attrs(nested, 0, len(nested))
            family = af
            if IPVS_DEST_ATTR_ADDR_FAMILY in dest:
                family = struct.unpack_from("=H", dest[IPVS_DEST_ATTR_ADDR_FAMILY])[0]
            raw = bytes(dest[IPVS_DEST_ATTR_ADDR])
            ip = ipaddress.ip_address(raw[:4] if family == socket.AF_INET else raw[:16])
            rport = struct.unpack_from("!H", dest[IPVS_DEST_ATTR_PORT])[0]
            weight = struct.unpack_from("=I", dest[IPVS_DEST_ATTR_WEIGHT])[0]
            key = f"{ip}:{rport}" if ip.version == 4 else f"[{ip}]:{rport}"
            found[key] = weight
        return found

    def service_count(self) -> int:
        """How many IPVS services the table holds (one dump, no dests)."""
        return len(self._request(self.family, IPVS_CMD_GET_SERVICE, b"", NLM_F_DUMP, 1))

    def close(self) -> None:
        self.sock.close()


def address_hint(real: str) -> bytes:
    """The netlink attribute ``IPVS_DEST_ATTR_ADDR`` of ``real`` ("address:port") as the
    kernel writes it (the address zero-padded to 16 bytes)."""
    address = ipaddress.ip_address(real.rsplit(":", 1)[0].strip("[]"))
    return _attr(IPVS_DEST_ATTR_ADDR, address.packed.ljust(16, b"\0"))


@dataclass
class Watch:
    """One watch: armed at ``armed`` (monotonic), ``seconds`` after it once seen."""

    vip: str
    port: int
    real: str
    present: bool
    timeout: float
    interval: float
    armed: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    polls: int = 0
    poll_seconds: float = 0.0
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def result(self) -> dict[str, Any]:
        return {
            "seconds": None if self.seconds is None else round(self.seconds, 4),
            "polls": self.polls,
            "mean_poll_ms": round(1000 * self.poll_seconds / max(1, self.polls), 2),
            "error": self.error,
        }


class Watches:
    """Watches by handle; each polls in its own thread on its own socket, bounded by its
    timeout."""

    def __init__(self) -> None:
        self.watches: dict[int, Watch] = {}
        self.next = 0

    def arm(
        self,
        vip: str,
        port: int,
        real: str,
        present: bool = True,
        timeout: float = 60.0,
        interval: float = 0.02,
    ) -> dict[str, Any]:
        """Start watching at once for ``real`` ("address:port") to be (or stop being) a real
        server of TCP ``vip:port``; the handle, and the table as it was when armed."""
        watch = Watch(vip, port, real, present, timeout, interval)
        reader = IPVSReader()
        try:
            before = reader.dests(vip, port)
        except BaseException:
            reader.close()
            raise
        self.next += 1
        self.watches[self.next] = watch
        threading.Thread(
            target=self._poll, args=(watch, reader), name=f"watch-{self.next}", daemon=True
        ).start()
        return {"handle": self.next, "before": before}

    @staticmethod
    def _poll(watch: Watch, reader: IPVSReader) -> None:
        deadline = watch.armed + watch.timeout
        # Looking for a real server to appear, a reply without its address is not decoded.
        hint = address_hint(watch.real) if watch.present else b""
        try:
            while True:
                began = time.monotonic()
                seen = watch.real in reader.dests(watch.vip, watch.port, hint=hint)
                now = time.monotonic()
                watch.polls += 1
                watch.poll_seconds += now - began
                if seen == watch.present:
                    watch.seconds = now - watch.armed
                    return
                if now > deadline:
                    return
                time.sleep(watch.interval)  # poll interval
        except Exception as error:
            watch.error = repr(error)
        finally:
            reader.close()
            watch.done.set()

    def result(self, handle: int, timeout: float = 120.0) -> dict[str, Any]:
        """Wait (bounded) for watch ``handle`` to end; its outcome, seconds None if missed."""
        watch = self.watches[handle]
        watch.done.wait(timeout)
        if watch.done.is_set():
            del self.watches[handle]
        return watch.result()


def table_counts() -> dict[str, int]:
    """Services and dests of the whole table, from one read of /proc/net/ip_vs."""
    services = dests = 0
    with open("/proc/net/ip_vs") as handle:
        for line in handle:
            if line.startswith("  -> "):
                dests += not line.startswith("  -> RemoteAddress")
            elif line[:4] in ("TCP ", "UDP ", "FWM ", "SCTP"):
                services += 1
    return {"services": services, "dests": dests}
