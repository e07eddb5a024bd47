"""Prometheus metrics of health checks and feedback, registered next to the agent's own.

Probe latencies go to one histogram by check type (per-real-server histograms would multiply
series by buckets); per real server, gauges read from the checker at scrape time: up or down,
the last probe's latency, the feedback weight and load, and whether its agent went silent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ipvs_agent.health.checker import RealServerState

LABELS = ["namespace", "virtualserver", "real_server"]


class States(Protocol):
    def states(self) -> list[RealServerState]: ...


class HealthMetrics:
    """The checker's :class:`~ipvs_agent.health.checker.Observer`: counters and a histogram."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.probe_seconds = Histogram(
            "ipvs_agent_health_probe_duration_seconds",
            "Time of one health probe, by check type and result.",
            ["type", "result"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.transitions = Counter(
            "ipvs_agent_health_transitions",
            "Real servers that went down or came back up by their health check.",
            ["to"],
            registry=registry,
        )
        self.polls = Counter(
            "ipvs_agent_feedback_polls",
            "Feedback agent polls, by result (answered, or failed: refused, timed out, garbage).",
            ["result"],
            registry=registry,
        )

    def probed(self, kind: str, seconds: float, ok: bool) -> None:
        result = "success" if ok else "failure"
        self.probe_seconds.labels(type=kind, result=result).observe(seconds)

    def transition(self, up: bool) -> None:
        self.transitions.labels(to="up" if up else "down").inc()

    def polled(self, ok: bool) -> None:
        self.polls.labels(result="answered" if ok else "failed").inc()


def real_server_label(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}" if port else host


class RealServerCollector(Collector):
    """Per real server gauges, from the checker's state at scrape time."""

    def __init__(self, source: States) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "ipvs_agent_real_server_up",
            "1 while the real server passes its health check on this director, 0 while down.",
            labels=LABELS,
        )
        latency = GaugeMetricFamily(
            "ipvs_agent_real_server_probe_seconds",
            "Latency of the real server's last health probe from this director.",
            labels=LABELS,
        )
        weight = GaugeMetricFamily(
            "ipvs_agent_feedback_weight",
            "The weight dynamic feedback gives the real server (the configured one when none).",
            labels=LABELS,
        )
        load = GaugeMetricFamily(
            "ipvs_agent_feedback_load",
            "The load the real server's feedback agent last reported (0 idle, 1 saturated).",
            labels=LABELS,
        )
        stale = GaugeMetricFamily(
            "ipvs_agent_feedback_stale",
            "1 while the real server's feedback agent has been silent for its expiry.",
            labels=LABELS,
        )
        for row in self.source.states():
            namespace, _, name = row.virtual_server.partition("/")
            labels = [namespace, name, real_server_label(*row.real_server)]
            if row.up is not None:
                up.add_metric(labels, 1.0 if row.up else 0.0)
            if row.probe_seconds is not None:
                latency.add_metric(labels, row.probe_seconds)
            if row.weight is not None:
                weight.add_metric(labels, row.weight)
                stale.add_metric(labels, 1.0 if row.stale else 0.0)
            if row.load is not None:
                load.add_metric(labels, row.load)
        yield from (up, latency, weight, load, stale)


def register(registry: CollectorRegistry, source: States) -> HealthMetrics:
    """Add the health and feedback metrics to ``registry``; the checker's observer."""
    registry.register(RealServerCollector(source))
    return HealthMetrics(registry)
