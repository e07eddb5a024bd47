"""The chart's copies of the single sources, and its dashboard against the agent's metrics.

No helm and no API server here: these are the checks that fail first when someone edits
crds/ or rbac/ and forgets ``charts/sync.sh``, or renames a metric the dashboard plots.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from ipvs_agent.health import metrics as health_metrics
from ipvs_agent.health.checker import RealServerState
from ipvs_agent.metrics import AgentMetrics
from tests.apiserver.cluster import REPO_ROOT
from tests.chart.helm import CHART

SYNC = "run charts/sync.sh: the chart ships copies of crds/ and rbac/ (the one source)"


@pytest.mark.parametrize(
    ("source", "copy"),
    [(REPO_ROOT / "crds", CHART / "crds"), (REPO_ROOT / "rbac", CHART / "files" / "rbac")],
    ids=["crds", "rbac"],
)
def test_chart_copies_equal_their_source(source: Path, copy: Path) -> None:
    want = {p.name: p.read_bytes() for p in source.glob("*.yaml")}
    have = {p.name: p.read_bytes() for p in copy.glob("*.yaml")}
    assert want, f"{source} has no manifests"
    assert sorted(have) == sorted(want), SYNC
    for name in want:
        assert have[name] == want[name], f"{copy / name} differs from {source / name}: {SYNC}"


def test_chart_has_no_symlinks() -> None:
    """``helm package`` would not follow a link out of the chart: copies, not links."""
    links = [p for p in CHART.rglob("*") if p.is_symlink()]
    assert links == []


DASHBOARD = CHART / "files" / "dashboards" / "ipvs-agent.json"


class _Checker:
    """Stands in for the health checker: one real server checked and fed back."""

    def states(self) -> list[RealServerState]:
        return [RealServerState("ns/vs", ("198.51.100.11", 0), True, 0.01, 10, 0.5, False)]


class _Speaker:
    """Stands in for a layer-2 speaker: the collector only reads its counters."""

    elections = 0
    members: list[str] = []
    responder = None
    blind = False


class _BGPSpeaker:
    """Stands in for a BGP speaker: the collector reads its sessions and counters."""

    def __init__(self) -> None:
        from ipvs_agent.announce.bgp.speaker import Counters

        self.counters = Counters()

    def session_states(self) -> dict[str, str]:
        return {"r1": "Established"}

    def status(self) -> dict[str, list[str]]:
        return {"announced": []}


def exposed_series() -> dict[str, set[str]]:
    """Every series name the agent exports, with the label names it carries."""
    metrics = AgentMetrics()
    metrics.watch_speaker(_Speaker())  # the layer-2 families, as a speaker exports them
    metrics.watch_bgp(_BGPSpeaker())  # and the BGP ones
    # and the watches' skipped events, as ipvs-agent run registers them
    metrics.watch_mirrors([SimpleNamespace(name="endpointslices", interest=object())])
    health = health_metrics.register(metrics.registry, _Checker())  # as ipvs-agent run does
    for value in [*vars(metrics).values(), *vars(health).values()]:
        # A labelled metric shows its label names only once it has a child.
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            value.labels(*("x" for _ in value._labelnames))
    series: dict[str, set[str]] = {}
    for family in [*metrics.registry.collect(), *metrics.table.collect()]:  # as /metrics shows
        labels: set[str] = set()
        for sample in family.samples:
            labels |= set(sample.labels)
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "gauge": [""],
        }[family.type]
        for suffix in suffixes:
            series[family.name + suffix] = labels
    return series


def dashboard_queries(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from dashboard_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from dashboard_queries(item)


def test_dashboard_plots_only_metrics_the_agent_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    series = exposed_series()
    # The table collector's families only show labels once it has a table; its label names
    # are the module's own constants.
    from ipvs_agent.metrics import DEST_LABELS, SERVICE_LABELS

    for name in series:
        if name.startswith("ipvs_virtual_service_"):
            series[name] = set(SERVICE_LABELS)
        elif name.startswith("ipvs_real_server_"):
            series[name] = set(DEST_LABELS)
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 15
    used: set[str] = set()
    for query in queries:
        names = set(re.findall(r"\b(ipvs_[a-z0-9_]+)", query))
        assert names, f"no ipvs metric in {query!r}"
        for name in names:
            assert name in series, f"dashboard query uses {name}, which the agent never exports"
        for grouping in re.findall(r"by \(([^)]*)\)", query):
            for label in (x.strip() for x in grouping.split(",")):
                assert any(label in series[n] for n in names), f"{label!r} in {query!r}"
        used |= names
    families = {
        re.sub(r"_(total|bucket|sum|count)$", "", n) for n in series if not n.endswith("_sum")
    }
    plotted = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families - plotted == set(), "metrics the dashboard does not show"


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ipvs-agent"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for query in dashboard_queries(dashboard["panels"]):
        for variable in re.findall(r"\$([a-z_]+)", query):
            assert variable.startswith("__") or variable in variables, query
