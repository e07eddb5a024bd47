"""The probes against real sockets on loopback (no IPVS involved), and their pure parts."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ipvs_agent.health import probes
from ipvs_api.types import CheckType, DNSCheck, HealthCheck, HTTPCheck, UDPCheck

LOCAL = ipaddress.ip_address("127.0.0.1")


def check(kind: CheckType, timeout: float = 1.0, **parts: object) -> HealthCheck:
    return HealthCheck(kind, interval=2.0, timeout=timeout, **parts)  # type: ignore[arg-type]


@contextlib.contextmanager
def tcp_server(
    handle: Callable[[socket.socket], None], wrap: ssl.SSLContext | None = None
) -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError, ssl.SSLError):
                    handle(wrap.wrap_socket(conn, server_side=True) if wrap else conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def http_answer(
    status: int, body: bytes = b"ok", seen: list[bytes] | None = None
) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        if seen is not None:
            seen.append(request)
        conn.sendall(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    return handle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_connect_or_refused() -> None:
    with tcp_server(lambda conn: None) as port:
        assert probes.probe(check(CheckType.TCP), LOCAL, port).ok
    result = probes.probe(check(CheckType.TCP), LOCAL, free_port())
    assert (result.ok, result.detail) == (False, "connection refused")


def test_http_status_ranges_host_header_and_body_text() -> None:
    seen: list[bytes] = []
    http = HTTPCheck(path="/healthz", host="shop.example.com", statuses=((200, 299), (401, 401)))
    with tcp_server(http_answer(401, seen=seen)) as port:
        assert probes.probe(check(CheckType.HTTP, http=http), LOCAL, port).ok
    assert seen[0].startswith(b"GET /healthz HTTP/1.1\r\nHost: shop.example.com\r\n")
    with tcp_server(http_answer(503)) as port:
        assert probes.probe(check(CheckType.HTTP, http=http), LOCAL, port).detail == "HTTP 503"
    body = HTTPCheck(body_contains="ready")
    with tcp_server(http_answer(200, b"starting")) as port:
        result = probes.probe(check(CheckType.HTTP, http=body), LOCAL, port)
        assert result.detail == "HTTP 200, body lacks 'ready'"
    with tcp_server(http_answer(200, b"all ready")) as port:
        assert probes.probe(check(CheckType.HTTP, http=body), LOCAL, port).ok


def test_a_silent_server_times_out_within_the_timeout() -> None:
    def silent(conn: socket.socket) -> None:
        conn.recv(4096)
        time.sleep(1)

    with tcp_server(silent) as port:
        result = probes.probe(check(CheckType.HTTP, timeout=0.3, http=HTTPCheck()), LOCAL, port)
    assert (result.ok, result.detail) == (False, "timed out")
    assert 0.25 < result.seconds < 1.5


def _tls_context(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rs.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "c.pem", directory / "k.pem")
    return context


def test_https_sends_the_server_name_and_does_not_verify_the_certificate() -> None:
    names: list[str | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        context = _tls_context(Path(tmp))
        context.sni_callback = lambda sock, name, ctx: names.append(name)
        https = HTTPCheck(sni="www.example.com")
        with tcp_server(http_answer(200), wrap=context) as port:
            assert probes.probe(check(CheckType.HTTPS, http=https), LOCAL, port).ok
        with tcp_server(http_answer(200)) as port:  # plain HTTP on the port: a TLS error
            assert not probes.probe(check(CheckType.HTTPS, http=https), LOCAL, port).ok
    assert names == ["www.example.com"]


@contextlib.contextmanager
def udp_server(answer: Callable[[bytes], bytes | None]) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            reply = answer(data)
            if reply is not None:
                sock.sendto(reply, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_udp_reply_text_silence_and_refusal() -> None:
    expect = check(CheckType.UDP, timeout=0.3, udp=UDPCheck("ping", expect="pong"))
    with udp_server(lambda data: b"pong" if data == b"ping" else None) as port:
        assert probes.probe(expect, LOCAL, port).ok
    with udp_server(lambda data: b"nope") as port:
        assert probes.probe(expect, LOCAL, port).detail == "reply lacks 'pong'"
    with udp_server(lambda data: None) as port:
        assert probes.probe(expect, LOCAL, port).detail == "no reply"
        quiet = check(CheckType.UDP, timeout=0.3, udp=UDPCheck("x", require_reply=False))
        assert probes.probe(quiet, LOCAL, port).ok  # silence is fine without require_reply
    refused = probes.probe(quiet, LOCAL, free_port())
    assert (refused.ok, refused.detail) == (False, "connection refused")


def dns_answer(rcode: int, answers: int) -> Callable[[bytes], bytes]:
    def answer(query: bytes) -> bytes:
        qid = struct.unpack("!H", query[:2])[0]
        return struct.pack("!HHHHHH", qid, 0x8180 | rcode, 1, answers, 0, 0) + query[12:]

    return answer


def test_dns_query_format_and_answers() -> None:
    query = probes.dns_query(0x1234, DNSCheck("www.example.org.", "AAAA"))
    assert query == (
        bytes.fromhex("123401000001000000000000")
        + b"\x03www\x07example\x03org\x00"
        + bytes.fromhex("001c0001")
    )
    assert probes.dns_query(1, DNSCheck(".", "SOA"))[12:] == b"\x00\x00\x06\x00\x01"
    dns = check(CheckType.DNS, timeout=0.5, dns=DNSCheck("www.example.org"))
    with udp_server(dns_answer(0, 1)) as port:
        assert probes.probe(dns, LOCAL, port).ok
    with udp_server(dns_answer(3, 0)) as port:
        assert probes.probe(dns, LOCAL, port).detail == "DNS NXDOMAIN"
    with udp_server(dns_answer(0, 0)) as port:
        assert probes.probe(dns, LOCAL, port).detail == "DNS NOERROR without an answer"
    assert probes.judge_dns(b"\x00\x01" + b"\x81\x80" + b"\x00" * 8, 2) is None  # not ours


def test_http_host_defaults() -> None:
    v6 = ipaddress.ip_address("2001:db8::1")
    assert probes.http_host(LOCAL, 80, tls=False) == "127.0.0.1"
    assert probes.http_host(LOCAL, 8443, tls=True) == "127.0.0.1:8443"
    assert probes.http_host(v6, 443, tls=True) == "[2001:db8::1]"
    assert probes.http_status(b"garbage") is None
    assert probes.judge_http(b"SSH-2.0-OpenSSH\r\n", HTTPCheck()).detail == "not an HTTP response"


def test_the_feedback_agent_exchange() -> None:
    got: list[bytes] = []

    def agent(conn: socket.socket) -> None:
        got.append(conn.recv(100))
        conn.sendall(b"75% drain\nignored\n")

    with tcp_server(agent) as port:
        assert probes.ask_agent(LOCAL, port, "web\n", 1.0) == (b"75% drain\n", "")
    assert got == [b"web\n"]
    assert probes.ask_agent(LOCAL, free_port(), "", 1.0) == (b"", "connection refused")


@pytest.mark.parametrize("kind", list(CheckType))
def test_every_kind_has_a_probe(kind: CheckType) -> None:
    assert kind in probes._PROBES
