"""The kernel's hashing schedulers as Python, for exact expectations in kernel tests.

sh and dh are deterministic functions of addresses (and ports) and of the kernel's list order
of real servers; these mirror net/netfilter/ipvs/ip_vs_sh.c and ip_vs_dh.c of Linux 6.1 for
IPv4. mh is deterministic too, but its Maglev permutation uses siphash; tests check its
properties (one server per client, only a quiesced server's clients move) instead.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

from tests.kernel.traffic import REFUSED

GOLDEN_RATIO_32 = 0x61C88647  # include/linux/hash.h: hash_32(v, bits)
TABLE_SIZE = 256  # IP_VS_SH_TAB_SIZE and IP_VS_DH_TAB_SIZE (CONFIG_IP_VS_*_TAB_BITS = 8)


def _hash_32(value: int, bits: int) -> int:
    return ((value * GOLDEN_RATIO_32) & 0xFFFFFFFF) >> (32 - bits)


def sh_bucket(client: str, port: int = 0, offset: int = 0) -> int:
    """ip_vs_sh_hashkey (IPv4): (offset + hash_32(port + addr, 8)) mod 256."""
    value = (port + int(ipaddress.IPv4Address(client))) & 0xFFFFFFFF
    return (offset + _hash_32(value, 8)) % TABLE_SIZE


def sh_table(order: Sequence[str], weights: Mapping[str, int]) -> list[str]:
    """ip_vs_sh_reassign: buckets handed out in list order, ``weight`` (at least 1) at a time."""
    table: list[str] = []
    while len(table) < TABLE_SIZE:
        for name in order:
            table.extend([name] * max(weights[name], 1))
    return table[:TABLE_SIZE]


def sh_pick(
    table: Sequence[str],
    available: set[str],
    client: str,
    port: int = 0,
    fallback: bool = False,
) -> str:
    """ip_vs_sh_get / ip_vs_sh_get_fallback: the bucket's server, or with sh-fallback the first
    available one found walking the table from the client's own bucket."""
    first = sh_bucket(client, port)
    if table[first] in available:
        return table[first]
    if fallback:
        for offset in range(TABLE_SIZE):
            candidate = table[sh_bucket(client, port, (offset + first) % TABLE_SIZE)]
            if candidate in available:
                return candidate
    return REFUSED


def dh_pick(order: Sequence[str], vip: str) -> str:
    """ip_vs_dh: bucket (addr * 2654435761) mod 256; buckets go round the list one each."""
    bucket = (int(ipaddress.IPv4Address(vip)) * 2654435761) % TABLE_SIZE
    return order[bucket % len(order)]
