"""spec.healthCheck and spec.feedback offline: documented defaults, every valid shape reads.

The same valid shapes are applied to the real kube-apiserver by tests/api/test_contract.py
(VALID_SPECS), and the invalid ones are in tests/corpus/invalid.yaml.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipvs_agent.health.feedback import Law
from ipvs_api import constants, load
from ipvs_api.rules import parse_duration, parse_statuses
from ipvs_api.types import CheckType, FeedbackMode, OnFailure

STATIC = {"static": [{"address": "198.51.100.11"}]}

#: Valid specs (beyond examples/), one per check type and option worth a round trip.
VALID_SPECS: dict[str, dict[str, Any]] = {
    "tcp-defaults": {"ports": [{"port": 80}], "healthCheck": {"type": "TCP"}, "backends": STATIC},
    "http-everything": {
        "ports": [{"port": 80}],
        "healthCheck": {
            "type": "HTTP",
            "port": 8080,
            "interval": "500ms",
            "timeout": "250ms",
            "failureThreshold": 2,
            "successThreshold": 1,
            "initialState": "Down",
            "onFailure": "Remove",
            "http": {
                "path": "/healthz?full=1",
                "host": "www.example.com:8080",
                "statuses": "200-299,401",
                "bodyContains": "ok",
            },
        },
        "backends": {"static": [{"address": "198.51.100.11", "checkAddress": "198.51.100.111"}]},
    },
    "https-sni": {
        "ports": [{"port": 443}],
        "healthCheck": {"type": "HTTPS", "http": {"sni": "www.example.com"}},
        "backends": STATIC,
    },
    "udp-service-checked-on-tcp": {
        "ports": [{"port": 514, "protocol": "UDP"}],
        "healthCheck": {"type": "TCP", "port": 601},
        "backends": STATIC,
    },
    "udp-no-reply-needed": {
        "ports": [{"port": 514, "protocol": "UDP"}],
        "healthCheck": {"type": "UDP", "udp": {"send": "<14>health", "requireReply": False}},
        "backends": STATIC,
    },
    "dns-root-soa": {
        "ports": [{"port": 53, "protocol": "UDP"}],
        "healthCheck": {"type": "DNS", "interval": "1m30s", "dns": {"name": ".", "type": "SOA"}},
        "backends": STATIC,
    },
    "fwmark-checked-on-a-port": {
        "fwmark": 16,
        "healthCheck": {"type": "TCP", "port": 443},
        "backends": STATIC,
    },
    "feedback-of-service-endpoints": {
        "ports": [{"port": 80}],
        "feedback": {
            "agent": {"port": 3333, "send": "web\n"},
            "period": "1s",
            "timeout": "500ms",
            "gain": 8,
            "targetLoadPercent": 80,
            "scale": 4,
            "minWeight": 2,
            "thresholdPercent": 0,
            "blackout": "0s",
            "expiry": "30s",
        },
        "backends": {"service": {"name": "web"}},
    },
    "feedback-balance": {
        "ports": [{"port": 80}],
        "feedback": {"agent": {"port": 3333}, "mode": "Balance"},
        "backends": STATIC,
    },
}


def virtual_server(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {"name": "v", "namespace": "ns"},
        "spec": spec,
    }


@pytest.mark.parametrize("name", sorted(VALID_SPECS))
def test_valid_health_and_feedback_specs_read(name: str) -> None:
    load.virtual_server(virtual_server(VALID_SPECS[name]))


def test_health_check_defaults_are_the_documented_ones() -> None:
    vs = load.virtual_server(virtual_server(VALID_SPECS["tcp-defaults"]))
    check = vs.spec.health_check
    assert check is not None
    assert check.type is CheckType.TCP and check.port is None
    assert (check.interval, check.timeout) == (5.0, 2.0)
    assert (check.failure_threshold, check.success_threshold) == (3, 2)
    assert check.initially_up and check.on_failure is OnFailure.QUIESCE
    assert vs.spec.feedback is None


def test_every_health_field_is_read() -> None:
    vs = load.virtual_server(virtual_server(VALID_SPECS["http-everything"]))
    check = vs.spec.health_check
    assert check is not None and check.http is not None
    assert (check.port, check.interval, check.timeout) == (8080, 0.5, 0.25)
    assert not check.initially_up and check.on_failure is OnFailure.REMOVE
    assert check.http.statuses == ((200, 299), (401, 401))
    assert check.http.host == "www.example.com:8080" and check.http.body_contains == "ok"
    assert vs.spec.backends.static[0].check_address == ipaddress.ip_address("198.51.100.111")
    udp = load.virtual_server(virtual_server(VALID_SPECS["udp-no-reply-needed"])).spec
    assert udp.health_check is not None and udp.health_check.udp is not None
    assert not udp.health_check.udp.require_reply
    dns = load.virtual_server(virtual_server(VALID_SPECS["dns-root-soa"])).spec.health_check
    assert dns is not None and dns.dns is not None
    assert (dns.dns.name, dns.dns.type, dns.interval) == (".", "SOA", 90.0)


def test_feedback_defaults_are_the_lvs_ones() -> None:
    vs = load.virtual_server(
        virtual_server(
            {"ports": [{"port": 80}], "feedback": {"agent": {"port": 3333}}, "backends": STATIC}
        )
    )
    fb = vs.spec.feedback
    assert fb is not None
    assert (fb.agent_port, fb.agent_send) == (3333, "")
    assert (fb.gain, fb.target, fb.scale, fb.min_weight) == (5, 0.95, 10, 1)
    assert (fb.period, fb.timeout, fb.blackout, fb.expiry, fb.threshold) == (5, 1, 10, 180, 0.15)
    assert fb.mode is FeedbackMode.TARGET
    balance = load.virtual_server(virtual_server(VALID_SPECS["feedback-balance"])).spec.feedback
    assert balance is not None and balance.mode is FeedbackMode.BALANCE
    assert Law.of(balance).balance and not Law.of(fb).balance


@given(
    st.lists(
        st.tuples(st.integers(0, 99999), st.sampled_from(["h", "m", "s", "ms"])),
        min_size=1,
        max_size=4,
    )
)
def test_durations_parse_as_go_would(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    assert parse_duration(text) == pytest.approx(sum(n * unit[u] for n, u in parts))


@pytest.mark.parametrize("text", ["", "5", "5 s", "1.5s", "-1s", "5us", "1h2m3s4ms5s"])
def test_what_is_not_a_duration(text: str) -> None:
    assert parse_duration(text) is None


def test_status_ranges() -> None:
    assert parse_statuses("200") == ((200, 200),)
    assert parse_statuses("200-299,401,500-503") == ((200, 299), (401, 401), (500, 503))
