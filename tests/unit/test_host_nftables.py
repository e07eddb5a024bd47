"""The agent's nftables table, rendered: golden files per scenario, and reading it back.

Golden files live in tests/unit/golden/nftables/; review a change to one like code. After an
intended change of the rendering, rewrite them with ``IPVS_UPDATE_GOLDEN=1 pytest <this file>``.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from ipvs_agent.host.nftables import (
    DEFAULT_MARK,
    DIGEST_PREFIX,
    Ruleset,
    canonical,
    check_mark,
    parse_listing,
    render,
    rendered_digest,
)
from ipvs_agent.model import AddressFamily, Protocol, ServiceKey

GOLDEN = Path(__file__).parent / "golden" / "nftables"
V4 = ipaddress.ip_address("203.0.113.10")
V4B = ipaddress.ip_address("198.51.100.7")
V6 = ipaddress.ip_address("2001:db8:f::10")

WEB = ServiceKey.for_address(V4, Protocol.TCP, 80)
WEB_TLS = ServiceKey.for_address(V4, Protocol.TCP, 443)
DNS = ServiceKey.for_address(V4B, Protocol.UDP, 53)
SIP = ServiceKey.for_address(V4B, Protocol.SCTP, 5060)
WEB6 = ServiceKey.for_address(V6, Protocol.TCP, 80)
DNS6 = ServiceKey.for_address(V6, Protocol.UDP, 53)
MARK4 = ServiceKey.for_fwmark(AddressFamily.INET, 16)
MARK6 = ServiceKey.for_fwmark(AddressFamily.INET6, 0x20)

SCENARIOS: dict[str, tuple[Ruleset, int]] = {
    # a fresh node: the tables exist, record nothing, masquerade nothing, guard nothing
    "empty": (Ruleset(), DEFAULT_MARK),
    # NAT with traffic policy Cluster (masqueraded) next to Local (80 vs 443) and DR/TUN (DNS,
    # SIP: owned, never masqueraded), on both families; every address guarded, its services open
    "mixed": (
        Ruleset.of(
            [WEB, WEB_TLS, DNS, SIP, WEB6, DNS6],
            [WEB, WEB6, DNS6],
            [V4, V4B, V6],
            [WEB, WEB_TLS, DNS, SIP, WEB6, DNS6],
        ),
        DEFAULT_MARK,
    ),
    # firewall-mark services: owned per family; one masqueraded by its own mark; the marks open
    # the guard of the one VIP for their packets
    "fwmark": (Ruleset.of([MARK4, MARK6, WEB], [MARK6, WEB], [V4], [MARK4, MARK6, WEB]), 0x2000),
    # another masquerade bit (a cluster whose CNI uses 0x2000)
    "custom-mark": (Ruleset.of([WEB], [WEB], [V4], [WEB]), 0x00100000),
}


def owned(*keys: ServiceKey, masquerade: tuple[ServiceKey, ...] = ()) -> Ruleset:
    return Ruleset.of(keys, masquerade)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_render_matches_golden_file(name: str) -> None:
    ruleset, mark = SCENARIOS[name]
    text = render(ruleset, mark)
    path = GOLDEN / f"{name}.nft"
    if os.environ.get("IPVS_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; see the module docstring to update"


def test_render_is_deterministic_and_ignores_order_and_duplicates() -> None:
    ruleset, mark = SCENARIOS["mixed"]
    again = Ruleset.of(
        list(reversed(sorted(ruleset.owned))) + sorted(ruleset.owned),
        reversed(sorted(ruleset.masquerade)),
        reversed(sorted(ruleset.vips, key=str)),
        ruleset.open,
    )
    assert render(again, mark) == render(ruleset, mark)


def test_render_replaces_both_tables_whole_in_one_script() -> None:
    lines = render(owned(WEB, masquerade=(WEB,))).splitlines()
    statements = [line for line in lines if line and not line.startswith(("#", "\t", "}"))]
    assert statements == [
        "table inet ipvs-operator {",
        "delete table inet ipvs-operator",
        "table arp ipvs-operator {",
        "delete table arp ipvs-operator",
        "table inet ipvs-operator {",
        "table arp ipvs-operator {",
    ]


def test_render_touches_no_other_table() -> None:
    text = render(owned(WEB, WEB6, masquerade=(WEB,)))
    assert "ipvs-operator" in text
    for line in text.splitlines():
        if line.startswith(("table", "delete", "flush", "add")):
            assert line.removeprefix("delete ").split()[1:3] in (
                ["inet", "ipvs-operator"],
                ["arp", "ipvs-operator"],
            )


def test_local_traffic_policy_services_are_owned_but_not_marked() -> None:
    text = render(owned(WEB, WEB_TLS, masquerade=(WEB,)))
    masq_block = text.split("set masq4 {")[1].split("}")[0]
    assert "203.0.113.10 . tcp . 80" in masq_block
    assert "443" not in masq_block
    owned_block = text.split("set owned4 {")[1].split("}")[0]
    assert "203.0.113.10 . tcp . 443" in owned_block


def test_the_guard_drops_what_is_not_declared_but_lets_icmp_errors_and_neighbours_in() -> None:
    text = render(Ruleset.of([WEB], [], [V4, V6], [WEB]))
    guard = text.split("chain guard {")[1].split("}")[0]
    assert "type filter hook input priority filter; policy accept;" in guard
    vip_in = text.split("chain vip_in {")[1].split("\n\t}")[0]
    rules = [line.strip() for line in vip_in.splitlines() if line.strip()]
    assert rules[-1] == "drop"
    assert "ip daddr . meta l4proto . th dport @open4 accept" in rules
    icmp = next(r for r in rules if r.startswith("icmp type"))
    for kind in ("destination-unreachable", "time-exceeded", "parameter-problem"):
        assert kind in icmp
    icmpv6 = next(r for r in rules if r.startswith("icmpv6 type"))
    for kind in ("packet-too-big", "nd-neighbor-solicit", "nd-neighbor-advert"):
        assert kind in icmpv6
    arp = text.rsplit("table arp ipvs-operator {", 1)[1]
    assert "arp operation request arp daddr ip @vips drop" in arp
    assert "203.0.113.10" in arp and "2001:db8" not in arp


def test_the_mark_bit_is_or_ed_in_and_cleared_never_overwritten() -> None:
    text = render(owned(WEB, masquerade=(WEB,)), 0x2000)
    assert "meta mark set meta mark | 0x00002000" in text
    assert "meta mark set meta mark & 0xffffdfff masquerade" in text
    assert "meta mark set 0x" not in text


@pytest.mark.parametrize("mark", [0, 3, 0x6000, 2**32, -1])
def test_the_mark_must_be_one_bit(mark: int) -> None:
    with pytest.raises(ValueError, match="single bit"):
        check_mark(mark)
    with pytest.raises(ValueError):
        render(Ruleset(), mark)


def test_the_digest_changes_with_the_content_and_is_readable_back() -> None:
    first = render(owned(WEB))
    second = render(owned(WEB, masquerade=(WEB,)))
    assert rendered_digest(first) != rendered_digest(second)
    assert rendered_digest(first) == rendered_digest(render(owned(WEB)))
    assert rendered_digest(render(Ruleset.of([WEB], [], [V4], [WEB]))) != rendered_digest(first)
    assert rendered_digest("table inet x {}") is None


def test_canonical_writes_ipv6_addresses_as_nft_prints_them() -> None:
    key = ServiceKey(AddressFamily.INET6, 6, "2001:DB8:0:0::10", 80)
    assert canonical(key).address == "2001:db8::10"
    assert canonical(WEB) is WEB
    # The key keeps its hash (ServiceKey._hash): a rewritten key hashes as its new fields.
    same = ServiceKey(AddressFamily.INET6, 6, "2001:db8::10", 80)
    assert canonical(key) == same and hash(canonical(key)) == hash(same)
    assert canonical(key) in {same} and key not in {same}
    assert "_hash" not in repr(same)


def _listing(sets: dict[str, list[Any]], comment: str = "") -> dict[str, Any]:
    """``nft -j list table inet ipvs-operator`` output, as nftables 1.0.6 prints it."""
    entries: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "ipvs-operator", "handle": 3}},
    ]
    for name, elements in sets.items():
        item: dict[str, Any] = {"family": "inet", "name": name, "table": "ipvs-operator"}
        if elements:
            item["elem"] = elements
        entries.append({"set": item})
    entries.append(
        {"set": {"family": "inet", "name": "owned4", "table": "someone-else", "elem": [1]}}
    )
    rule: dict[str, Any] = {"family": "inet", "table": "ipvs-operator", "chain": "postrouting"}
    if comment:
        rule["comment"] = comment
    entries.append({"rule": rule})
    return {"nftables": entries}


def test_parse_listing_reads_every_owned_and_masqueraded_service() -> None:
    listing = _listing(
        {
            "owned4": [
                {"concat": ["203.0.113.10", "tcp", 80]},
                {"concat": ["198.51.100.7", "sctp", 5060]},
                {"concat": ["198.51.100.7", 17, "53"]},
            ],
            "owned6": [{"concat": ["2001:db8:f::10", "tcp", 80]}],
            "owned_fwmarks4": [16],
            "owned_fwmarks6": ["0x00000020"],
            "masq4": [{"elem": {"val": {"concat": ["203.0.113.10", "tcp", 80]}, "comment": "x"}}],
            "masq6": [],
            "masq_fwmarks4": [],
            "masq_fwmarks6": [32],
        },
        comment=DIGEST_PREFIX + "0123456789abcdef",
    )
    live = parse_listing(listing)
    assert live.owned == {WEB, SIP, DNS, WEB6, MARK4, MARK6}
    assert live.masquerade == {WEB, MARK6}
    assert live.digest == "0123456789abcdef"


def test_parse_listing_of_a_table_without_elements_is_empty() -> None:
    live = parse_listing(_listing({"owned4": [], "owned6": []}))
    assert live.owned == frozenset()
    assert live.masquerade == frozenset()
    assert live.digest is None


def test_parse_listing_reads_the_guard_and_the_arp_table() -> None:
    listing = _listing(
        {
            "vips4": ["203.0.113.10"],
            "vips6": ["2001:db8:f::10"],
            "open4": [{"concat": ["203.0.113.10", "tcp", 80]}],
            "open6": [],
            "open_fwmarks": [16],
        }
    )
    arp = {
        "nftables": [
            {"set": {"family": "arp", "name": "vips", "table": "ipvs-operator", "elem": [str(V4)]}}
        ]
    }
    live = parse_listing(listing, arp)
    assert live.ruleset.vips == {V4, V6}
    # one set of marks serves both families; read back as both
    assert live.ruleset.open == {WEB, MARK4, ServiceKey.for_fwmark(AddressFamily.INET6, 16)}
    assert live.arp_vips == frozenset({V4})
    assert parse_listing(listing).arp_vips is None  # no arp table listed: it is missing
