"""What kopf's indexes keep, how the operator reads them, and what it asks of kopf per event.

kopf runs every index handler of a resource, each through its whole handler machinery, on every
watch event of that resource; so each resource has one index, and the lookups of several kinds
(a VirtualServer by name, by owning Service, by backend Service) are keys of that one index.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import kopf

from ipvs_api import constants
from ipvs_operator import handlers, views
from ipvs_operator.controller import Settings
from ipvs_operator.run import NoDiffBase, kopf_settings
from tests.unit.test_operator_status import report_parses


def vs_body(name: str, owner: str | None, backend: str | None) -> dict[str, Any]:
    labels = {constants.LABEL_SERVICE_NAME: owner} if owner else {}
    spec: dict[str, Any] = {"ports": [{"port": 80}]}
    if backend:
        spec["backends"] = {"service": {"name": backend}}
    return {
        "apiVersion": constants.API_VERSION,
        "kind": "VirtualServer",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": f"uid-{name}",
            "labels": labels,
            "managedFields": [{"manager": "x"}],
        },
        "spec": spec,
        "status": {"address": "192.0.2.1"},
    }


def node_body(name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": constants.API_VERSION,
        "kind": "IPVSNode",
        "metadata": {"name": name},
        "status": {"virtualServers": entries},
    }


def index_of(bodies: list[dict[str, Any]], entries: Any) -> dict[Any, list[Any]]:
    """What kopf's index holds: every key any object gave, with each object's value."""
    index: dict[Any, list[Any]] = {}
    for body in bodies:
        for key, value in entries(body).items():
            index.setdefault(key, []).append(value)
    return index


def test_one_virtual_server_entry_serves_every_lookup_by_name_owner_and_backend() -> None:
    web = vs_body("web", owner="web", backend="web-pods")
    api = vs_body("api", owner=None, backend="web-pods")
    bare = vs_body("bare", owner=None, backend=None)
    entries = views.virtual_server_entries(web)
    assert set(entries) == {
        (views.VS_KEY, "shop", "web"),
        (views.BY_SERVICE, "shop", "web"),
        (views.BY_BACKEND, "shop", "web-pods"),
    }
    kept = entries[(views.VS_KEY, "shop", "web")]
    assert "managedFields" not in kept["metadata"]
    assert kept["status"] == {"address": "192.0.2.1"}

    read = views.IndexViews(
        {
            views.VIRTUAL_SERVERS: index_of([web, api, bare], views.virtual_server_entries),
            views.NODE_REPORTS: {},
            views.REPORT_SLICES: {},
        }
    )
    assert read.virtual_server("shop", "web") == kept
    assert read.virtual_server("shop", "nope") is None
    assert sorted(read.virtual_server_keys()) == [
        ("shop", "api"),
        ("shop", "bare"),
        ("shop", "web"),
    ]
    assert sorted(str(b["metadata"]["name"]) for b in read.virtual_servers()) == [
        "api",
        "bare",
        "web",
    ]
    assert read.owned_by_service("shop", "web") == ["web"]
    assert read.owned_by_service("shop", "web-pods") == []
    assert read.using_service("shop", "web-pods") == ["api", "web"]
    # A Service's name and a VirtualServer's are different key spaces of the one index.
    assert read.virtual_server("shop", "web-pods") is None


def test_one_ipvs_node_entry_gives_its_agent_and_its_director_reports() -> None:
    directing = {
        "namespace": "shop",
        "name": "web",
        "roles": ["Director"],
        "state": "Programmed",
        "observedGeneration": 3,
    }
    serving_only = {"namespace": "shop", "name": "api", "roles": ["RealServer"]}
    n1 = node_body("n1", [directing, serving_only])
    n2 = node_body("n2", [directing])
    idle = node_body("n3", [])
    # n1's report is big enough for a further slice; web is moving into it (generation 4).
    n1_slice = {
        "kind": "IPVSNodeReport",
        "metadata": {"name": "n1.1"},
        "spec": {"node": "n1"},
        "status": {
            "virtualServers": [
                {**directing, "observedGeneration": 4},
                {**directing, "name": "db"},
            ]
        },
    }
    read = views.IndexViews(
        {
            views.VIRTUAL_SERVERS: {},
            views.NODE_REPORTS: index_of([n1, n2, idle], views.ipvs_node_entries),
            views.REPORT_SLICES: index_of([n1_slice], views.report_slice_entries),
        }
    )
    assert read.agents() == ["n1", "n2", "n3"]
    reports = read.reports("shop", "web")
    assert sorted(reports) == ["n1", "n2"]
    assert (reports["n1"].state, reports["n1"].generation) == ("Programmed", 4)
    assert (reports["n2"].state, reports["n2"].generation) == ("Programmed", 3)
    assert sorted(read.reports("shop", "db")) == ["n1"]
    assert read.reports("shop", "api") == {}


def _registry() -> kopf.OperatorRegistry:
    app = handlers.App(Settings(), client=None, poster=None, time_left=lambda: math.inf)  # type: ignore[arg-type]
    return handlers.make_registry(app)


def test_each_resource_has_one_index_and_no_change_handlers_need_a_diff_base() -> None:
    registry = _registry()
    indexes = registry._indexing.get_all_handlers()
    selectors = [h.selector for h in indexes]
    assert len(selectors) == len(set(selectors)) == len(views.ALL)
    assert sorted(str(h.id) for h in indexes) == sorted(views.ALL)
    # The diff base is switched off (kopf_settings): it serves only change and daemon handlers.
    assert not registry._changing.get_all_handlers()
    assert not registry._spawning.get_all_handlers()
    assert isinstance(kopf_settings().persistence.diffbase_storage, NoDiffBase)


def test_no_diff_base_keeps_nothing() -> None:
    storage = NoDiffBase()
    body = kopf.Body({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}})
    assert storage.build(body=body) == {}
    assert storage.fetch(body=body) is None
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=storage.build(body=body))
    assert not patch


def test_a_report_object_is_parsed_once_for_its_index_and_its_event_handler(
    monkeypatch: Any,
) -> None:
    """The IPVSNode's index handler and event handler share the registry's ReportReader:
    kopf calls both with the event's one body, and a report holds up to some 1700 entries."""
    parsed = report_parses(monkeypatch)
    app = handlers.App(Settings(), client=None, poster=None, time_left=lambda: math.inf)  # type: ignore[arg-type]
    reader = views.ReportReader()
    registry = handlers.make_registry(app, reader)
    handed: list[Any] = []

    class Controller:
        def report_changed(self, node: str, source: str, listed: Any, **_: Any) -> None:
            handed.append(listed)

        async def sessions_changed(self, *_: Any, **__: Any) -> None:
            pass

    app._controller = Controller()  # type: ignore[assignment]
    entry = {"namespace": "shop", "name": "web", "roles": ["Director"], "state": "Programmed"}
    raw: Any = node_body("n1", [entry])
    body = kopf.Body(raw)
    (index,) = [h for h in registry._indexing.get_all_handlers() if h.id == views.NODE_REPORTS]
    (event,) = [h for h in registry._watching.get_all_handlers() if h.id.endswith(".ipvs_node")]
    index_fn: Any = index.fn
    event_fn: Any = event.fn
    entries = asyncio.run(index_fn(body=body))
    assert len(reader) == 1  # held for the event handler
    asyncio.run(event_fn(name="n1", body=body, event={"type": "MODIFIED", "object": raw}))
    assert parsed == [id(body)]
    # Nothing is held after the event handler took it.
    assert len(reader) == 0
    assert handed == [{("shop", "web"): entries[views.report_key("shop", "web")]}]
