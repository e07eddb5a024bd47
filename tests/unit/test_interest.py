"""Which EndpointSlice changes wake a pass: only those of Services a VirtualServer on this node
uses (``desired.services_used``, published by each pass to ``cluster.Interest``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from ipvs_agent import cluster, trim
from ipvs_agent.agent import Agent, Settings
from ipvs_agent.desired import Node, services_used
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.snapshot import service_of
from ipvs_api.endpoints import SERVICE_NAME_LABEL
from tests.unit.agent_helpers import FakeHost, StubMirror, vs

EDGE = Node("n1", {"edge": "yes"})


def endpoint_slice(name: str, service: str | None, address: str, namespace: str = "ns") -> Any:
    labels = {SERVICE_NAME_LABEL: service} if service else {}
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}, "nodeName": "n2"}],
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
    }


def test_used_services_are_those_this_node_directs_or_may_be_a_real_server_of() -> None:
    elsewhere = {"matchLabels": {"edge": "no"}}
    ports = [{"port": 80}]
    servers = [
        vs("directed", ports=ports, backends={"service": {"name": "a"}}),
        vs("not-here", ports=ports, backends={"service": {"name": "b"}}, nodeSelector=elsewhere),
        # DR and TUN: an endpoint of the Service on this node makes it a real server.
        vs("dr", ports=ports, backends={"service": {"name": "c"}}, nodeSelector=elsewhere,
           forwarding={"method": "DR"}),
        vs("tun", namespace="other", ports=ports, backends={"service": {"name": "d"}},
           nodeSelector=elsewhere, forwarding={"method": "TUN"}),
        vs("static", ports=ports, backends={"static": [{"address": "192.0.2.1"}]}),
    ]  # fmt: skip
    assert services_used(servers, EDGE) == {("ns", "a"), ("ns", "c"), ("other", "d")}
    assert services_used(servers, Node("n1", {"edge": "no"})) == {
        ("ns", "a"),
        ("ns", "b"),
        ("ns", "c"),
        ("other", "d"),
    }


def test_a_slice_belongs_to_its_service_by_label() -> None:
    assert service_of(endpoint_slice("a-1", "a", "10.0.0.1")) == ("ns", "a")
    assert service_of(endpoint_slice("x", None, "10.0.0.1")) is None
    assert service_of(trim.endpoint_slice(endpoint_slice("a-1", "a", "10.0.0.1"))) == ("ns", "a")


def test_interest_before_and_after_a_pass_publishes() -> None:
    interest = cluster.Interest(service_of)
    used, other = endpoint_slice("a-1", "a", "10.0.0.1"), endpoint_slice("b-1", "b", "10.0.0.2")
    assert interest.wants(other), "before the first pass every slice matters"
    assert not interest.publish({("ns", "a")}), "nothing was missed"
    assert interest.wants(used) and interest.wants(None, used)
    assert not interest.wants(other)
    assert not interest.wants(endpoint_slice("x", None, "10.0.0.3")), "nobody's endpoints"
    assert interest.wants(other, used), "a slice moving into a used Service"
    # b changed unseen; the pass that starts using b may have read the mirror before that.
    assert interest.publish({("ns", "a"), ("ns", "b")})
    assert not interest.publish({("ns", "a"), ("ns", "b")}), "reported once"
    # A missed change is forgotten at the next publish: every later pass reads it.
    assert not interest.wants(endpoint_slice("c-1", "c", "10.0.0.4"))
    assert not interest.publish({("ns", "a")})
    assert not interest.publish({("ns", "a"), ("ns", "c")})


class ScriptedWatch:
    """Stands in for ``kubernetes.watch.Watch``: streams ``script``'s events and records after
    each one whether it woke a pass."""

    script: Iterator[dict[str, Any]]

    def stream(self, func: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        return self.script

    def stop(self) -> None:
        pass


def test_the_mirror_keeps_every_slice_but_only_used_ones_wake_a_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    changed, stop = threading.Event(), threading.Event()
    interest = cluster.Interest(service_of)
    woke: list[tuple[str, bool]] = []

    def listed(**kw: Any) -> Any:
        items = [endpoint_slice("a-1", "a", "10.0.0.1"), endpoint_slice("b-1", "b", "10.0.0.2")]
        return {"metadata": {"resourceVersion": "1"}, "items": items}

    def event(kind: str, obj: Any) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = str(len(woke) + 2)
        return {"type": kind, "raw_object": obj}

    def script() -> Iterator[dict[str, Any]]:
        assert changed.is_set(), "the list wakes the first pass"
        changed.clear()
        steps = [
            ("unpublished", event("MODIFIED", endpoint_slice("b-1", "b", "10.0.0.9"))),
            ("publish", None),
            ("unused", event("MODIFIED", endpoint_slice("b-1", "b", "10.0.0.3"))),
            ("new unused", event("ADDED", endpoint_slice("b-2", "b", "10.0.0.4"))),
            ("no service", event("ADDED", endpoint_slice("x", None, "10.0.0.5"))),
            ("used", event("MODIFIED", endpoint_slice("a-1", "a", "10.0.0.6"))),
            ("unused gone", event("DELETED", endpoint_slice("b-2", "b", "10.0.0.4"))),
            ("used gone", event("DELETED", endpoint_slice("a-1", "a", "10.0.0.6"))),
        ]
        try:
            for name, step in steps:
                if step is None:
                    assert not interest.publish({("ns", "a")})
                    continue
                yield step
                woke.append((name, changed.is_set()))
                changed.clear()
        finally:
            stop.set()  # a failed assertion here ends the run too (the mirror counts an error)

    ScriptedWatch.script = script()
    monkeypatch.setattr(cluster, "watch", SimpleNamespace(Watch=ScriptedWatch))
    mirror = cluster.Mirror(
        "endpointslices",
        listed,
        None,  # type: ignore[arg-type]  # every object is a dict: no deserialisation
        changed,
        transform=trim.endpoint_slice,
        interest=interest,
    )
    mirror.page = 0
    mirror.run(stop)
    assert woke == [
        ("unpublished", True),
        ("unused", False),
        ("new unused", False),
        ("no service", False),
        ("used", True),
        ("unused gone", False),
        ("used gone", True),
    ]
    assert mirror.unused_events == 4 and mirror.errors == 0
    kept = {o["metadata"]["name"]: o for o in mirror.items()}
    assert sorted(kept) == ["b-1", "x"], "unused slices are kept for the pass that uses them"
    assert kept["b-1"]["endpoints"][0]["addresses"] == ["10.0.0.3"]
    assert interest.publish({("ns", "b")}), "b changed since the last publish"


class SliceMirror(StubMirror):
    """A stub EndpointSlice mirror with an interest, as ``cluster.mirrors`` builds it."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__("endpointslices", items)
        self.interest = cluster.Interest(service_of)


def vs_obj(name: str, service: str, address: str) -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "ns", "generation": 1},
        "spec": {"ports": [{"port": 80}], "backends": {"service": {"name": service}}},
        "status": {"address": address},
    }


def test_each_pass_publishes_the_services_it_used_and_wakes_again_for_a_missed_change() -> None:
    slices = SliceMirror([endpoint_slice("a-1", "a", "10.0.0.1")])
    virtual_servers = StubMirror("virtualservers", [vs_obj("web", "a", "192.0.2.1")])
    agent = Agent(
        Settings("n1", resync_seconds=3600, settle_seconds=0),
        FakeKernel(),
        FakeHost(),
        [virtual_servers, slices, StubMirror("node", [{"metadata": {"name": "n1"}}])],
        threading.Event(),
    )
    agent.run_once("change")
    assert slices.interest.wants(endpoint_slice("a-1", "a", "10.0.0.2"))
    assert not slices.interest.wants(endpoint_slice("b-1", "b", "10.0.0.2"))
    assert not agent.changed.is_set()
    # The pass that starts using b may have read the slices before b's change arrived.
    virtual_servers._items.append(vs_obj("api", "b", "192.0.2.2"))
    agent.run_once("change")
    assert agent.changed.is_set(), "one more pass for the change it may have missed"
    assert slices.interest.wants(endpoint_slice("b-1", "b", "10.0.0.2"))
