"""The lab's pure helpers (tests/e2e/scenario.py): what it reads from ipvsadm, what it applies."""

from __future__ import annotations

from ipvs_api import load
from tests.e2e import scenario as sc


def test_parse_table_reads_services_methods_and_weights() -> None:
    lines = [
        "-A -t 203.0.113.10:80 -s wrr",
        "-a -t 203.0.113.10:80 -r 192.0.2.11:80 -m -w 3",
        "-a -t 203.0.113.10:80 -r 192.0.2.12:80 -m -w 0",
        "-A -t 203.0.113.20:80 -s mh -b flag-1",
        "-a -t 203.0.113.20:80 -r 192.0.2.13:80 -g -w 1",
        "-A -u 203.0.113.30:53 -s rr",
        "-a -u 203.0.113.30:53 -r 192.0.2.11:53 -i -w 1",
    ]
    table = sc.parse_table(lines)
    assert set(table) == {"203.0.113.10:80", "203.0.113.20:80"}  # TCP only
    assert table["203.0.113.10:80"].scheduler == "wrr"
    assert table["203.0.113.10:80"].dests == {"192.0.2.11": ("NAT", 3), "192.0.2.12": ("NAT", 0)}
    assert table["203.0.113.20:80"].dests == {"192.0.2.13": ("DR", 1)}


def test_the_lab_objects_are_valid_as_the_api_server_judges_them() -> None:
    for pool in sc.address_pools():
        load.address_pool(pool)
    for method in ("NAT", "DR", "TUN"):
        load.virtual_server(sc.virtual_server("x", sc.NAT_VIP, method=method, weights=(3, 2, 1)))


def test_endpoint_slice_conditions() -> None:
    body = sc.endpoint_slice("web", {"rs1": "ready", "rs3": "terminating"})
    assert body["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
    first, second = body["endpoints"]
    assert first["addresses"] == ["192.0.2.11"] and first["conditions"]["ready"] is True
    assert second["addresses"] == ["192.0.2.13"]
    assert second["conditions"] == {"ready": False, "serving": True, "terminating": True}
    assert {e["nodeName"] for e in body["endpoints"]} == {"lab-node"}
