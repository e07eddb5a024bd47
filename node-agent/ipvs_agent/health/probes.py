"""The probes: one blocking, deadline-bounded exchange with a real server each.

A probe says only "success" or "failure, because ..." — when that makes a real server down or
up is the rise/fall machine's business (``machine``), the same for every kind. The request
and answer formats (HTTP, DNS) are built and read by pure functions, tested without sockets;
the socket code around them is proven against real servers in the VM.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from ipvs_agent.health.feedback import MAX_REPLY
from ipvs_api.types import CheckType, DNSCheck, HealthCheck, HTTPCheck, IPAddress

#: Body bytes an HTTP check reads to look for its text.
MAX_BODY = 64 * 1024
USER_AGENT = "ipvs-agent-health"

#: DNS record types by name (RFC 1035, RFC 3596, RFC 2782).
DNS_TYPES = {
    "A": 1,
    "NS": 2,
    "CNAME": 5,
    "SOA": 6,
    "PTR": 12,
    "MX": 15,
    "TXT": 16,
    "AAAA": 28,
    "SRV": 33,
}
_RCODES = {1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    #: Why a probe failed ("connect: connection refused", "HTTP 503"); "" on success.
    detail: str = ""
    seconds: float = 0.0


class _Deadline:
    """Remaining time of one probe, for each blocking step."""

    def __init__(self, timeout: float) -> None:
        self.end = time.monotonic() + timeout

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left


def _family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _connect(address: IPAddress, port: int, deadline: _Deadline) -> socket.socket:
    sock = socket.socket(_family(address), socket.SOCK_STREAM)
    try:
        sock.settimeout(deadline.left())
        sock.connect((str(address), port))
    except BaseException:
        sock.close()
        raise
    return sock


def _why(error: BaseException) -> str:
    if isinstance(error, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(error, ssl.SSLError):
        return f"TLS: {error.reason or error}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return str(error) or type(error).__name__


# ---------------------------------------------------------------- HTTP


def http_host(address: IPAddress, port: int, tls: bool) -> str:
    """The default Host header: the address checked, with the port unless it is the scheme's."""
    host = f"[{address}]" if address.version == 6 else str(address)
    return host if port == (443 if tls else 80) else f"{host}:{port}"


def http_request(http: HTTPCheck, host: str) -> bytes:
    return (
        f"GET {http.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def http_status(head: bytes) -> int | None:
    """The status code of a response's first line (None when it is not HTTP)."""
    line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(line) < 2 or not line[0].startswith(b"HTTP/") or not line[1].isdigit():
        return None
    return int(line[1])


def judge_http(response: bytes, http: HTTPCheck) -> Result:
    """Whether a response (head, and as much body as was read) passes the check."""
    status = http_status(response)
    if status is None:
        return Result(False, "not an HTTP response")
    if not any(first <= status <= last for first, last in http.statuses):
        return Result(False, f"HTTP {status}")
    if http.body_contains is not None:
        body = response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""
        if http.body_contains.encode() not in body:
            return Result(False, f"HTTP {status}, body lacks {http.body_contains!r}")
    return Result(True)


def _probe_http(check: HealthCheck, address: IPAddress, port: int, deadline: _Deadline) -> Result:
    http = check.http or HTTPCheck()
    tls = check.type is CheckType.HTTPS
    host = http.host or http_host(address, port, tls)
    sock = _connect(address, port, deadline)
    try:
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # whether it serves, not who it is
            name = http.sni or (http.host or "").rsplit(":", 1)[0]
            sni = name if name and not _is_address(name) else None
            sock.settimeout(deadline.left())
            sock = context.wrap_socket(sock, server_hostname=sni)
        sock.settimeout(deadline.left())
        sock.sendall(http_request(http, host))
        wanted = http.body_contains.encode() if http.body_contains is not None else b""
        response = b""
        while len(response) < MAX_BODY + 16384:
            sock.settimeout(deadline.left())
            chunk = sock.recv(16384)
            if not chunk:
                break
            response += chunk
            if b"\r\n\r\n" in response and wanted in response:
                break
        return judge_http(response, http)
    finally:
        sock.close()


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- DNS


def dns_query(query_id: int, dns: DNSCheck) -> bytes:
    """A standard query (recursion desired) for one name and type, class IN."""
    name = dns.name.rstrip(".")
    labels = b"".join(bytes([len(part)]) + part.encode("ascii") for part in name.split(".") if part)
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    return header + labels + b"\0" + struct.pack("!HH", DNS_TYPES[dns.type], 1)


def judge_dns(reply: bytes, query_id: int) -> Result | None:
    """Whether a reply passes: NOERROR with at least one answer. None: not our answer."""
    if len(reply) < 12:
        return None
    rid, flags, _, answers = struct.unpack("!HHHH", reply[:8])
    if rid != query_id or not flags & 0x8000:
        return None
    rcode = flags & 0x000F
    if rcode:
        return Result(False, f"DNS {_RCODES.get(rcode, f'rcode {rcode}')}")
    if answers == 0:
        return Result(False, "DNS NOERROR without an answer")
    return Result(True)


def _probe_dns(check: HealthCheck, address: IPAddress, port: int, deadline: _Deadline) -> Result:
    assert check.dns is not None, "validated: type DNS has dns"
    query_id = random.getrandbits(16)
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        sock.connect((str(address), port))
        sock.send(dns_query(query_id, check.dns))
        while True:
            sock.settimeout(deadline.left())
            judged = judge_dns(sock.recv(4096), query_id)
            if judged is not None:
                return judged


# ---------------------------------------------------------------- UDP, TCP


def _probe_udp(check: HealthCheck, address: IPAddress, port: int, deadline: _Deadline) -> Result:
    assert check.udp is not None, "validated: type UDP has udp"
    udp = check.udp
    with socket.socket(_family(address), socket.SOCK_DGRAM) as sock:
        sock.connect((str(address), port))
        sock.send(udp.send.encode())
        try:
            sock.settimeout(deadline.left())
            reply = sock.recv(4096)
        except TimeoutError:
            return Result(True) if not udp.require_reply else Result(False, "no reply")
    if udp.expect is not None and udp.expect not in reply.decode("utf-8", "replace"):
        return Result(False, f"reply lacks {udp.expect!r}")
    return Result(True)


def _probe_tcp(check: HealthCheck, address: IPAddress, port: int, deadline: _Deadline) -> Result:
    _connect(address, port, deadline).close()
    return Result(True)


_PROBES: dict[CheckType, Callable[[HealthCheck, IPAddress, int, _Deadline], Result]] = {
    CheckType.TCP: _probe_tcp,
    CheckType.HTTP: _probe_http,
    CheckType.HTTPS: _probe_http,
    CheckType.UDP: _probe_udp,
    CheckType.DNS: _probe_dns,
}


def probe(check: HealthCheck, address: IPAddress, port: int) -> Result:
    """Run one probe of ``check`` against ``address``:``port``, bounded by its timeout."""
    started = time.monotonic()
    try:
        result = _PROBES[check.type](check, address, port, _Deadline(check.timeout))
    except (OSError, ValueError, UnicodeError) as error:
        result = Result(False, _why(error))
    seconds = time.monotonic() - started
    return Result(result.ok, result.detail, seconds)


def ask_agent(address: IPAddress, port: int, send: str, timeout: float) -> tuple[bytes, str]:
    """One agent-check exchange: (the answer's first line, ""), or (b"", why it failed)."""
    deadline = _Deadline(timeout)
    try:
        sock = _connect(address, port, deadline)
        with sock:
            if send:
                sock.sendall(send.encode())
            data = b""
            while b"\n" not in data and len(data) < MAX_REPLY:
                sock.settimeout(deadline.left())
                chunk = sock.recv(MAX_REPLY)
                if not chunk:
                    break
                data += chunk
    except (OSError, ValueError) as error:
        return b"", _why(error)
    line, newline, _ = data.partition(b"\n")
    return line + newline, ""
