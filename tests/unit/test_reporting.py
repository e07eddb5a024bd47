"""What the agent tells people: IPVSNode status, the status table, metrics."""

from __future__ import annotations

import ipaddress

from ipvs_agent.desired import Outcome, Role, State
from ipvs_agent.metrics import AgentMetrics
from ipvs_agent.model import (
    Dest,
    DestKey,
    DestStats,
    ForwardingMethod,
    KernelInfo,
    ObservedDest,
    ObservedService,
    Protocol,
    Service,
    ServiceFlag,
    ServiceKey,
    ServiceStats,
)
from ipvs_agent.show import render_table
from ipvs_agent.snapshot import read_virtual_servers
from ipvs_agent.status import node_status, same_report
from ipvs_api import schema

KERNEL = KernelInfo("1.2.1", 4096, "6.1.0-56-amd64", ("rr", "wlc"), ("gre", "ipip"))
HTTP = ServiceKey.for_address(ipaddress.ip_address("192.0.2.1"), Protocol.TCP, 80)
SSH = ServiceKey.for_address(ipaddress.ip_address("203.0.113.9"), Protocol.TCP, 22)


def test_node_status_lists_each_virtual_server_and_validates_against_the_crd() -> None:
    outcomes = {
        "shop/web": Outcome(
            State.PROGRAMMED,
            roles=frozenset({Role.DIRECTOR}),
            generation=4,
            real_servers=3,
            draining_real_servers=1,
        ),
        "shop/bad": Outcome(
            State.FAILED,
            "KernelError",
            "ipvsadm -A ...: File exists",
            frozenset({Role.DIRECTOR}),
            2,
        ),
    }
    status = node_status(outcomes, KERNEL, "0.1.0", "2026-11-26T16:00:00Z")
    assert [e["name"] for e in status["virtualServers"]] == ["bad", "web"]
    web = status["virtualServers"][1]
    assert web == {
        "namespace": "shop",
        "name": "web",
        "observedGeneration": 4,
        "roles": ["Director"],
        "state": "Programmed",
        "realServers": 3,
        "drainingRealServers": 1,
    }
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "shop/bad" in ready["message"]
    assert status["kernel"]["schedulers"] == ["rr", "wlc"]
    obj = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "IPVSNode",
        "metadata": {"name": "n"},
        "spec": {},
        "status": status,
    }
    _, errors = schema.validate("IPVSNode", obj)
    assert errors == []


def test_an_unchanged_report_is_not_sent_again() -> None:
    a = node_status({}, KERNEL, "0.1.0", "2026-11-26T16:00:00Z")
    b = node_status({}, KERNEL, "0.1.0", "2026-11-26T16:05:00Z", a["conditions"])
    assert same_report(a, b)
    assert b["conditions"] == a["conditions"], "transition times move only on change"
    c = node_status({"x/y": Outcome(State.PENDING)}, KERNEL, "0.1.0", "2026-11-26T16:06:00Z")
    assert not same_report(a, c)


def test_invalid_objects_become_outcomes_not_exceptions() -> None:
    good = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "ok", "namespace": "a"},
        "spec": {"ports": [{"port": 80}], "backends": {"service": {"name": "s"}}},
    }
    bad = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": "bad", "namespace": "a", "generation": 7},
        "spec": {
            "ports": [{"port": 80, "targetPort": 81}],
            "forwarding": {"method": "DR"},
            "backends": {"service": {"name": "s"}},
        },
    }
    vss, rejected = read_virtual_servers([good, bad, {"metadata": {"name": "junk"}, "spec": 3}])
    assert [v.name for v in vss] == ["ok"]
    assert rejected["a/bad"].state is State.FAILED and rejected["a/bad"].generation == 7
    assert "DR and TUN cannot remap ports" in rejected["a/bad"].message
    assert rejected["/junk"].reason == "InvalidSpec"


def _table() -> dict[ServiceKey, ObservedService]:
    web = ObservedService(
        Service(HTTP, "wlc", ServiceFlag.PERSISTENT, 300),
        {
            DestKey("198.51.100.11", 8080): ObservedDest(
                Dest(DestKey("198.51.100.11", 8080), ForwardingMethod.MASQ, 2),
                DestStats(
                    active_connections=5, inactive_connections=1, connections=40, bytes_in=1000
                ),
            )
        },
        ServiceStats(connections=40, packets_in=90, bytes_in=1000),
    )
    foreign = ObservedService(Service(SSH, "rr"), {})
    return {HTTP: web, SSH: foreign}


def test_status_table_names_services_and_marks_foreign_ones() -> None:
    text = render_table(_table(), {HTTP: "shop/web"}, KERNEL)
    lines = text.splitlines()
    assert lines[0] == "IP Virtual Server version 1.2.1 (size=4096)"
    web = next(line for line in lines if line.startswith("TCP  192.0.2.1:80"))
    assert "wlc persistent 300" in web and web.endswith("shop/web")
    assert "  -> 198.51.100.11:8080" in text and "Masq    2      5          1" in text
    assert next(line for line in lines if "203.0.113.9:22" in line).endswith(
        "(not managed by ipvs-operator)"
    )


def test_metrics_export_owned_services_only_with_kubernetes_names() -> None:
    m = AgentMetrics()
    m.table.update(_table(), {HTTP: "shop/web"})
    text = m.exposition().decode()
    assert (
        'ipvs_virtual_service_connections_total{address="192.0.2.1",fwmark="",'
        'namespace="shop",port="80",protocol="TCP",virtualserver="web"} 40.0'
    ) in text
    assert 'real_server="198.51.100.11:8080"' in text
    assert "ipvs_real_server_active_connections{" in text
    assert "203.0.113.9" not in text
