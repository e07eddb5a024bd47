"""The agent's nftables table: which IPVS services are its own, and masquerade for NAT.

One table, ``table inet ipvs-operator``, rendered whole by :func:`render` and replaced in a
single ``nft -f -`` transaction (create-if-missing, delete, define), so a half-applied ruleset
never exists and no other table is ever touched.

Ownership record. Sets of the virtual services the agent created (``owned4``, ``owned6``:
address . protocol . port; ``owned_fwmarks4``, ``owned_fwmarks6``: firewall marks). After a
restart the agent reads them back (:meth:`NftTable.read_owned`) and so knows, without any local
file, which kernel services are its own: services made by hand, by keepalived or by kube-proxy
are never touched. The record lives and dies with the node's network namespace, exactly like
the IPVS table it describes.

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
only ever ORs its bit in and clears it again, so other users of the mark keep their bits.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ipvs_agent.host._netns import HostError, run
from ipvs_agent.model import AddressFamily, IPAddress, ServiceKey
from ipvs_api.constants import MASQUERADE_MARK

TABLE_FAMILY = "inet"
TABLE_NAME = "ipvs-operator"
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


class NftError(HostError):
    """``nft`` refused a command or printed something this module cannot read."""


def check_mark(mark: int) -> int:
    """The masquerade mark must be exactly one bit of the 32-bit packet mark."""
    if not 0 < mark < 2**32 or mark & (mark - 1):
        raise ValueError(f"masquerade mark must be a single bit of 32, not {mark:#x}")
    return mark


def _address_key(key: ServiceKey) -> tuple[IPAddress, int, int]:
    return (ipaddress.ip_address(key.address), key.protocol, key.port)


def canonical(key: ServiceKey) -> ServiceKey:
    """The key with its address written as nft and ``ipaddress`` write it (``2001:db8::1``)."""
    address = str(ipaddress.ip_address(key.address))
    return key if address == key.address else replace(key, address=address)


def _address_elements(keys: Iterable[ServiceKey], af: AddressFamily) -> list[str]:
    chosen = sorted((k for k in keys if not k.fwmark and k.af is af), key=_address_key)
    elements = []
    for key in chosen:
        proto = _PROTO_NAME.get(key.protocol, str(key.protocol))
        elements.append(f"{ipaddress.ip_address(key.address)} . {proto} . {key.port}")
    return list(dict.fromkeys(elements))


def _mark_elements(keys: Iterable[ServiceKey], af: AddressFamily) -> list[str]:
    marks = sorted({k.fwmark for k in keys if k.fwmark and k.af is af})
    return [f"{mark:#010x}" for mark in marks]


def _set_block(name: str, kind: str, elements: list[str]) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {kind}"]
    if elements:
        lines.append("\t\telements = {")
        lines.append(",\n".join(f"\t\t\t{element}" for element in elements))
        lines.append("\t\t}")
    lines.append("\t}")
    return lines


def render(
    owned: Iterable[ServiceKey], masquerade: Iterable[ServiceKey], mark: int = DEFAULT_MARK
) -> str:
    """The whole table as an ``nft -f`` script that replaces it in one transaction.

    ``owned``: every kernel virtual service the agent created; ``masquerade``: the services
    whose traffic to real servers is source-NATed (NAT, traffic policy Cluster). The output is
    deterministic (sorted, deduplicated), so equal inputs give byte-equal text.
    """
    check_mark(mark)
    owned = list(owned)
    masquerade = list(masquerade)
    keep = 0xFFFFFFFF & ~mark
    body: list[str] = [f"table {TABLE_FAMILY} {TABLE_NAME} {{"]
    for af in (AddressFamily.INET, AddressFamily.INET6):
        body += _set_block(f"owned{_SUFFIX[af]}", _ADDR_TYPE[af], _address_elements(owned, af))
        body.append("")
    for af in (AddressFamily.INET, AddressFamily.INET6):
        body += _set_block(f"owned_fwmarks{_SUFFIX[af]}", "mark", _mark_elements(owned, af))
        body.append("")
    for af in (AddressFamily.INET, AddressFamily.INET6):
        elements = _address_elements(masquerade, af)
        body += _set_block(f"masq{_SUFFIX[af]}", _ADDR_TYPE[af], elements)
        body.append("")
    for af in (AddressFamily.INET, AddressFamily.INET6):
        elements = _mark_elements(masquerade, af)
        body += _set_block(f"masq_fwmarks{_SUFFIX[af]}", "mark", elements)
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
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f"\t\tmeta mark & {mark:#010x} == {mark:#010x} meta mark set meta mark & {keep:#010x} "
        'masquerade comment "@DIGEST@"',
        "\t\tmeta nfproto ipv4 meta mark @masq_fwmarks4 masquerade",
        "\t\tmeta nfproto ipv6 meta mark @masq_fwmarks6 masquerade",
        "\t}",
        "}",
    ]
    text = "\n".join(body) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    header = [
        "#!/usr/sbin/nft -f",
        "# Generated by ipvs-agent: IPVS ownership record and NAT masquerade.",
        "# The agent replaces this table whole in one transaction; edits do not survive.",
        f"table {TABLE_FAMILY} {TABLE_NAME} {{",
        "}",
        f"delete table {TABLE_FAMILY} {TABLE_NAME}",
    ]
    return "\n".join(header) + "\n" + text.replace("@DIGEST@", DIGEST_PREFIX + digest)


def rendered_digest(text: str) -> str | None:
    """The digest :func:`render` wrote into its own output (None if it carries none)."""
    start = text.find(DIGEST_PREFIX)
    if start < 0:
        return None
    start += len(DIGEST_PREFIX)
    return text[start : text.index('"', start)]


# ---------------------------------------------------------------- reading the live table


@dataclass(frozen=True)
class LiveTable:
    """What ``nft -j list table inet ipvs-operator`` shows, as this module's values."""

    owned: frozenset[ServiceKey]
    masquerade: frozenset[ServiceKey]
    digest: str | None


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
    suffix = name[-1]
    af = _FAMILY_OF_SUFFIX[suffix]
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


_OWNED_SETS = ("owned4", "owned6", "owned_fwmarks4", "owned_fwmarks6")
_MASQ_SETS = ("masq4", "masq6", "masq_fwmarks4", "masq_fwmarks6")


def parse_listing(listing: Mapping[str, Any]) -> LiveTable:
    """Read the owned and masqueraded services and the digest out of ``nft -j`` output."""
    owned: set[ServiceKey] = set()
    masquerade: set[ServiceKey] = set()
    digest: str | None = None
    for entry in listing.get("nftables", []):
        if not isinstance(entry, dict):
            continue
        if "set" in entry:
            nft_set = entry["set"]
            if nft_set.get("table") != TABLE_NAME or nft_set.get("family") != TABLE_FAMILY:
                continue
            name = nft_set.get("name", "")
            elements = nft_set.get("elem", [])
            if name in _OWNED_SETS:
                owned |= _keys_of_set(name, elements)
            elif name in _MASQ_SETS:
                masquerade |= _keys_of_set(name, elements)
        elif "rule" in entry:
            comment = entry["rule"].get("comment", "")
            if entry["rule"].get("table") == TABLE_NAME and comment.startswith(DIGEST_PREFIX):
                digest = comment.removeprefix(DIGEST_PREFIX)
    return LiveTable(frozenset(owned), frozenset(masquerade), digest)


# ---------------------------------------------------------------- the live table


class NftTable:
    """Reads and replaces ``table inet ipvs-operator`` with the ``nft`` CLI.

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

    def _nft(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        proc = run([self.nft, *args], netns=self.netns, stdin=stdin, timeout=self.timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def listing(self) -> dict[str, Any] | None:
        """The table as ``nft -j`` prints it, or None when it does not exist (yet)."""
        code, out, err = self._nft("-j", "list", "table", TABLE_FAMILY, TABLE_NAME)
        if code != 0:
            if "No such file or directory" in err:
                return None
            raise NftError(f"nft list table {TABLE_FAMILY} {TABLE_NAME} failed: {err.strip()}")
        try:
            parsed = json.loads(out)
        except json.JSONDecodeError as error:
            raise NftError(f"nft printed no JSON: {out[:200]!r}") from error
        if not isinstance(parsed, dict):
            raise NftError(f"nft printed unexpected JSON: {out[:200]!r}")
        return parsed

    def live(self) -> LiveTable | None:
        listing = self.listing()
        return None if listing is None else parse_listing(listing)

    def read_owned(self) -> set[ServiceKey]:
        """The services the agent recorded as its own (empty before the first sync)."""
        live = self.live()
        return set() if live is None else set(live.owned)

    def sync(self, owned: Iterable[ServiceKey], masquerade: Iterable[ServiceKey]) -> bool:
        """Make the table say ``owned`` and masquerade ``masquerade``; True if nft ran.

        An unchanged table costs one ``nft list``: the rendered text's digest and the set
        contents are compared first, so a hand-edited set is repaired too.
        """
        owned = frozenset(canonical(k) for k in owned)
        masquerade = frozenset(canonical(k) for k in masquerade)
        text = render(owned, masquerade, self.mark)
        live = self.live()
        if (
            live is not None
            and live.digest == rendered_digest(text)
            and live.owned == owned
            and live.masquerade == masquerade
        ):
            return False
        self.apply(text)
        return True

    def apply(self, text: str) -> None:
        """Run an ``nft -f`` script as one transaction (all of it or nothing)."""
        code, _, err = self._nft("-f", "-", stdin=text)
        if code != 0:
            raise NftError(f"nft -f refused the {TABLE_NAME} table: {err.strip()}")

    def delete(self) -> bool:
        """Remove the table (uninstall); True if it existed."""
        if self.listing() is None:
            return False
        self.apply(
            f"table {TABLE_FAMILY} {TABLE_NAME} {{\n}}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"
        )
        return True
