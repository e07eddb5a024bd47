"""The kernel table's /metrics text: written by the agent itself, equal to prometheus_client's."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest

from ipvs_agent.metrics import AgentMetrics, TableCollector
from ipvs_agent.model import (
    AddressFamily,
    Dest,
    DestKey,
    DestStats,
    ObservedDest,
    ObservedService,
    ObservedTable,
    Service,
    ServiceKey,
    ServiceStats,
)


def table() -> tuple[ObservedTable, dict[ServiceKey, str]]:
    web = ServiceKey(AddressFamily.INET, 6, "192.0.2.10", 80)
    dns = ServiceKey(AddressFamily.INET6, 17, "2001:db8::53", 53)
    mark = ServiceKey.for_fwmark(AddressFamily.INET, 7)
    foreign = ServiceKey(AddressFamily.INET, 6, "192.0.2.99", 22)
    big = 12_345_678_901_234  # Go's float format switches to an exponent
    observed: ObservedTable = {
        web: ObservedService(
            Service(web),
            {
                DestKey("198.51.100.1", 8080): ObservedDest(
                    Dest(DestKey("198.51.100.1", 8080), weight=3),
                    DestStats(1, 2, 0, 3, 4, 5, 6, big),
                ),
                DestKey("198.51.100.2", 8080): ObservedDest(
                    Dest(DestKey("198.51.100.2", 8080), weight=0)
                ),
            },
            ServiceStats(9, 8, 7, 6, big),
        ),
        dns: ObservedService(
            Service(dns),
            {DestKey("2001:db8::1", 53): ObservedDest(Dest(DestKey("2001:db8::1", 53)))},
        ),
        mark: ObservedService(Service(mark), {}),
        foreign: ObservedService(Service(foreign), {}),
    }
    owners = {web: "shop/web", dns: "infra/dns", mark: 'odd/na"me\\x'}
    return observed, owners


def reference(collector: TableCollector) -> bytes:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry)


def test_render_is_what_prometheus_client_writes_byte_for_byte() -> None:
    collector = TableCollector()
    assert collector.render() == reference(collector)  # empty: the families alone
    collector.update(*table())
    assert collector.render() == reference(collector)
    assert b'virtualserver="na\\"me\\\\x"' in collector.render()  # label values escaped
    assert b"192.0.2.99" not in collector.render()  # another program's service


def test_unchanged_services_are_written_once_and_a_change_is_seen() -> None:
    collector = TableCollector()
    observed, owners = table()
    collector.update(observed, owners)
    first = collector.render()
    assert collector.render() is first, "the same table: the same text"
    web = next(k for k in observed if k.port == 80)
    dns = next(k for k in observed if k.port == 53)
    before, kept = collector._services[web][2], collector._services[dns][2]
    changed = dict(observed)
    changed[web] = replace(observed[web], stats=ServiceStats(10, 8, 7, 6, 5))
    collector.update(changed, owners)
    text = collector.render()
    assert text != first and text == reference(collector)
    assert collector._services[web][2] is not before
    assert collector._services[dns][2] is kept, "an unchanged service is not written again"
    # A new owner name for the same service object is written anew.
    collector.update(changed, {**owners, dns: "infra/resolver"})
    assert b'virtualserver="resolver"' in collector.render()


def test_the_page_holds_the_registry_and_the_table() -> None:
    metrics = AgentMetrics()
    metrics.table.update(*table())
    page = metrics.exposition().decode()
    assert "ipvs_agent_reconcile_duration_seconds_count" in page
    assert 'ipvs_real_server_weight{address="192.0.2.10"' in page
    assert page.count("# TYPE ipvs_real_server_weight gauge") == 1
