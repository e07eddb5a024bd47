"""The agent's nftables tables: which IPVS services are its own, NAT masquerade, and the guard
that lets traffic to a virtual address reach only the services declared on it.

Two tables, ``table inet ipvs-operator`` and ``table arp ipvs-operator``, rendered whole by
:func:`render` from a :class:`Ruleset` and replaced in a single ``nft -f -`` transaction
(create-if-missing, delete, define), so a half-applied ruleset never exists and no other table
is ever touched.

Ownership record. Sets of the virtual services the agent created (``owned4``, ``owned6``:
address . protocol . port; ``owned_fwmarks4``, ``owned_fwmarks6``: firewall marks). After a
restart the agent reads them back and so knows which kernel services are its own: services made
by hand, by keepalived or by kube-proxy are never touched. The record lives and dies with the
node's network namespace, exactly like the IPVS table it describes — and with the node's
firewall: ``nft flush ruleset`` wipes it, so the agent keeps a second copy beside it
(:mod:`ipvs_agent.host.state`) and puts this one back.

Guard. Every virtual address sits on the agent's dummy device, so the kernel takes any packet to
it as local: without a filter, ``VIP:22`` would reach the node's sshd. The ``guard`` chain (input
hook, priority filter, before IPVS at NF_IP_PRI_NAT_SRC - 1) drops packets to a VIP (``vips4``,
``vips6``) unless they are for a declared service (``open4``, ``open6``), carry the mark of a
declared firewall-mark service (``open_fwmarks``), or are ICMP errors, PMTU messages, echo
requests or (IPv6) neighbour discovery. The ``arp`` table drops ARP requests for the VIPs, so no
interface answers for an address that only sits on the dummy device (per address, instead of the
node-wide ``arp_ignore`` sysctl); IPv6 neighbour discovery already answers only for addresses of
the interface asked.

Masquerade. With NAT the real server's reply must pass back through the director to be
un-NATed; a real server on another node (a pod elsewhere) would answer the client directly and
the connection would fail. Traffic to such services (``Plan.masquerade``: NAT with traffic
policy Cluster) is therefore source-NATed to the director: packets to their VIP:port get the
masquerade bit in prerouting (and output, for clients on the node itself), and marked packets
are masqueraded in postrouting after IPVS has picked the real server. Traffic policy Local
services are not marked, so their real servers see the client's address. nftables NAT sees
IPVS connections only with ``net.ipv4.vs.conntrack=1`` (see :mod:`ipvs_agent.host.sysctl`).
Firewall-mark services cannot take the bit (IPVS looks a fwmark service up by the whole packet
mark), so their marks are matched as they are in postrouting.

Mark bit. The default, ``0x2000``, stays clear of kube-proxy's masquerade and drop bits (0x4000,
0x8000), of Calico's default mark mask (0xffff0000) and of Cilium's 0x0f00 nibble; the agent
only ever ORs its bit in and clears it again, so other users of the mark keep their bits. A
firewall-mark VirtualServer may not use a mark with the bit set (the API refuses it).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ipvs_agent.host._netns import HostError, run
from ipvs_agent.model import AddressFamily, IPAddress, ServiceKey, parse_address
from ipvs_api.constants import MASQUERADE_MARK

TABLE_FAMILY = "inet"
TABLE_NAME = "ipvs-operator"
ARP_FAMILY = "arp"
DEFAULT_MARK = MASQUERADE_MARK
#: The postrouting masquerade rule carries this comment with a digest of the rendered text.
DIGEST_PREFIX = "ipvs-operator render "

_PROTO_NAME = {6: "tcp", 17: "udp", 132: "sctp"}
_PROTO_NUMBER = {name: number for number, name in _PROTO_NAME.items()}
_ADDR_TYPE = {
    AddressFamily.INET: "ipv4_addr . inet_proto . inet_service",
    AddressFamily.INET6: "ipv6_addr . inet_proto . inet_service",
}
_SUFFIX = {AddressFamily.INET: "4", AddressFamily.INET6: "6"}
_FAMILY_OF_SUFFIX = {"4": AddressFamily.INET, "6": AddressFamily.INET6}
#: ICMP that must reach a VIP whatever its ports: errors for its connections (IPVS relays them
#: to the real server), path MTU discovery, echo (a VIP that answers ping is easy to check);
#: and IPv6 neighbour discovery, whose unicast probes are addressed to the VIP itself.
ICMP_ALLOWED = "destination-unreachable, time-exceeded, parameter-problem, echo-request"
ICMPV6_ALLOWED = (
    "destination-unreachable, packet-too-big, time-exceeded, parameter-problem, echo-request, "
    "nd-neighbor-solicit, nd-neighbor-advert"
)


class NftError(HostError):
    """``nft`` refused a command or printed something this module cannot read."""


def check_mark(mark: int) -> int:
    """The masquerade mark must be exactly one bit of the 32-bit packet mark."""
    if not 0 < mark < 2**32 or mark & (mark - 1):
        raise ValueError(f"masquerade mark must be a single bit of 32, not {mark:#x}")
    return mark


@dataclass(frozen=True)
class Ruleset:
    """Everything the agent's nftables tables say; :func:`render` turns it into a script.

    ``owned``: every kernel virtual service the agent created; ``masquerade``: the services
    whose traffic to real servers is source-NATed (NAT, traffic policy Cluster); ``vips``: the
    virtual addresses on the agent's device, guarded; ``open``: the services (and firewall
    marks) that traffic to those addresses may reach.
    """

    owned: frozenset[ServiceKey] = field(default_factory=frozenset)
    masquerade: frozenset[ServiceKey] = field(default_factory=frozenset)
    vips: frozenset[IPAddress] = field(default_factory=frozenset)
    open: frozenset[ServiceKey] = field(default_factory=frozenset)

    @classmethod
    def of(
        cls,
        owned: Iterable[ServiceKey] = (),
        masquerade: Iterable[ServiceKey] = (),
        vips: Iterable[IPAddress] = (),
        open: Iterable[ServiceKey] = (),
    ) -> Ruleset:
        """A ruleset with keys written as nft writes them (see :func:`canonical`)."""
        return cls(
            frozenset(canonical(k) for k in owned),
            frozenset(canonical(k) for k in masquerade),
            frozenset(_address(a) for a in vips),
            frozenset(canonical(k) for k in open),
        )


def _address(a: IPAddress | str) -> IPAddress:
    if isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return a
    return parse_address(str(a))


def _address_key(key: ServiceKey) -> tuple[IPAddress, int, int]:
    return (parse_address(key.address), key.protocol, key.port)


@functools.lru_cache(maxsize=1 << 16)  # every pass asks again for every key of the table
def canonical(key: ServiceKey) -> ServiceKey:
    """The key with its address written as nft and ``ipaddress`` write it (``2001:db8::1``)."""
    address = _canonical_text(key.address)
    return key if address == key.address else replace(key, address=address)


@functools.lru_cache(maxsize=1 << 16)
def _canonical_text(address: str) -> str:
    """Remembered: every pass writes the same few thousand service addresses twice."""
    return str(parse_address(address))


def _address_elements(keys: Iterable[ServiceKey], af: AddressFamily) -> list[str]:
    chosen = sorted((k for k in keys if not k.fwmark and k.af is af), key=_address_key)
    elements = []
    for key in chosen:
        proto = _PROTO_NAME.get(key.protocol, str(key.protocol))
        elements.append(f"{ipaddress.ip_address(key.address)} . {proto} . {key.port}")
    return list(dict.fromkeys(elements))


def _mark_elements(keys: Iterable[ServiceKey], af: AddressFamily | None) -> list[str]:
    marks = sorted({k.fwmark for k in keys if k.fwmark and (af is None or k.af is af)})
    return [f"{mark:#010x}" for mark in marks]


def _vip_elements(vips: Iterable[IPAddress], version: int) -> list[str]:
    return [str(a) for a in sorted({a for a in vips if a.version == version}, key=int)]


def _set_block(name: str, kind: str, elements: list[str]) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {kind}"]
    if elements:
        lines.append("\t\telements = {")
        lines.append(",\n".join(f"\t\t\t{element}" for element in elements))
        lines.append("\t\t}")
    lines.append("\t}")
    return lines


@functools.lru_cache(maxsize=4)
def render(ruleset: Ruleset, mark: int = DEFAULT_MARK) -> str:
    """Both tables as an ``nft -f`` script that replaces them in one transaction.

    The output is deterministic (sorted, deduplicated), so equal inputs give byte-equal text.
    A pass renders the same ruleset several times (to write it, and to compare it with the
    live tables before and after), each time parsing and sorting thousands of addresses: the
    last few are remembered.
    """
    check_mark(mark)
    keep = 0xFFFFFFFF & ~mark
    body: list[str] = [f"table {TABLE_FAMILY} {TABLE_NAME} {{"]
    sets: list[tuple[str, str, list[str]]] = []
    for af in (AddressFamily.INET, AddressFamily.INET6):
        sets.append((f"owned{_SUFFIX[af]}", _ADDR_TYPE[af], _address_elements(ruleset.owned, af)))
    for af in (AddressFamily.INET, AddressFamily.INET6):
        sets.append((f"owned_fwmarks{_SUFFIX[af]}", "mark", _mark_elements(ruleset.owned, af)))
    for af in (AddressFamily.INET, AddressFamily.INET6):
        elements = _address_elements(ruleset.masquerade, af)
        sets.append((f"masq{_SUFFIX[af]}", _ADDR_TYPE[af], elements))
    for af in (AddressFamily.INET, AddressFamily.INET6):
        sets.append((f"masq_fwmarks{_SUFFIX[af]}", "mark", _mark_elements(ruleset.masquerade, af)))
    sets.append(("vips4", "ipv4_addr", _vip_elements(ruleset.vips, 4)))
    sets.append(("vips6", "ipv6_addr", _vip_elements(ruleset.vips, 6)))
    for af in (AddressFamily.INET, AddressFamily.INET6):
        sets.append((f"open{_SUFFIX[af]}", _ADDR_TYPE[af], _address_elements(ruleset.open, af)))
    sets.append(("open_fwmarks", "mark", _mark_elements(ruleset.open, None)))
    for name, kind, elements in sets:
        body += _set_block(name, kind, elements)
        body.append("")
    body += [
        "\tchain mark_for_masquerade {",
        f"\t\tip daddr . meta l4proto . th dport @masq4 meta mark set meta mark | {mark:#010x}",
        f"\t\tip6 daddr . meta l4proto . th dport @masq6 meta mark set meta mark | {mark:#010x}",
        "\t}",
        "",
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
        "\t\tjump mark_for_masquerade",
        "\t}",
        "",
        "\tchain output {",
        "\t\ttype filter hook output priority mangle; policy accept;",
        "\t\tjump mark_for_masquerade",
        "\t}",
        "",
        "\tchain guard {",
        "\t\ttype filter hook input priority filter; policy accept;",
        "\t\tip daddr @vips4 jump vip_in",
        "\t\tip6 daddr @vips6 jump vip_in",
        "\t}",
        "",
        "\tchain vip_in {",
        "\t\tip daddr . meta l4proto . th dport @open4 accept",
        "\t\tip6 daddr . meta l4proto . th dport @open6 accept",
        "\t\tmeta mark @open_fwmarks accept",
        f"\t\ticmp type {{ {ICMP_ALLOWED} }} accept",
        f"\t\ticmpv6 type {{ {ICMPV6_ALLOWED} }} accept",
        "\t\tdrop",
        "\t}",
        "",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f"\t\tmeta mark & {mark:#010x} == {mark:#010x} meta mark set meta mark & {keep:#010x} "
        'masquerade comment "@DIGEST@"',
        "\t\tmeta nfproto ipv4 meta mark @masq_fwmarks4 masquerade",
        "\t\tmeta nfproto ipv6 meta mark @masq_fwmarks6 masquerade",
        "\t}",
        "}",
        f"table {ARP_FAMILY} {TABLE_NAME} {{",
        *_set_block("vips", "ipv4_addr", _vip_elements(ruleset.vips, 4)),
        "",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        "\t\tarp operation request arp daddr ip @vips drop",
        "\t}",
        "}",
    ]
    text = "\n".join(body) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    header = [
        "#!/usr/sbin/nft -f",
        "# Generated by ipvs-agent: IPVS ownership record, NAT masquerade and the VIP guard.",
        "# The agent replaces these tables whole in one transaction; edits do not survive.",
    ]
    for family in (TABLE_FAMILY, ARP_FAMILY):
        header += [f"table {family} {TABLE_NAME} {{", "}", f"delete table {family} {TABLE_NAME}"]
    return "\n".join(header) + "\n" + text.replace("@DIGEST@", DIGEST_PREFIX + digest)


def rendered_digest(text: str) -> str | None:
    """The digest :func:`render` wrote into its own output (None if it carries none)."""
    start = text.find(DIGEST_PREFIX)
    if start < 0:
        return None
    start += len(DIGEST_PREFIX)
    return text[start : text.index('"', start)]


# ---------------------------------------------------------------- reading the live tables


@dataclass(frozen=True)
class LiveTable:
    """What ``nft -j list table`` shows of both tables, as this module's values."""

    ruleset: Ruleset
    digest: str | None
    #: The VIPs the arp table's set holds (None: the arp table is missing).
    arp_vips: frozenset[IPAddress] | None = None

    @property
    def owned(self) -> frozenset[ServiceKey]:
        return self.ruleset.owned

    @property
    def masquerade(self) -> frozenset[ServiceKey]:
        return self.ruleset.masquerade


def _port(value: Any) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return socket.getservbyname(text)
    except OSError as error:
        raise NftError(f"cannot read port {text!r} from nft output") from error


def _protocol(value: Any) -> int:
    if isinstance(value, int):
        return value
    text = str(value).lower()
    if text.isdigit():
        return int(text)
    if text in _PROTO_NUMBER:
        return _PROTO_NUMBER[text]
    try:
        return socket.getprotobyname(text)
    except OSError as error:
        raise NftError(f"cannot read protocol {text!r} from nft output") from error


def _mark(value: Any) -> int:
    if isinstance(value, int):
        return value
    return int(str(value), 0)


def _element_value(element: Any) -> Any:
    """Unwrap ``{"elem": {"val": ...}}`` (an element with a comment or timeout)."""
    if isinstance(element, dict) and "elem" in element:
        inner = element["elem"]
        return inner.get("val") if isinstance(inner, dict) else inner
    return element


def _keys_of_set(name: str, elements: list[Any]) -> set[ServiceKey]:
    if name == "open_fwmarks":  # one set for both families: read as IPv4 and IPv6 alike
        marks = {_mark(_element_value(e)) for e in elements}
        return {ServiceKey.for_fwmark(af, m) for m in marks for af in AddressFamily}
    af = _FAMILY_OF_SUFFIX[name[-1]]
    keys: set[ServiceKey] = set()
    for element in elements:
        value = _element_value(element)
        if "fwmarks" in name:
            keys.add(ServiceKey.for_fwmark(af, _mark(value)))
            continue
        if not isinstance(value, dict) or "concat" not in value or len(value["concat"]) != 3:
            raise NftError(f"unexpected element {element!r} in set {name}")
        address, proto, port = value["concat"]
        addr = ipaddress.ip_address(str(address))
        if AddressFamily.of(addr) is not af:
            raise NftError(f"address {addr} in set {name} of the other family")
        keys.add(ServiceKey(af, _protocol(proto), str(addr), _port(port)))
    return keys


def _addresses_of_set(elements: list[Any]) -> set[IPAddress]:
    return {ipaddress.ip_address(str(_element_value(e))) for e in elements}


_OWNED_SETS = ("owned4", "owned6", "owned_fwmarks4", "owned_fwmarks6")
_MASQ_SETS = ("masq4", "masq6", "masq_fwmarks4", "masq_fwmarks6")
_OPEN_SETS = ("open4", "open6", "open_fwmarks")


def _sets(listing: Mapping[str, Any], family: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for entry in listing.get("nftables", []):
        if isinstance(entry, dict) and "set" in entry:
            nft_set = entry["set"]
            if nft_set.get("table") == TABLE_NAME and nft_set.get("family") == family:
                found[str(nft_set.get("name", ""))] = list(nft_set.get("elem", []))
    return found


def parse_listing(
    listing: Mapping[str, Any], arp_listing: Mapping[str, Any] | None = None
) -> LiveTable:
    """Read the ruleset and the digest out of ``nft -j`` output of both tables."""
    sets = _sets(listing, TABLE_FAMILY)
    owned: set[ServiceKey] = set()
    masquerade: set[ServiceKey] = set()
    opened: set[ServiceKey] = set()
    vips: set[IPAddress] = set()
    for name, elements in sets.items():
        if name in _OWNED_SETS:
            owned |= _keys_of_set(name, elements)
        elif name in _MASQ_SETS:
            masquerade |= _keys_of_set(name, elements)
        elif name in _OPEN_SETS:
            opened |= _keys_of_set(name, elements)
        elif name in ("vips4", "vips6"):
            vips |= _addresses_of_set(elements)
    digest: str | None = None
    for entry in listing.get("nftables", []):
        if isinstance(entry, dict) and "rule" in entry:
            comment = entry["rule"].get("comment", "")
            if entry["rule"].get("table") == TABLE_NAME and comment.startswith(DIGEST_PREFIX):
                digest = comment.removeprefix(DIGEST_PREFIX)
    arp_vips = None
    if arp_listing is not None:
        arp_vips = frozenset(_addresses_of_set(_sets(arp_listing, ARP_FAMILY).get("vips", [])))
    ruleset = Ruleset(frozenset(owned), frozenset(masquerade), frozenset(vips), frozenset(opened))
    return LiveTable(ruleset, digest, arp_vips)


def _comparable(ruleset: Ruleset) -> Ruleset:
    """The ruleset as a listing reads it back: firewall marks of ``open`` in both families."""
    marks = {k.fwmark for k in ruleset.open if k.fwmark}
    opened = {k for k in ruleset.open if not k.fwmark}
    opened |= {ServiceKey.for_fwmark(af, m) for m in marks for af in AddressFamily}
    return replace(ruleset, open=frozenset(opened))


# ---------------------------------------------------------------- the live tables


def _json(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise NftError(f"nft printed no JSON: {text[:200]!r}") from error
    if not isinstance(parsed, dict):
        raise NftError(f"nft printed unexpected JSON: {text[:200]!r}")
    return parsed


class NftTable:
    """Reads and replaces the agent's two tables with the ``nft`` CLI.

    ``netns`` (a name under ``/run/netns`` or a path) selects the network namespace; the
    default is the agent's own.
    """

    def __init__(
        self,
        *,
        mark: int = DEFAULT_MARK,
        netns: str | None = None,
        nft: str = "nft",
        timeout: float = 30.0,
    ) -> None:
        self.mark = check_mark(mark)
        self.netns = netns
        self.nft = nft
        self.timeout = timeout
        #: The last listings (inet, arp) and what they said.
        self._seen: tuple[tuple[str, str | None], LiveTable] | None = None

    def _nft(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        proc = run([self.nft, *args], netns=self.netns, stdin=stdin, timeout=self.timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def _text(self, family: str) -> str | None:
        """A table as ``nft -j`` prints it, or None when it does not exist (yet).

        ``-p`` (protocols as numbers): nft otherwise looks up each element's protocol name,
        which made a 2000-service listing take 7.7 s instead of 1.0 s under emulation.
        """
        code, out, err = self._nft("-j", "-p", "list", "table", family, TABLE_NAME)
        if code != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(f"nft list table {family} {TABLE_NAME} failed: {err.strip()}")
        return out

    def listing(self, family: str = TABLE_FAMILY) -> dict[str, Any] | None:
        """A table as ``nft -j`` prints it, parsed; None when it does not exist (yet)."""
        text = self._text(family)
        return None if text is None else _json(text)

    def live(self) -> LiveTable | None:
        """Both tables as they are, or None when the inet table (the record) is missing.

        Listings equal to the last ones are that listing's table: reading thousands of
        elements is most of a pass's nftables cost, and an idle node lists the same text.
        """
        inet = self._text(TABLE_FAMILY)
        if inet is None:
            return None
        texts = (inet, self._text(ARP_FAMILY))
        if self._seen is not None and self._seen[0] == texts:
            return self._seen[1]
        arp = None if texts[1] is None else _json(texts[1])
        live = parse_listing(_json(inet), arp)
        self._seen = (texts, live)
        return live

    def read_owned(self) -> set[ServiceKey]:
        """The services the agent recorded as its own (empty before the first sync)."""
        live = self.live()
        return set() if live is None else set(live.owned)

    def matches(self, ruleset: Ruleset, live: LiveTable | None) -> bool:
        """Whether ``live`` says exactly ``ruleset`` (digest and every set)."""
        text = render(ruleset, self.mark)
        return (
            live is not None
            and live.digest == rendered_digest(text)
            and live.ruleset == _comparable(ruleset)
            and live.arp_vips == frozenset(a for a in ruleset.vips if a.version == 4)
        )

    def written(self, ruleset: Ruleset, text: str) -> LiveTable:
        """The tables as a listing would read them right after ``apply(text)``."""
        arp = frozenset(a for a in ruleset.vips if a.version == 4)
        return LiveTable(_comparable(ruleset), rendered_digest(text), arp)

    def sync(self, ruleset: Ruleset) -> bool:
        """Make both tables say ``ruleset``; True if nft ran.

        An unchanged ruleset costs two ``nft list``: the rendered text's digest and the set
        contents are compared first, so a hand-edited set is repaired too.
        """
        if self.matches(ruleset, self.live()):
            return False
        self.apply(render(ruleset, self.mark))
        return True

    def apply(self, text: str) -> None:
        """Run an ``nft -f`` script as one transaction (all of it or nothing)."""
        code, _, err = self._nft("-f", "-", stdin=text)
        if code != 0:
            raise NftError(f"nft -f refused the {TABLE_NAME} tables: {err.strip()}")

    def delete(self) -> bool:
        """Remove both tables (uninstall); True if either existed."""
        existed = self.listing() is not None or self.listing(ARP_FAMILY) is not None
        if existed:
            self.apply(
                "".join(
                    f"table {f} {TABLE_NAME} {{\n}}\ndelete table {f} {TABLE_NAME}\n"
                    for f in (TABLE_FAMILY, ARP_FAMILY)
                )
            )
        return existed
