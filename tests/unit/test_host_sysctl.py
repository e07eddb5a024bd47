"""Which sysctls a director needs on which kernel, and writing them idempotently."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_agent.host.sysctl import (
    Sysctl,
    apply,
    conn_reuse_mode_needed,
    interface_sysctl,
    kernel_version,
    read,
    required,
    sysctl,
)


def names(items: list[Sysctl]) -> list[str]:
    return [item.name for item in items]


@pytest.mark.parametrize(
    ("release", "version"),
    [
        ("6.1.0-56-amd64", (6, 1)),
        ("4.18.0-553.el8_10.x86_64", (4, 18)),
        ("5.15.0-1034-azure", (5, 15)),
        ("6.12.3+bpo-cloud-arm64", (6, 12)),
        ("", None),
        ("unknown", None),
    ],
)
def test_kernel_version_reads_uname_release(release: str, version: tuple[int, int] | None) -> None:
    assert kernel_version(release) == version


@pytest.mark.parametrize(
    ("release", "needed"),
    [
        ("3.10.0-1160.el7.x86_64", False),  # no conn_reuse_mode at all
        ("4.0.9", False),
        ("4.1.0", True),
        ("4.19.0-27-amd64", True),
        ("5.4.0-200-generic", True),
        ("5.8.18", True),
        ("5.9.0", False),  # the 1-second delay is fixed
        ("6.1.0-56-amd64", False),
        ("garbage", False),
    ],
)
def test_conn_reuse_mode_only_on_kernels_with_the_syn_delay(release: str, needed: bool) -> None:
    assert conn_reuse_mode_needed(release) is needed
    assert ("net.ipv4.vs.conn_reuse_mode" in names(required(release))) is needed


def test_required_on_debian_bookworm() -> None:
    assert [str(s) for s in required("6.1.0-56-amd64")] == [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.vs.conntrack=1",
        "net.ipv4.vs.expire_nodest_conn=1",
        "net.ipv4.vs.expire_quiescent_template=1",
        "net.ipv4.conf.all.arp_ignore=1",
        "net.ipv4.conf.all.arp_announce=2",
    ]


def test_required_without_ipv6_or_strict_arp() -> None:
    chosen = names(required("5.4.0", ipv6=False, strict_arp=False))
    assert chosen == [
        "net.ipv4.ip_forward",
        "net.ipv4.vs.conntrack",
        "net.ipv4.vs.expire_nodest_conn",
        "net.ipv4.vs.expire_quiescent_template",
        "net.ipv4.vs.conn_reuse_mode",
    ]


def test_every_sysctl_says_why() -> None:
    for item in required("5.4.0"):
        assert len(item.reason) > 30, item


def test_interface_names_with_dots_keep_their_path() -> None:
    item = interface_sysctl("ipv4", "eth0.100", "rp_filter", 0, "vlan")
    assert item.path == "net/ipv4/conf/eth0.100/rp_filter"
    assert item.name == "net.ipv4.conf.eth0/100.rp_filter"


def _proc(tmp_path: Path, values: dict[str, str]) -> str:
    for path, value in values.items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(value + "\n")
    return str(tmp_path)


def test_apply_writes_only_what_differs_and_reports_it(tmp_path: Path) -> None:
    root = _proc(
        tmp_path,
        {
            "net/ipv4/ip_forward": "0",
            "net/ipv4/vs/conntrack": "1",
            "net/ipv4/conf/all/rp_filter": "1",
        },
    )
    wanted = [
        sysctl("net.ipv4.ip_forward", 1, "router"),
        sysctl("net.ipv4.vs.conntrack", 1, "nat"),
        sysctl("net.ipv4.conf.all.rp_filter", 2, "loose", accept=("0", "2")),
        sysctl("net.ipv4.vs.expire_nodest_conn", 1, "no ip_vs here"),
    ]
    result = apply(wanted, root=root)
    assert [str(change) for change in result.changed] == [
        "net.ipv4.ip_forward: 0 -> 1",
        "net.ipv4.conf.all.rp_filter: 1 -> 2",
    ]
    assert names(list(result.missing)) == ["net.ipv4.vs.expire_nodest_conn"]
    assert read(wanted[0], root=root) == "1"
    assert apply(wanted, root=root).changed == ()


def test_apply_leaves_an_accepted_value_alone(tmp_path: Path) -> None:
    root = _proc(tmp_path, {"net/ipv4/conf/all/rp_filter": "0"})
    relaxed = sysctl("net.ipv4.conf.all.rp_filter", 2, "loose", accept=("0", "2"))
    assert apply([relaxed], root=root).changed == ()
    assert read(relaxed, root=root) == "0"


def test_operations_doc_lists_every_sysctl_with_its_value() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    section = doc.split("## Node requirements and sysctls")[1].split("\n## ")[0]
    for item in required("5.4.0"):
        assert f"| `{item.name}` | {item.value} |" in section, item
