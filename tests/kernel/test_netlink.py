"""IPVSKernel against Debian's kernel: what we ask for is exactly what the kernel holds.

Every check has two witnesses: ``ipvsadm`` (its save format, plus ``-Ln --thresholds`` because
``-S`` leaves thresholds out) parsed independently of our codec, and our own dump(). Each test
gets a fresh network namespace (IPVS tables are per netns) from the ``lab`` fixture.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from ipvs_agent.kernel import KernelError, OpResult
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.kernel.ipvs import IPVSKernel
from ipvs_agent.model import (
    AddressFamily,
    Dest,
    DestKey,
    ForwardingMethod,
    ObservedTable,
    Protocol,
    Service,
    ServiceFlag,
    ServiceKey,
    Timeouts,
    TunnelFlags,
    TunnelType,
    parse_address,
)
from ipvs_agent.ops import Op, OpKind
from tests.kernel.topology import Lab, Netns

V4, V6 = AddressFamily.INET, AddressFamily.INET6
MASQ, ROUTE, TUNNEL = ForwardingMethod.MASQ, ForwardingMethod.ROUTE, ForwardingMethod.TUNNEL
PERSISTENT, ONEPACKET = ServiceFlag.PERSISTENT, ServiceFlag.ONEPACKET
SCHED1, SCHED2 = ServiceFlag.SCHED1, ServiceFlag.SCHED2
#: Where the dummy interface of each namespace sits, so real-server addresses route.
LAN4, LAN6 = "198.51.100.254/24", "2001:db8:5e::fe/64"


# --- the independent witness: ipvsadm ---------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A table as ipvsadm shows it: services in its order, each with its dests in order."""

    services: dict[ServiceKey, Service]
    dests: dict[ServiceKey, dict[DestKey, Dest]]


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _family(address: str) -> AddressFamily:
    return V6 if ":" in address else V4


def _service_key(words: list[str]) -> tuple[ServiceKey, list[str]]:
    """The service named at the start of ``words`` (after -A/-a), and the words left."""
    option, value, rest = words[0], words[1], words[2:]
    if option == "-f":
        six = bool(rest) and rest[0] == "-6"
        return ServiceKey.for_fwmark(V6 if six else V4, int(value)), rest[1:] if six else rest
    protocol = {"-t": Protocol.TCP, "-u": Protocol.UDP, "--sctp-service": Protocol.SCTP}[option]
    host, port = _endpoint(value)
    return ServiceKey(_family(host), int(protocol), host, port), rest


_SCHED_FLAGS = {"fallback": SCHED1, "port": SCHED2, "flag-1": SCHED1, "flag-2": SCHED2,
                "flag-3": ServiceFlag.SCHED3}  # fmt: skip
_METHODS = {"-m": MASQ, "-g": ROUTE, "-i": TUNNEL}
_TUN_FLAGS = {"--tun-nocsum": TunnelFlags.NOCSUM, "--tun-csum": TunnelFlags.CSUM,
              "--tun-remcsum": TunnelFlags.REMCSUM}  # fmt: skip


def _parse_service(key: ServiceKey, words: list[str]) -> Service:
    options = dict(zip(words[::2], words[1::2], strict=False))
    flags, timeout = 0, 0
    netmask = 128 if key.af is V6 else 0xFFFFFFFF
    words_set = set(words)
    if "-p" in words_set:
        flags |= PERSISTENT
        timeout = int(words[words.index("-p") + 1])
    if "-o" in words_set:
        flags |= ONEPACKET
    if "-b" in words_set:
        for name in words[words.index("-b") + 1].split(","):
            flags |= _SCHED_FLAGS[name.rsplit("-", 1)[-1] if name[:2] in ("sh", "mh") else name]
    if "-M" in words_set:
        mask = words[words.index("-M") + 1]
        netmask = int(mask) if key.af is V6 else int.from_bytes(socket.inet_aton(mask), "big")
    return Service(key, options.get("-s", "wlc"), flags, timeout, netmask,
                   words[words.index("--pe") + 1] if "--pe" in words_set else "")  # fmt: skip


def _parse_dest(key: ServiceKey, words: list[str]) -> Dest:
    host, port = _endpoint(words[words.index("-r") + 1])
    method = next(_METHODS[w] for w in words if w in _METHODS)
    tun_type, tun_port, tun_flags = TunnelType.IPIP, 0, TunnelFlags.NOCSUM
    if "--tun-type" in words:
        tun_type = TunnelType[words[words.index("--tun-type") + 1].upper()]
    if "--tun-port" in words:
        tun_port = int(words[words.index("--tun-port") + 1])
    for word in words:
        tun_flags = _TUN_FLAGS.get(word, tun_flags)
    family = _family(host)
    return Dest(
        DestKey(host, port), method, int(words[words.index("-w") + 1]),
        tunnel_type=tun_type, tunnel_port=tun_port, tunnel_flags=tun_flags,
        af=None if family == key.af else family,
    )  # fmt: skip


def _thresholds(ns: Netns) -> dict[tuple[ServiceKey, DestKey], tuple[int, int]]:
    """(upper, lower) per dest from ``ipvsadm -Ln --thresholds`` (-S leaves them out)."""
    out = ns.run("ipvsadm", "-Ln", "--thresholds").stdout
    found: dict[tuple[ServiceKey, DestKey], tuple[int, int]] = {}
    current: ServiceKey | None = None
    names = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP}
    for line in out.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "FWM":
            current = ServiceKey.for_fwmark(V6 if words[2] == "IPv6" else V4, int(words[1]))
        elif words[0] in names:
            host, port = _endpoint(words[1])
            current = ServiceKey(_family(host), int(names[words[0]]), host, port)
        elif words[0] == "->" and current is not None and words[2].isdigit():
            host, port = _endpoint(words[1])
            found[current, DestKey(host, port)] = (int(words[2]), int(words[3]))
    return found


def ipvsadm_table(ns: Netns) -> Table:
    """What ``ipvsadm -S -n`` (and --thresholds) say the namespace's table is."""
    services: dict[ServiceKey, Service] = {}
    dests: dict[ServiceKey, dict[DestKey, Dest]] = {}
    for line in ns.run("ipvsadm", "-S", "-n").stdout.splitlines():
        words = line.split()
        if not words:
            continue
        key, rest = _service_key(words[1:])
        if words[0] == "-A":
            services[key] = _parse_service(key, rest)
            dests[key] = {}
        elif words[0] == "-a":
            dest = _parse_dest(key, rest)
            dests[key][dest.key] = dest
    for (key, dest_key), (upper, lower) in _thresholds(ns).items():
        old = dests[key][dest_key]
        dests[key][dest_key] = replace(old, upper_threshold=upper, lower_threshold=lower)
    return Table(services, dests)


def dumped(table: ObservedTable) -> Table:
    """Our dump in the same shape (dests in kernel order)."""
    return Table(
        {key: observed.service for key, observed in table.items()},
        {key: {k: d.dest for k, d in o.dests.items()} for key, o in table.items()},
    )


def as_ipvsadm_shows(dest: Dest) -> Dest:
    """ipvsadm prints tunnel settings only for TUN dests, and no checksum flags for IPIP
    (the kernel keeps them all regardless, and our dump shows them)."""
    if dest.forwarding is not TUNNEL:
        return replace(dest, tunnel_type=TunnelType.IPIP, tunnel_port=0,
                       tunnel_flags=TunnelFlags.NOCSUM)  # fmt: skip
    if dest.tunnel_type is TunnelType.IPIP:
        return replace(dest, tunnel_flags=TunnelFlags.NOCSUM)
    return dest


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def ns(lab: Lab) -> Netns:
    """A fresh namespace whose dummy LAN makes the real-server addresses below routable."""
    (created,) = lab.netns("ipvs")
    created.ip("link add lan type dummy", "link set lan up", f"addr add {LAN4} dev lan",
               f"addr add {LAN6} dev lan nodad")  # fmt: skip
    return created


@pytest.fixture
def kernel(ns: Netns) -> Iterator[IPVSKernel]:
    with IPVSKernel(netns=ns.name) as opened:
        yield opened


def svc(af: AddressFamily, proto: Protocol, host: str, port: int, **settings: object) -> Service:
    netmask = 128 if af is V6 else 0xFFFFFFFF
    settings.setdefault("netmask", netmask)
    return Service(ServiceKey(af, int(proto), host, port), **settings)  # type: ignore[arg-type]


def fwm(af: AddressFamily, mark: int, **settings: object) -> Service:
    settings.setdefault("netmask", 128 if af is V6 else 0xFFFFFFFF)
    return Service(ServiceKey.for_fwmark(af, mark), **settings)  # type: ignore[arg-type]


def rs(host: str, port: int, **settings: object) -> Dest:
    return Dest(DestKey(host, port), **settings)  # type: ignore[arg-type]


def ok(results: Sequence[OpResult]) -> None:
    failed = [f"{r.op}: {r.message}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)


def program(kernel: IPVSKernel, wanted: dict[Service, list[Dest]]) -> None:
    ops: list[Op] = []
    for service, dests in wanted.items():
        ops.append(Op(OpKind.ADD_SERVICE, service))
        ops += [Op(OpKind.ADD_DEST, service, dest) for dest in dests]
    ok(kernel.apply(ops))


def expect_exactly(ns: Netns, kernel: IPVSKernel, wanted: dict[Service, list[Dest]]) -> None:
    """Both witnesses hold exactly ``wanted``: same services, same dests, and in our dump
    (the kernel's list order) the newest dest first."""
    want = Table(
        {s.key: s for s in wanted},
        {s.key: {d.key: d for d in reversed(dests)} for s, dests in wanted.items()},
    )
    ours = dumped(kernel.dump())
    assert ours.services == want.services
    for key, dests in want.dests.items():
        assert list(ours.dests[key].items()) == list(dests.items()), key
    seen = ipvsadm_table(ns)  # ipvsadm sorts what it lists, so only sets compare
    assert seen.services == want.services
    for key, dests in want.dests.items():
        assert seen.dests[key] == {k: as_ipvsadm_shows(d) for k, d in dests.items()}, key


# --- programming ------------------------------------------------------------------------------


def every_kind(schedulers: Sequence[str]) -> dict[Service, list[Dest]]:
    """One service per scheduler the kernel has, plus every family, protocol, setting and
    forwarding method that matters."""
    wanted: dict[Service, list[Dest]] = {}
    for index, name in enumerate(schedulers):
        flags = SCHED1 | SCHED2 if name in ("sh", "mh") else 0
        service = svc(V4, Protocol.TCP, "203.0.113.10", 1000 + index, scheduler=name, flags=flags)
        wanted[service] = [rs("198.51.100.11", 80, weight=index + 1),
                           rs("198.51.100.12", 80, forwarding=ROUTE, weight=0)]  # fmt: skip
    gue = {"tunnel_type": TunnelType.GUE, "tunnel_port": 6080}
    wanted |= {
        svc(V4, Protocol.TCP, "203.0.113.20", 80, scheduler="wrr", flags=PERSISTENT,
            timeout=600, netmask=0xFFFFFF00): [
            rs("198.51.100.11", 8080, weight=3, upper_threshold=100, lower_threshold=50),
            rs("198.51.100.12", 80, forwarding=ROUTE, weight=2, upper_threshold=7),
            rs("198.51.100.13", 80, forwarding=TUNNEL),
            rs("198.51.100.14", 80, forwarding=TUNNEL, tunnel_type=TunnelType.IPIP,
               tunnel_flags=TunnelFlags.CSUM),
            rs("198.51.100.15", 80, forwarding=TUNNEL, **gue),
            rs("198.51.100.16", 80, forwarding=TUNNEL, tunnel_flags=TunnelFlags.CSUM, **gue),
            rs("198.51.100.17", 80, forwarding=TUNNEL, tunnel_flags=TunnelFlags.REMCSUM, **gue),
            rs("198.51.100.18", 80, forwarding=TUNNEL, tunnel_type=TunnelType.GRE),
            rs("198.51.100.19", 80, forwarding=TUNNEL, tunnel_type=TunnelType.GRE,
               tunnel_flags=TunnelFlags.CSUM),
            rs("2001:db8:5e::20", 80, forwarding=TUNNEL, af=V6),
        ],
        svc(V4, Protocol.UDP, "203.0.113.20", 53, scheduler="rr", flags=ONEPACKET): [
            rs("198.51.100.11", 5353),
        ],
        svc(V4, Protocol.SCTP, "203.0.113.20", 3868, scheduler="lc"): [
            rs("198.51.100.11", 3868, weight=5),
        ],
        svc(V6, Protocol.TCP, "2001:db8:f::10", 443, scheduler="sh", flags=PERSISTENT | SCHED1,
            timeout=30, netmask=64): [
            rs("2001:db8:5e::11", 443, weight=10),
            rs("2001:db8:5e::12", 443, forwarding=ROUTE),
            rs("2001:db8:5e::13", 443, forwarding=TUNNEL, tunnel_type=TunnelType.GRE),
            rs("198.51.100.21", 443, forwarding=TUNNEL, af=V4, **gue),
        ],
        svc(V6, Protocol.UDP, "2001:db8:f::10", 5060, scheduler="mh",
            flags=PERSISTENT | ONEPACKET | SCHED2, timeout=120, netmask=48, pe_name="sip"): [
            rs("2001:db8:5e::11", 5060, forwarding=ROUTE, weight=5),
        ],
        svc(V6, Protocol.SCTP, "2001:db8:f::10", 3868, scheduler="rr"): [
            rs("2001:db8:5e::11", 3868),
        ],
        fwm(V4, 7, scheduler="wlc", flags=PERSISTENT, timeout=60, netmask=0xFFFF0000): [
            rs("198.51.100.11", 0, forwarding=ROUTE),
            rs("198.51.100.12", 0, forwarding=TUNNEL, **gue),
        ],
        fwm(V6, 8, scheduler="lc", flags=PERSISTENT, timeout=300, netmask=96): [
            rs("2001:db8:5e::11", 0, forwarding=ROUTE),
        ],
    }  # fmt: skip
    return wanted


def test_every_kind_of_service_and_real_server_lands_exactly(ns: Netns, kernel: IPVSKernel) -> None:
    schedulers = kernel.info().schedulers
    assert {"rr", "wrr", "lc", "wlc", "sh", "mh"} <= set(schedulers)
    wanted = every_kind(schedulers)
    program(kernel, wanted)
    expect_exactly(ns, kernel, wanted)


def test_reading_some_services_gives_exactly_what_the_dump_has_for_them(
    ns: Netns, kernel: IPVSKernel
) -> None:
    """What a change pass reads (``read``): each named service as the whole dump has it, and
    one the kernel lacks left out, whatever kind the key is (address or mark, v4 or v6)."""
    wanted = every_kind(kernel.info().schedulers)
    program(kernel, wanted)
    table = kernel.dump()
    keys = list(table)
    some = {
        next(k for k in keys if k.fwmark),
        next(k for k in keys if not k.fwmark and k.af is V6),
        next(k for k in keys if not k.fwmark and k.af is V4),
    }
    missing = ServiceKey.for_address(parse_address("198.51.100.250"), Protocol.TCP, 1)
    assert kernel.read(some | {missing}) == {k: table[k] for k in some}
    assert kernel.read(set(keys)) == table
    assert kernel.read(set()) == {}
    assert kernel.dump() == table, "a read does not upset the next dump"


# --- edits happen in place --------------------------------------------------------------------

VIP, RIP1, RIP2 = "198.51.100.200", "198.51.100.11", "198.51.100.12"


def send_datagram(ns: Netns, host: str, port: int) -> int:
    """One UDP datagram from inside ``ns``; returns the client port it left from."""
    with ns.entered(), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("198.51.100.254", 0))
        sock.sendto(b"ping", (host, port))
        return int(sock.getsockname()[1])


def counted(kernel: IPVSKernel, key: ServiceKey, within: float = 20.0) -> None:
    """Wait for the counters of ``key`` to show the datagram: the kernel folds its per-CPU
    counters into what it reports every 2 s (the rate estimator's timer)."""
    deadline = time.monotonic() + within
    while kernel.dump()[key].stats.connections != 1:
        assert time.monotonic() < deadline, "the datagram never showed in the counters"
        time.sleep(0.2)  # polling interval, bounded by the deadline


def connection_entries(ns: Netns) -> list[str]:
    lines = ns.run("ipvsadm", "-Lnc").stdout.splitlines()
    return [line for line in lines if line.startswith("UDP ")]


def test_edits_change_each_setting_in_place(ns: Netns, kernel: IPVSKernel) -> None:
    """A connection goes through, then every setting changes one by one: the service's and
    the dest's counters and the connection entry survive, and the edited dest keeps its
    place in the list (delete + add would put it first)."""
    service = svc(V4, Protocol.UDP, VIP, 53, scheduler="rr")
    first, second = rs(RIP1, 53), rs(RIP2, 53, weight=0)  # weight 0: the datagram goes to RIP1
    program(kernel, {service: [first, second]})
    client_port = send_datagram(ns, VIP, 53)
    entry = [line for line in connection_entries(ns) if f":{client_port} " in line]
    assert len(entry) == 1, connection_entries(ns)
    counted(kernel, service.key)

    service_edits = [
        replace(service, scheduler="wrr"),
        replace(service, scheduler="sh", flags=SCHED1 | SCHED2),
        replace(service, scheduler="sh", flags=PERSISTENT, timeout=900),
        replace(service, scheduler="sh", flags=PERSISTENT, timeout=900, netmask=0xFFFFFF00),
        replace(
            service,
            scheduler="sh",
            flags=PERSISTENT | ONEPACKET,
            timeout=60,
            netmask=0xFFFFFF00,
            pe_name="sip",
        ),
        replace(service, scheduler="rr", pe_name=""),
    ]
    dest_edits = [
        replace(first, weight=9),
        replace(first, weight=9, upper_threshold=100, lower_threshold=10),
        replace(first, forwarding=ROUTE),
        replace(first, forwarding=TUNNEL),
        replace(
            first,
            forwarding=TUNNEL,
            tunnel_type=TunnelType.GUE,
            tunnel_port=6080,
            tunnel_flags=TunnelFlags.REMCSUM,
        ),
        replace(
            first, forwarding=TUNNEL, tunnel_type=TunnelType.GRE, tunnel_flags=TunnelFlags.CSUM
        ),
        replace(first, forwarding=MASQ),
    ]
    current = service
    for edited in service_edits:
        ok(kernel.apply([Op(OpKind.EDIT_SERVICE, edited)]))
        observed = kernel.dump()[service.key]
        assert observed.service == edited
        assert observed.stats.connections == 1 and observed.stats.packets_in == 1, edited
        current = edited
    for edited_dest in dest_edits:
        ok(kernel.apply([Op(OpKind.EDIT_DEST, current, edited_dest)]))
        observed = kernel.dump()[service.key]
        assert list(observed.dests) == [second.key, first.key], edited_dest
        assert observed.dests[first.key].dest == edited_dest
        assert observed.dests[first.key].stats.connections == 1, edited_dest
        assert observed.dests[first.key].stats.inactive_connections == 1, edited_dest
    expect_exactly(ns, kernel, {current: [dest_edits[-1], second]})
    assert any(f":{client_port} " in line for line in connection_entries(ns))


def test_deleting_a_dest_then_its_service(ns: Netns, kernel: IPVSKernel) -> None:
    service = svc(V6, Protocol.TCP, "2001:db8:f::10", 80, scheduler="rr")
    dests = [rs("2001:db8:5e::11", 80), rs("2001:db8:5e::12", 80),
             rs("198.51.100.13", 80, forwarding=TUNNEL, af=V4)]  # fmt: skip
    other = svc(V4, Protocol.TCP, VIP, 80)
    program(kernel, {service: dests, other: [rs(RIP1, 80)]})
    ok(
        kernel.apply(
            [Op(OpKind.DEL_DEST, service, dests[2]), Op(OpKind.DEL_DEST, service, dests[0])]
        )
    )
    expect_exactly(ns, kernel, {service: [dests[1]], other: [rs(RIP1, 80)]})
    ok(kernel.apply([Op(OpKind.DEL_SERVICE, service)]))
    expect_exactly(ns, kernel, {other: [rs(RIP1, 80)]})


# --- failures ---------------------------------------------------------------------------------


def test_a_failed_op_inside_a_batch_fails_alone(ns: Netns) -> None:
    a, b = svc(V4, Protocol.TCP, VIP, 80), svc(V4, Protocol.TCP, VIP, 443)
    ops = [
        Op(OpKind.ADD_SERVICE, a),
        Op(OpKind.ADD_DEST, a, rs(RIP1, 80)),
        Op(OpKind.ADD_SERVICE, a),  # EEXIST
        Op(OpKind.ADD_SERVICE, b),
        Op(OpKind.DEL_SERVICE, svc(V4, Protocol.TCP, VIP, 8080)),  # ESRCH
        Op(OpKind.EDIT_DEST, a, rs(RIP2, 80)),  # ENOENT
        Op(OpKind.ADD_DEST, a, rs(RIP2, 80, upper_threshold=1, lower_threshold=2)),  # ERANGE
        Op(OpKind.ADD_DEST, b, rs(RIP2, 443)),
    ]
    with IPVSKernel(netns=ns.name, batch_size=3) as small_batches:
        results = small_batches.apply(ops)
        assert [r.error for r in results] == [
            0, 0, errno.EEXIST, 0, errno.ESRCH, errno.ENOENT, errno.ERANGE, 0,
        ]  # fmt: skip
        assert results[4].message.startswith("virtual service not found")
        expect_exactly(ns, small_batches, {a: [rs(RIP1, 80)], b: [rs(RIP2, 443)]})


def rules_script() -> list[Op]:
    """Ops that touch each rule FakeKernel copies from the kernel, in an order that matters."""
    s4, s6 = svc(V4, Protocol.TCP, VIP, 80), svc(V6, Protocol.UDP, "2001:db8:f::10", 53)
    gone = svc(V4, Protocol.TCP, VIP, 81)
    d1, d2 = rs(RIP1, 80), rs(RIP2, 80)
    v6_dest = rs("2001:db8:5e::11", 80)
    return [
        Op(OpKind.EDIT_SERVICE, s4),
        Op(OpKind.ADD_DEST, s4, d1),
        Op(OpKind.ADD_SERVICE, s4),
        Op(OpKind.ADD_SERVICE, s4),
        Op(OpKind.ADD_SERVICE, svc(V4, Protocol.TCP, VIP, 82, scheduler="nosuch")),
        Op(OpKind.ADD_SERVICE, svc(V4, Protocol.TCP, VIP, 83, pe_name="nosuch")),
        Op(OpKind.ADD_SERVICE, svc(V6, Protocol.TCP, "2001:db8:f::10", 80, netmask=0xFFFFFFFF)),
        Op(OpKind.ADD_SERVICE, s6),
        Op(OpKind.ADD_DEST, s4, d1),
        Op(OpKind.ADD_DEST, s4, d2),
        Op(OpKind.ADD_DEST, s4, d1),
        Op(OpKind.EDIT_DEST, s4, rs("198.51.100.99", 80)),
        Op(OpKind.DEL_DEST, s4, rs("198.51.100.99", 80)),
        Op(OpKind.ADD_DEST, s4, rs("198.51.100.30", 80, lower_threshold=1)),
        Op(OpKind.ADD_DEST, s4, rs("198.51.100.31", 80, upper_threshold=2, lower_threshold=3)),
        Op(OpKind.EDIT_DEST, s4, replace(d1, upper_threshold=2, lower_threshold=3)),
        Op(OpKind.ADD_DEST, s4, rs("198.51.100.32", 80, tunnel_type=TunnelType.GUE)),
        Op(
            OpKind.ADD_DEST,
            s4,
            rs("198.51.100.33", 80, forwarding=TUNNEL, tunnel_type=TunnelType.GUE),
        ),
        Op(OpKind.ADD_DEST, s4, v6_dest),
        Op(OpKind.ADD_DEST, s4, replace(v6_dest, forwarding=ROUTE)),
        Op(OpKind.ADD_DEST, s4, replace(v6_dest, forwarding=TUNNEL)),
        Op(OpKind.EDIT_DEST, s4, replace(d2, weight=4, forwarding=ROUTE)),
        Op(
            OpKind.ADD_DEST,
            s6,
            rs(
                "198.51.100.11", 53, forwarding=TUNNEL, tunnel_type=TunnelType.GUE, tunnel_port=5555
            ),
        ),
        Op(OpKind.ADD_SERVICE, gone),
        Op(OpKind.ADD_DEST, gone, d1),
        Op(OpKind.DEL_SERVICE, gone),
        Op(OpKind.DEL_DEST, gone, d1),
        Op(OpKind.DEL_SERVICE, gone),
        Op(OpKind.EDIT_SERVICE, replace(s4, scheduler="sh", flags=PERSISTENT, timeout=10)),
    ]


def test_the_fake_kernel_answers_every_rule_as_the_kernel_does(
    ns: Netns, kernel: IPVSKernel
) -> None:
    script = rules_script()
    real = kernel.apply(script)
    fake = FakeKernel(schedulers=kernel.info().schedulers)
    faked = fake.apply(script)
    mismatches = [
        f"{op}: kernel {errno.errorcode.get(r.error, r.error)}, fake "
        f"{errno.errorcode.get(f.error, f.error)}"
        for op, r, f in zip(script, real, faked, strict=True)
        if r.error != f.error
    ]
    assert not mismatches, "\n".join(mismatches)
    assert any(not r.ok for r in real) and any(r.ok for r in real)
    assert dumped(fake.dump()) == dumped(kernel.dump())
    for key, observed in kernel.dump().items():  # dests in the same (newest first) order
        assert list(observed.dests) == list(fake.dump()[key].dests)


# --- configuration and info -------------------------------------------------------------------


def test_timeouts_round_trip(ns: Netns, kernel: IPVSKernel) -> None:
    assert kernel.get_timeouts() == Timeouts(900, 120, 300)  # the kernel's defaults
    kernel.set_timeouts(Timeouts(tcp=3600, tcp_fin=30, udp=10))
    kernel.set_timeouts(Timeouts(udp=20))  # zeros leave the others alone
    assert kernel.get_timeouts() == Timeouts(3600, 30, 20)
    shown = ns.run("ipvsadm", "-L", "--timeout").stdout.split()
    assert shown[-3:] == ["3600", "30", "20"]
    with pytest.raises(KernelError) as caught:
        kernel.set_timeouts(Timeouts(tcp=2**31))
    assert caught.value.errno == errno.EINVAL


def test_info_describes_this_kernel(ns: Netns, kernel: IPVSKernel) -> None:
    info = kernel.info()
    header = ns.run("ipvsadm", "-Ln").stdout.splitlines()[0]
    assert header == f"IP Virtual Server version {info.version} (size={info.connection_table_size})"
    assert info.version == "1.2.1"
    assert info.release == os.uname().release
    ipvs_dir = Path("/lib/modules", info.release, "kernel/net/netfilter/ipvs")
    on_disk = {p.name.split(".")[0].removeprefix("ip_vs_") for p in ipvs_dir.iterdir()}
    assert set(info.schedulers) == on_disk - {"ip_vs", "ftp", "pe_sip"}
    assert info.schedulers[:4] == ("rr", "wrr", "lc", "wlc")
    if info.release.startswith("6.1."):
        assert "twos" not in info.schedulers  # twos arrived in 6.2
    assert info.tunnel_types == ("ipip", "gue", "gre")
    assert info.unloaded == (), "the test bed loads lblc and lblcr at boot, as the chart does"
