"""Which sysctls a director needs on which kernel, and writing them idempotently."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_agent.host.sysctl import (
    Needs,
    Sysctl,
    apply,
    conn_reuse_mode_needed,
    interface_sysctl,
    keep_router_advertisements,
    kernel_version,
    needed,
    read,
    sysctl,
)

EVERYTHING = Needs(services=True, nat4=True, nat6=True, masquerade=True, persistence=True)


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
    ("release", "needed_"),
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
def test_conn_reuse_mode_only_on_kernels_with_the_syn_delay(release: str, needed_: bool) -> None:
    assert conn_reuse_mode_needed(release) is needed_
    chosen = names(needed(EVERYTHING, release))
    assert ("net.ipv4.vs.conn_reuse_mode" in chosen) is needed_


def test_everything_on_debian_bookworm() -> None:
    assert [str(s) for s in needed(EVERYTHING, "6.1.0-56-amd64")] == [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.vs.conntrack=1",
        "net.ipv4.vs.expire_nodest_conn=1",
        "net.ipv4.vs.expire_quiescent_template=1",
        "net.ipv4.conf.all.arp_announce=2",
    ]


@pytest.mark.parametrize(
    ("needs", "chosen"),
    [
        (Needs(), []),  # nothing programmed: the node is left as it is
        # DR and TUN only: IPVS sends the packets itself, no forwarding, no conntrack
        (Needs(services=True), ["net.ipv4.vs.expire_nodest_conn"]),
        # IPv4 NAT with traffic policy Local: forwarding, but no masquerade and no IPv6
        (
            Needs(services=True, nat4=True),
            [
                "net.ipv4.ip_forward",
                "net.ipv4.vs.expire_nodest_conn",
                "net.ipv4.conf.all.arp_announce",
            ],
        ),
        # IPv6 NAT, masqueraded: IPv6 forwarding and conntrack; IPv4 stays as it is
        (
            Needs(services=True, nat6=True, masquerade=True),
            [
                "net.ipv6.conf.all.forwarding",
                "net.ipv4.vs.conntrack",
                "net.ipv4.vs.expire_nodest_conn",
            ],
        ),
        (
            Needs(services=True, persistence=True),
            ["net.ipv4.vs.expire_nodest_conn", "net.ipv4.vs.expire_quiescent_template"],
        ),
    ],
)
def test_only_what_the_programmed_services_need(needs: Needs, chosen: list[str]) -> None:
    assert names(needed(needs, "6.1.0-56-amd64")) == chosen


def test_active_active_directors_with_consistent_hashing_go_sloppy_and_sync_speaks_v1() -> None:
    """sloppy_tcp only where a mid-stream packet can find its real server again (mh, sh on a
    node that peers over BGP): elsewhere it would only create entries for stray packets."""
    active = Needs(services=True, consistent_hashing=True, connection_sync=True)
    assert names(needed(active, "6.1.0")) == [
        "net.ipv4.vs.expire_nodest_conn",
        "net.ipv4.vs.sloppy_tcp",
        "net.ipv4.vs.sloppy_sctp",
        "net.ipv4.vs.schedule_icmp",
        "net.ipv4.vs.sync_version",
    ]
    for item in needed(active, "6.1.0"):
        assert len(item.reason) > 30, item


def test_the_planner_asks_for_sloppy_tcp_only_on_active_active_hashing_directors() -> None:
    from ipvs_agent.desired import Node, node_needs, plan
    from tests.unit.agent_helpers import vs

    def needs(scheduler: str, active: bool) -> Needs:
        v = vs(address="192.0.2.10", ports=[{"port": 80}], scheduler={"name": scheduler},
               backends={"static": [{"address": "198.51.100.11"}]})  # fmt: skip
        node = Node("n1", active_active=active)
        return node_needs(plan([v], {}, node), node)

    assert needs("mh", True).consistent_hashing
    assert needs("sh", True).consistent_hashing
    assert not needs("mh", False).consistent_hashing
    assert not needs("wlc", True).consistent_hashing


def test_no_node_wide_arp_ignore_any_more() -> None:
    """ARP for VIPs is filtered per address by the agent's nftables arp table instead."""
    assert not any("arp_ignore" in n for n in names(needed(EVERYTHING, "5.4.0")))


def test_interfaces_that_take_router_advertisements_keep_them() -> None:
    interfaces = {
        "all": ("1", "0"),
        "default": ("1", "0"),
        "lo": ("1", "0"),
        "eth0": ("1", "0"),  # SLAAC: would lose its default route once forwarding is on
        "eth1": ("0", "0"),  # static: ignores RAs anyway
        "eth2": ("2", "0"),  # already accepts them while forwarding
        "eth0.100": ("1", "0"),
    }
    assert [str(s) for s in keep_router_advertisements(interfaces)] == [
        "net.ipv6.conf.eth0.accept_ra=2",
        "net.ipv6.conf.eth0/100.accept_ra=2",
    ]


def test_every_sysctl_says_why() -> None:
    for item in needed(EVERYTHING, "5.4.0"):
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
    for item in needed(EVERYTHING, "5.4.0"):
        assert f"| `{item.name}` | {item.value} |" in section, item
