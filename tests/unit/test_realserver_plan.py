"""The node as a real server of DR and TUN services: the pure plan, and the shell's bookkeeping.

The planner decides which network namespaces of this node (its own, or a pod's) hold which
VIPs and tunnels, and leaves out DR real servers the director cannot reach on-link. The shell's
parts that need no kernel — reading route answers, finding namespaces by address, choosing what
to set up and what to undo — run here with fakes; tests/kernel/test_realserver_agent.py proves
them with real connections.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.exceptions import NetlinkError

from ipvs_agent import system
from ipvs_agent.desired import (
    NODE_NETNS,
    NOT_ON_LINK,
    Node,
    Outcome,
    RealServerNetns,
    Role,
    Route,
    State,
    dr_destinations,
    plan,
)
from ipvs_agent.host import routes
from ipvs_agent.host._netns import HostError
from ipvs_agent.host.podnetns import Ident, NetnsInfo, PodNamespaces
from ipvs_agent.host.realserver import Decap, RealServerChanges, RealServerSpec
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.model import IPAddress, TunnelType
from ipvs_agent.reconciler import REAL_SERVER_SETUP_FAILED, Memory, reconcile
from ipvs_agent.snapshot import Snapshot, index_endpoints, node_addresses, node_from, take
from tests.unit.agent_helpers import FakeHost, vs

ip = ipaddress.ip_address
VIP = "203.0.113.10"
NODE = Node("node-a", {}, addresses=frozenset({ip("192.0.2.11")}))
DIRECTORS = {"matchLabels": {"director": "true"}}


def eps(*endpoints: tuple[str, str | None], ready: bool = True, **cond: bool) -> dict[str, Any]:
    """A slice of Service ``web`` in namespace ``ns``: (address, nodeName) endpoints."""
    family = "IPv6" if ":" in endpoints[0][0] else "IPv4"
    return {
        "metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": family,
        "endpoints": [
            {"addresses": [a], "nodeName": n, "conditions": {"ready": ready, **cond}}
            for a, n in endpoints
        ],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }


def tun(kind: str = "ipip", port: int | None = None) -> dict[str, Any]:
    tunnel: dict[str, Any] = {"type": kind}
    if port:
        tunnel["port"] = port
    return {"method": "TUN", "tunnel": tunnel}


# ---------------------------------------------------------------- the plan


def test_a_static_dr_real_server_at_a_node_address_prepares_the_node_itself() -> None:
    v = vs(
        address=VIP,
        ports=[{"port": 443}],
        forwarding={"method": "DR"},
        nodeSelector=DIRECTORS,
        backends={"static": [{"address": "192.0.2.11"}, {"address": "192.0.2.12"}]},
    )
    p = plan([v], {}, NODE)
    assert p.real_servers == {NODE_NETNS: RealServerSpec(frozenset({ip(VIP)}))}
    assert p.real_server_owners == {NODE_NETNS: frozenset({"ns/web"})}
    # Not selected as a director: a real server only, no IPVS service, no VIP on ipvs0.
    assert p.outcomes["ns/web"] == Outcome(
        State.PROGRAMMED, roles=frozenset({Role.REAL_SERVER}), generation=1
    )
    assert p.table == {} and p.addresses == frozenset()


def test_a_director_that_is_also_a_real_server_has_both_roles() -> None:
    v = vs(
        address=VIP,
        ports=[{"port": 443}],
        forwarding={"method": "DR"},
        backends={"static": [{"address": "192.0.2.11"}]},
    )
    p = plan([v], {}, NODE)
    assert p.outcomes["ns/web"].roles == {Role.DIRECTOR, Role.REAL_SERVER}
    assert len(p.table) == 1 and NODE_NETNS in p.real_servers


def test_tun_endpoints_on_this_node_go_to_the_node_or_to_each_pod() -> None:
    v = vs(
        address=VIP,
        ports=[{"port": 80}],
        forwarding=tun("gue", 6080),
        nodeSelector=DIRECTORS,
        backends={"service": {"name": "web"}},
    )
    slices = index_endpoints(
        [
            eps(
                ("192.0.2.11", "node-a"),  # host network: the node's own address
                ("10.1.0.5", "node-a"),  # a pod here
                ("10.1.0.6", "node-a"),
                ("10.2.0.7", "node-b"),  # another node's pod
                ("10.1.0.9", None),  # no node: never ours
            )
        ]
    )
    p = plan([v], slices, NODE)
    assert p.real_server_targets() == [
        NODE_NETNS,
        RealServerNetns(ip("10.1.0.5")),
        RealServerNetns(ip("10.1.0.6")),
    ]
    pod = p.real_servers[RealServerNetns(ip("10.1.0.5"))]
    assert pod == RealServerSpec(
        frozenset({ip(VIP)}), frozenset({Decap(TunnelType.GUE, ip("10.1.0.5"), 6080)})
    )
    assert p.real_servers[NODE_NETNS].decap == {Decap(TunnelType.GUE, ip("192.0.2.11"), 6080)}


def test_a_pod_serving_two_virtual_servers_gets_the_union() -> None:
    common: dict[str, Any] = {
        "ports": [{"port": 80}],
        "nodeSelector": DIRECTORS,
        "backends": {"service": {"name": "web"}},
    }
    a = vs("a", address="203.0.113.10", forwarding=tun("ipip"), **common)
    b = vs("b", address="203.0.113.11", forwarding=tun("gre"), **common)
    c = vs("c", address="203.0.113.12", forwarding={"method": "DR"}, **common)
    nat = vs("nat", address="203.0.113.13", **common)
    p = plan([a, b, c, nat], index_endpoints([eps(("10.1.0.5", "node-a"))]), NODE)
    pod = RealServerNetns(ip("10.1.0.5"))
    assert p.real_servers[pod].vips == {ip("203.0.113.10"), ip("203.0.113.11"), ip("203.0.113.12")}
    assert {d.type for d in p.real_servers[pod].decap} == {TunnelType.IPIP, TunnelType.GRE}
    assert p.real_server_owners[pod] == {"ns/a", "ns/b", "ns/c"}, "NAT real servers need nothing"
    assert "ns/nat" not in p.outcomes


def test_endpoint_conditions_families_and_pending_addresses() -> None:
    dr = vs(
        address=VIP,
        ports=[{"port": 80}],
        forwarding={"method": "DR"},
        nodeSelector=DIRECTORS,
        backends={"service": {"name": "web"}},
    )
    gone = eps(("10.1.0.5", "node-a"), ready=False, serving=False, terminating=True)
    draining = eps(("10.1.0.6", "node-a"), ready=False, serving=True, terminating=True)
    starting = eps(("10.1.0.7", "node-a"), ready=False)
    v6 = eps(("2001:db8:1::5", "node-a"))  # DR never crosses families
    p = plan([dr], index_endpoints([gone, draining, starting, v6]), NODE)
    assert {t.pod_ip for t in p.real_servers} == {ip("10.1.0.6"), ip("10.1.0.7")}
    pending = vs(
        ports=[{"port": 80}],
        forwarding={"method": "DR"},
        backends={"service": {"name": "web"}},
    )
    assert plan([pending], index_endpoints([draining]), NODE).real_servers == {}


def test_a_firewall_mark_tun_service_decapsulates_without_a_vip() -> None:
    v = vs(
        fwmark=16,
        forwarding=tun("ipip"),
        nodeSelector=DIRECTORS,
        backends={"static": [{"address": "192.0.2.11"}]},
    )
    assert plan([v], {}, NODE).real_servers == {
        NODE_NETNS: RealServerSpec(
            frozenset(), frozenset({Decap(TunnelType.IPIP, ip("192.0.2.11"))})
        )
    }


def dr_service(*addresses: str) -> Any:
    return vs(
        address=VIP,
        ports=[{"port": 80}, {"port": 443}],
        forwarding={"method": "DR"},
        backends={"static": [{"address": a} for a in addresses]},
    )


def test_dr_real_servers_off_link_are_left_out_with_the_reason() -> None:
    v = dr_service("192.0.2.21", "198.51.100.20", "198.51.100.21")
    first = plan([v], {}, NODE)
    assert dr_destinations(first) == {ip("192.0.2.21"), ip("198.51.100.20"), ip("198.51.100.21")}
    facts = {
        ip("192.0.2.21"): Route(True, "dev eth0"),
        ip("198.51.100.20"): Route(False, "via 192.0.2.254 dev eth0"),
        # 198.51.100.21: no fact (lookup failed oddly): taken as on-link
    }
    p = plan([v], {}, NODE, facts)
    addresses = {d.key.address for s in p.table.values() for d in s.dests.values()}
    assert addresses == {"192.0.2.21", "198.51.100.21"}
    outcome = p.outcomes["ns/web"]
    assert (outcome.state, outcome.reason, outcome.real_servers) == (
        State.PROGRAMMED,
        NOT_ON_LINK,
        4,
    )
    assert "198.51.100.20 (via 192.0.2.254 dev eth0)" in outcome.message
    assert "left out" in outcome.message


def test_a_dr_virtual_server_with_no_on_link_real_server_fails_and_is_not_programmed() -> None:
    v = dr_service("198.51.100.20")
    p = plan([v], {}, NODE, {ip("198.51.100.20"): Route(False, "no route: Network is unreachable")})
    outcome = p.outcomes["ns/web"]
    assert (outcome.state, outcome.reason) == (State.FAILED, NOT_ON_LINK)
    assert (
        "no real server remains" in outcome.message and "Network is unreachable" in outcome.message
    )
    assert p.table == {} and p.addresses == frozenset()


def test_route_facts_never_touch_tun_or_nat() -> None:
    off = {ip("198.51.100.20"): Route(False, "via 192.0.2.254")}
    for forwarding in (tun("ipip"), {"method": "NAT"}):
        v = vs(
            address=VIP,
            ports=[{"port": 80}],
            forwarding=forwarding,
            backends={"static": [{"address": "198.51.100.20"}]},
        )
        assert plan([v], {}, NODE, off) == plan([v], {}, NODE)
        assert dr_destinations(plan([v], {}, NODE)) == frozenset()


ADDRESSES = [f"192.0.2.{i}" for i in range(11, 17)] + [f"10.1.0.{i}" for i in range(5, 9)]


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from(["NAT", "DR", "TUN"]),
    endpoints=st.lists(
        st.tuples(st.sampled_from(ADDRESSES), st.sampled_from(["node-a", "node-b", None])),
        min_size=1,
        max_size=8,
        unique_by=lambda e: e[0],
    ),
    node_addresses_=st.sets(st.sampled_from(ADDRESSES[:6])),
    off_link=st.sets(st.sampled_from(ADDRESSES)),
    director=st.booleans(),
)
def test_real_server_part_and_on_link_facts_hold_for_any_input(
    method: str,
    endpoints: list[tuple[str, str | None]],
    node_addresses_: set[str],
    off_link: set[str],
    director: bool,
) -> None:
    forwarding: dict[str, Any] = {"method": method} if method != "TUN" else tun("ipip")
    v = vs(
        address=VIP,
        ports=[{"port": 80}],
        forwarding=forwarding,
        nodeSelector={} if director else DIRECTORS,
        backends={"service": {"name": "web"}},
    )
    node = Node("node-a", {}, addresses=frozenset(ip(a) for a in node_addresses_))
    facts = {
        ip(a): Route(a not in off_link, "" if a not in off_link else "via gw") for a in ADDRESSES
    }
    p = plan([v], index_endpoints([eps(*endpoints)]), node, facts)
    here = {ip(a) for a, n in endpoints if n == "node-a"}
    if method == "NAT":
        assert p.real_servers == {}
    else:
        # exactly this node's endpoints, each in the node's namespace or its own pod's
        expected = {NODE_NETNS if a in node.addresses else RealServerNetns(a) for a in here}
        assert set(p.real_servers) == expected
        for spec in p.real_servers.values():
            assert spec.vips == {ip(VIP)}
            assert bool(spec.decap) == (method == "TUN")
    in_table = {d.key.address for s in p.table.values() for d in s.dests.values()}
    if method == "DR":
        assert not in_table & off_link
    outcome = p.outcomes.get("ns/web")
    if director:
        assert outcome is not None and Role.DIRECTOR in outcome.roles
        all_off = method == "DR" and {a for a, _ in endpoints} <= off_link
        assert (outcome.state is State.FAILED) == all_off
        assert (outcome.reason == NOT_ON_LINK) == (
            method == "DR" and bool({a for a, _ in endpoints} & off_link)
        )
    if p.real_servers:
        assert outcome is not None and Role.REAL_SERVER in outcome.roles


def test_node_addresses_come_from_the_node_status() -> None:
    obj = {
        "metadata": {"labels": {"a": "b"}},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "192.0.2.11"},
                {"type": "InternalIP", "address": "2001:db8:5e::11"},
                {"type": "Hostname", "address": "node-a"},
                "junk",
            ]
        },
    }
    assert node_addresses(obj) == {ip("192.0.2.11"), ip("2001:db8:5e::11")}
    node = node_from(obj, "node-a", None, [ip("192.0.2.99")])
    assert node.addresses == {ip("192.0.2.11"), ip("2001:db8:5e::11"), ip("192.0.2.99")}
    assert node_from(None, "x", None).addresses == frozenset()


# ---------------------------------------------------------------- the reconcile pass


class RealServerFakeHost(FakeHost):
    """FakeHost with the real-server side: canned routes, recorded setups, canned errors."""

    def __init__(self, facts: Mapping[IPAddress, Route] | None = None) -> None:
        super().__init__()
        self.facts = dict(facts or {})
        self.asked: list[set[IPAddress]] = []
        self.synced: list[dict[RealServerNetns, RealServerSpec]] = []
        self.errors: dict[RealServerNetns, str] = {}

    def routes(self, addresses: set[IPAddress]) -> Mapping[IPAddress, Route]:
        self.asked.append(set(addresses))
        return {a: self.facts[a] for a in addresses if a in self.facts}

    def sync_real_servers(
        self, wanted: Mapping[RealServerNetns, RealServerSpec]
    ) -> Mapping[RealServerNetns, str]:
        self.synced.append(dict(wanted))
        return {t: e for t, e in self.errors.items() if t in wanted}


def vs_obj(method: str, *static: str, selector: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "web", "namespace": "ns", "generation": 3},
        "spec": {
            "address": VIP,
            "ports": [{"port": 80}],
            "forwarding": {"method": method},
            "nodeSelector": selector or {},
            "backends": {"static": [{"address": a} for a in static]},
        },
    }


def snap(*objects: dict[str, Any]) -> Snapshot:
    return take(objects, [], NODE)


def test_the_pass_asks_routes_for_dr_only_and_plans_without_off_link_ones() -> None:
    host = RealServerFakeHost({ip("198.51.100.20"): Route(False, "via 192.0.2.254 dev eth0")})
    kernel = FakeKernel()
    result = reconcile(snap(vs_obj("DR", "192.0.2.21", "198.51.100.20")), kernel, host, Memory(), 0)
    assert host.asked == [{ip("192.0.2.21"), ip("198.51.100.20")}]
    (service,) = kernel.dump().values()
    assert [d.dest.key.address for d in service.dests.values()] == ["192.0.2.21"]
    assert result.outcomes["ns/web"].reason == NOT_ON_LINK
    reconcile(snap(vs_obj("NAT", "198.51.100.20")), kernel, host, Memory(), 1)
    assert len(host.asked) == 1, "no DR real server: no lookup"


def test_real_server_setup_runs_every_pass_and_failures_fail_the_virtual_servers() -> None:
    host = RealServerFakeHost()
    directors = {"matchLabels": {"director": "true"}}
    objects = vs_obj("DR", "192.0.2.11", selector=directors)
    result = reconcile(snap(objects), FakeKernel(), host, Memory(), 0)
    assert host.synced == [{NODE_NETNS: RealServerSpec(frozenset({ip(VIP)}))}]
    assert result.outcomes["ns/web"].state is State.PROGRAMMED
    host.errors[NODE_NETNS] = "cannot create dummy device ipvs-rs0: Operation not permitted"
    failed = reconcile(snap(objects), FakeKernel(), host, Memory(), 1).outcomes["ns/web"]
    assert (failed.state, failed.reason) == (State.FAILED, REAL_SERVER_SETUP_FAILED)
    assert failed.message == "node: cannot create dummy device ipvs-rs0: Operation not permitted"
    reconcile(snap(), FakeKernel(), host, Memory(), 2)
    assert host.synced[-1] == {}, "nothing to serve: the host undoes its setup"
    reconcile(snap(objects), FakeKernel(), host, Memory(), 3, dry_run=True)
    assert len(host.synced) == 3, "a dry run sets nothing up"


def test_a_setup_failure_adds_to_a_director_failure() -> None:
    host = RealServerFakeHost({ip("192.0.2.11"): Route(False, "no route: Network is unreachable")})
    host.errors[NODE_NETNS] = "boom"
    outcome = reconcile(snap(vs_obj("DR", "192.0.2.11")), FakeKernel(), host, Memory(), 0).outcomes[
        "ns/web"
    ]
    assert (outcome.state, outcome.reason) == (State.FAILED, NOT_ON_LINK)
    assert outcome.message.endswith("; node: boom")


# ---------------------------------------------------------------- routes


class Msg(dict[str, Any]):
    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def link(name: str, flags: int = 0x1) -> Msg:
    return Msg({"IFLA_IFNAME": name}, flags=flags)


@pytest.mark.parametrize(
    ("msg", "dev", "expected"),
    [
        (Msg({"RTA_OIF": 2}, type=1), link("eth0"), Route(True, "dev eth0")),
        (Msg({"RTA_OIF": 1}, type=2), link("lo", 0x9), Route(True, "a local address")),
        (
            Msg({"RTA_GATEWAY": "192.0.2.254", "RTA_OIF": 2}, type=1),
            link("eth0"),
            Route(False, "via 192.0.2.254 dev eth0"),
        ),
        (
            Msg({"RTA_VIA": {"addr": "fe80::1"}, "RTA_OIF": 2}, type=1),
            link("eth0"),
            Route(False, "via fe80::1 dev eth0"),
        ),
        (
            Msg({"RTA_OIF": 5}, type=1),
            link("wg0", 0x1 | 0x10 | 0x80),
            Route(False, "dev wg0 has no L2 neighbours (a tunnel or NOARP device)"),
        ),
        (Msg({}, type=6), None, Route(False, "no usable route (route type 6)")),
    ],
)
def test_route_facts_from_kernel_answers(msg: Msg, dev: Msg | None, expected: Route) -> None:
    assert routes.route_fact(msg, dev) == expected


class FakeRtnl:
    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.link_gets = 0

    def route(self, cmd: str, dst: str) -> list[Msg]:
        answer = self.answers[dst]
        if isinstance(answer, NetlinkError):
            raise answer
        return [answer]

    def link(self, cmd: str, index: int) -> list[Msg]:
        self.link_gets += 1
        return [link(f"eth{index}")]


def test_lookup_asks_once_per_address_and_maps_errors() -> None:
    rtnl = FakeRtnl(
        {
            "192.0.2.21": Msg({"RTA_OIF": 2}, type=1),
            "192.0.2.22": Msg({"RTA_OIF": 2}, type=1),
            "198.51.100.20": NetlinkError(errno.ENETUNREACH),
            "198.51.100.21": NetlinkError(errno.ENOBUFS),
        }
    )
    facts = routes.lookup(rtnl, [ip(a) for a in rtnl.answers])
    assert facts == {
        ip("192.0.2.21"): Route(True, "dev eth2"),
        ip("192.0.2.22"): Route(True, "dev eth2"),
        ip("198.51.100.20"): Route(False, "no route: Network is unreachable"),
    }
    assert rtnl.link_gets == 1, "devices are looked up once"


# ---------------------------------------------------------------- pod namespaces


class FakeNamespaces:
    """Namespaces as the lister and prober see them; counts how often each is entered."""

    def __init__(self) -> None:
        self.live: dict[Ident, str] = {}
        self.info: dict[str, NetnsInfo] = {}
        self.probes: list[str] = []

    def add(self, ino: int, path: str, *addresses: str, prepared: bool = False) -> None:
        self.live[(1, ino)] = path
        self.info[path] = NetnsInfo(frozenset(ip(a) for a in addresses), prepared)

    def lister(self, dirs: Sequence[str], proc: str | None) -> dict[Ident, str]:
        return dict(self.live)

    def prober(self, path: str) -> NetnsInfo:
        self.probes.append(path)
        if path not in self.info:
            raise FileNotFoundError(path)
        return self.info[path]


def index(fake: FakeNamespaces) -> PodNamespaces:
    return PodNamespaces(
        ["/run/netns"], None, own="/nonexistent", lister=fake.lister, prober=fake.prober
    )


def test_namespaces_are_read_once_and_found_by_address() -> None:
    fake = FakeNamespaces()
    fake.add(10, "/run/netns/cni-a", "10.1.0.5", "2001:db8:1::5")
    fake.add(11, "/run/netns/cni-b", "10.1.0.6", prepared=True)
    fake.add(12, "/run/netns/cni-c")  # CNI still setting it up
    pods = index(fake)
    pods.refresh()
    assert pods.locate([ip("10.1.0.5"), ip("2001:db8:1::5")]) == {
        ip("10.1.0.5"): [(1, 10)],
        ip("2001:db8:1::5"): [(1, 10)],
    }
    assert pods.prepared() == {(1, 11)}
    pods.refresh()
    assert sorted(fake.probes) == ["/run/netns/cni-a", "/run/netns/cni-b", "/run/netns/cni-c"]
    # An address not found: namespaces that had none are read again (the CNI finished).
    fake.info["/run/netns/cni-c"] = NetnsInfo(frozenset({ip("10.1.0.7")}))
    assert pods.locate([ip("10.1.0.7")]) == {ip("10.1.0.7"): [(1, 12)]}
    assert fake.probes.count("/run/netns/cni-c") == 2 and fake.probes.count("/run/netns/cni-a") == 1
    # A namespace that is gone is forgotten; a new one with the same address is read.
    del fake.live[(1, 10)]
    fake.add(13, "/proc/42/ns/net", "10.1.0.5")
    pods.refresh()
    assert pods.locate([ip("10.1.0.5")]) == {ip("10.1.0.5"): [(1, 13)]}


class FakeRealServerHost:
    """Stands in for RealServerHost: records what would be applied where."""

    calls: list[tuple[str | None, str, RealServerSpec | None]] = []
    fail: set[str] = set()

    roots: set[str] = set()

    def __init__(self, *, netns: str | None = None, sysctl_root: str = "", **_: Any) -> None:
        self.netns = netns
        self.interface = "ipvs-rs0"
        self.roots.add(sysctl_root)

    def __enter__(self) -> FakeRealServerHost:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None

    def sync(self, spec: RealServerSpec) -> RealServerChanges:
        if self.netns in self.fail:
            raise HostError("device busy")
        self.calls.append((self.netns, "sync", spec))
        return RealServerChanges()

    def clear(self) -> RealServerChanges:
        self.calls.append((self.netns, "clear", None))
        return RealServerChanges()


@pytest.fixture
def linux_host(monkeypatch: pytest.MonkeyPatch) -> tuple[system.LinuxHost, FakeNamespaces]:
    monkeypatch.setattr(system, "RealServerHost", FakeRealServerHost)
    FakeRealServerHost.calls = []
    FakeRealServerHost.fail = set()
    FakeRealServerHost.roots = set()
    fake = FakeNamespaces()
    return system.LinuxHost(pods=index(fake), sysctl_root="/host/proc/sys"), fake


def spec_of(vip: str) -> RealServerSpec:
    return RealServerSpec(frozenset({ip(vip)}))


def test_linux_host_sets_up_pods_by_address_and_undoes_the_rest(
    linux_host: tuple[system.LinuxHost, FakeNamespaces],
) -> None:
    host, fake = linux_host
    fake.add(10, "/run/netns/cni-a", "10.1.0.5", "2001:db8:1::5")  # a dual-stack pod
    fake.add(11, "/run/netns/cni-old", "10.1.0.6", prepared=True)  # left by an earlier agent
    fake.add(12, "/run/netns/cni-x", "10.1.0.8")
    fake.add(13, "/run/netns/cni-y", "10.1.0.8")
    a4, a6 = RealServerNetns(ip("10.1.0.5")), RealServerNetns(ip("2001:db8:1::5"))
    missing, twice = RealServerNetns(ip("10.1.0.7")), RealServerNetns(ip("10.1.0.8"))
    errors = host.sync_real_servers(
        {
            a4: spec_of("203.0.113.10"),
            a6: spec_of("2001:db8:f::10"),
            missing: spec_of("203.0.113.10"),
            twice: spec_of("203.0.113.10"),
        }
    )
    assert set(errors) == {missing, twice}
    assert "no network namespace on this node holds 10.1.0.7" in errors[missing]
    assert "is the node's /run/netns mounted" not in errors[missing]
    assert "/run/netns/cni-x, /run/netns/cni-y" in errors[twice]
    assert FakeRealServerHost.calls == [
        (None, "sync", RealServerSpec()),  # the node's own namespace serves nothing
        (
            "/run/netns/cni-a",
            "sync",
            RealServerSpec(frozenset({ip("203.0.113.10"), ip("2001:db8:f::10")})),
        ),
        ("/run/netns/cni-old", "clear", None),
    ]
    # Next pass: the pod no longer serves; then its namespace is gone (nothing to undo there).
    FakeRealServerHost.calls = []
    assert host.sync_real_servers({}) == {}
    assert FakeRealServerHost.calls == [
        (None, "sync", RealServerSpec()),
        ("/run/netns/cni-a", "clear", None),
    ]
    FakeRealServerHost.calls = []
    assert host.sync_real_servers({}) == {}
    assert FakeRealServerHost.calls == [(None, "sync", RealServerSpec())], "nothing left, no scan"
    assert FakeRealServerHost.roots == {"/host/proc/sys"}, "sysctls go through the mount"


def test_linux_host_reports_a_pod_it_could_not_set_up_and_skips_vanished_ones(
    linux_host: tuple[system.LinuxHost, FakeNamespaces],
) -> None:
    host, fake = linux_host
    fake.add(10, "/run/netns/cni-a", "10.1.0.5")
    fake.add(11, "/run/netns/cni-b", "10.1.0.6")
    a, b = RealServerNetns(ip("10.1.0.5")), RealServerNetns(ip("10.1.0.6"))
    FakeRealServerHost.fail = {"/run/netns/cni-b"}
    errors = host.sync_real_servers({a: spec_of("203.0.113.10"), b: spec_of("203.0.113.10")})
    assert errors == {b: "/run/netns/cni-b: device busy"}
    del fake.live[(1, 10)]  # the pod went away with its namespace
    FakeRealServerHost.calls = []
    host.sync_real_servers({})
    assert ("/run/netns/cni-a", "clear", None) not in FakeRealServerHost.calls
    assert ("/run/netns/cni-b", "clear", None) in FakeRealServerHost.calls, "half-done: undone"


def test_a_read_only_host_sets_nothing_up(
    linux_host: tuple[system.LinuxHost, FakeNamespaces],
) -> None:
    _, fake = linux_host
    host = system.LinuxHost(read_only=True, pods=index(fake))
    assert host.sync_real_servers({NODE_NETNS: spec_of("203.0.113.10")}) == {}
    assert FakeRealServerHost.calls == []


def test_namespaces_the_agent_may_not_enter_are_named_in_the_error(
    linux_host: tuple[system.LinuxHost, FakeNamespaces],
) -> None:
    host, fake = linux_host
    fake.live[(1, 20)] = "/proc/77/ns/net"  # no info: the prober raises

    def forbidden(path: str) -> NetnsInfo:
        raise PermissionError(1, "Operation not permitted")

    host.pods._prober = forbidden
    target = RealServerNetns(ip("10.1.0.5"))
    errors = host.sync_real_servers({target: spec_of("203.0.113.10")})
    assert "1 namespace(s) could not be entered" in errors[target]
    assert "/proc/77/ns/net: Operation not permitted" in errors[target]
    assert "CAP_SYS_ADMIN" in errors[target]


def test_the_operator_carries_a_directors_off_link_note_into_the_programmed_condition() -> None:
    from ipvs_operator.status import DirectorReport, programmed

    note = "DR reaches only real servers on the director's own L2 segment; ..."
    reports = {
        "a": DirectorReport("a", "Programmed", 3),
        "b": DirectorReport("b", "Programmed", 3, NOT_ON_LINK, note),
    }
    ok, reason, message, count = programmed(3, {"a", "b"}, reports)
    assert (ok, reason, count) == (True, "AllProgrammed", 2)
    assert message == f"programmed on 2 director(s); on b: {NOT_ON_LINK}: {note}"
    failed = {"a": DirectorReport("a", "Failed", 3, NOT_ON_LINK, "no real server remains")}
    assert programmed(3, {"a"}, failed)[:2] == (False, NOT_ON_LINK)


def test_no_visible_namespace_at_all_hints_at_the_missing_mount(
    linux_host: tuple[system.LinuxHost, FakeNamespaces],
) -> None:
    host, _ = linux_host
    target = RealServerNetns(ip("10.1.0.5"))
    errors = host.sync_real_servers({target: spec_of("203.0.113.10")})
    assert errors[target] == (
        "no network namespace on this node holds 10.1.0.5 (looked in /run/netns; no network "
        "namespace is visible there (is the node's /run/netns mounted?))"
    )


def test_the_in_cluster_agent_prepares_its_node_from_the_node_objects_addresses() -> None:
    """``ipvs-agent run``: the Node mirror's status.addresses make the node a real server, and
    its IPVSNode entry says so (with the director's own entry for a VirtualServer it directs)."""
    import threading

    from ipvs_agent.agent import Agent, Settings
    from tests.unit.agent_helpers import StubMirror

    host, reports = RealServerFakeHost(), []
    node = {
        "metadata": {"name": "node-a", "uid": "u1", "labels": {}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"}]},
    }
    directors = {"matchLabels": {"director": "true"}}
    confirmed = {**vs_obj("DR", "192.0.2.11", selector=directors), "status": {"address": VIP}}
    unconfirmed = vs_obj("DR", "192.0.2.11", selector=directors)
    unconfirmed["metadata"] = {**unconfirmed["metadata"], "name": "other"}
    unconfirmed["spec"] = {**unconfirmed["spec"], "address": "203.0.113.99"}
    agent = Agent(
        Settings("node-a"),
        FakeKernel(),
        host,
        [
            # An address the operator has not confirmed goes nowhere, not even onto real servers.
            StubMirror("virtualservers", [confirmed, unconfirmed]),
            StubMirror("endpointslices", []),
            StubMirror("node", [node]),
        ],
        threading.Event(),
        report=lambda status, uid: reports.append(status),
    )
    agent.run_once("change")
    assert host.synced == [{NODE_NETNS: RealServerSpec(frozenset({ip(VIP)}))}]
    (entry,) = reports[-1]["virtualServers"]
    assert (entry["roles"], entry["state"]) == (["RealServer"], "Programmed")


def test_dr_and_tun_endpoints_listening_on_another_port_are_refused_with_the_reason() -> None:
    """A Service whose targetPort differs from the VirtualServer's port: DR and TUN would
    deliver to a port nobody listens on. CEL cannot see it (it is in the EndpointSlices)."""
    remapped = {
        "metadata": {"namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }
    right = eps(("10.1.0.6", "node-b"))  # listens on 80
    for method in ("DR", "TUN"):
        forwarding: dict[str, Any] = {"method": "DR"} if method == "DR" else tun("ipip")
        v = vs(
            address=VIP,
            ports=[{"port": 80}],
            forwarding=forwarding,
            backends={"service": {"name": "web"}},
        )
        p = plan([v], index_endpoints([remapped, right]), NODE)
        (service,) = p.table.values()
        assert [d.key.address for d in service.dests.values()] == ["10.1.0.6"]
        outcome = p.outcomes["ns/web"]
        assert (outcome.state, outcome.reason, outcome.real_servers) == (
            State.PROGRAMMED,
            "PortRemapNotPossible",
            1,
        )
        assert "10.1.0.5 listens on 8080 for 80/TCP" in outcome.message
        only = plan([v], index_endpoints([remapped]), NODE).outcomes["ns/web"]
        assert (only.state, only.reason) == (State.FAILED, "PortRemapNotPossible")
        assert "no real server remains" in only.message
    nat = vs(address=VIP, ports=[{"port": 80}], backends={"service": {"name": "web"}})
    assert plan([nat], index_endpoints([remapped]), NODE).outcomes["ns/web"].reason == ""
    # Both kinds at once: off-link named first, both explained.
    dr = vs(
        address=VIP,
        ports=[{"port": 80}],
        forwarding={"method": "DR"},
        backends={"service": {"name": "web"}},
    )
    off = {ip("10.1.0.6"): Route(False, "via 192.0.2.254 dev eth0")}
    both = plan([dr], index_endpoints([remapped, right]), NODE, off).outcomes["ns/web"]
    assert (both.state, both.reason) == (State.FAILED, NOT_ON_LINK)
    assert "not on-link" in both.message and "listens on 8080" in both.message
