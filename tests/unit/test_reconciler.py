"""The reconcile pass and the agent loop around it, with the in-memory kernel."""

from __future__ import annotations

import errno
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipvs_agent.agent import Agent, Settings
from ipvs_agent.desired import Node, State, plan
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.model import DestStats
from ipvs_agent.ops import OpKind
from ipvs_agent.reconciler import Memory, reconcile
from ipvs_agent.snapshot import take
from tests.unit.agent_helpers import FakeHost, StubMirror

NODE = Node("n1", {})


def vs_obj(name: str, address: str, port: int = 80, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "VirtualServer",
        "metadata": {"name": name, "namespace": "ns", "generation": 2},
        "spec": {
            "address": address,
            "ports": [{"port": port}],
            "backends": {"static": [{"address": "198.51.100.11"}, {"address": "198.51.100.12"}]},
            **spec,
        },
        "status": {"address": address},  # confirmed by the operator
    }


def test_ownership_is_recorded_before_creating_and_dropped_after_deleting() -> None:
    kernel, host = FakeKernel(), FakeHost()
    first = reconcile(take([vs_obj("a", "192.0.2.1")], [], NODE), kernel, host, Memory(), 0)
    (key,) = first.plan.table
    assert key in host.records[0], "recorded before the service was created"
    assert {str(a) for a in host.addresses} == {key.address}
    gone = reconcile(take([], [], NODE), kernel, host, Memory(), 1)
    assert [op.kind for op in gone.ops] == [OpKind.DEL_SERVICE]
    assert key in host.records[-2] and key not in host.records[-1]
    assert kernel.dump() == {} and host.addresses == set()


def test_a_kernel_error_fails_one_virtual_server_and_programs_the_rest() -> None:
    kernel, host = FakeKernel(), FakeHost()
    kernel.fail(lambda op: op.service.key.address == "192.0.2.2", errno.ENOMEM, "no memory")
    result = reconcile(
        take([vs_obj("a", "192.0.2.1"), vs_obj("b", "192.0.2.2")], [], NODE),
        kernel,
        host,
        Memory(),
        0,
    )
    assert result.outcomes["ns/a"].state is State.PROGRAMMED
    assert result.outcomes["ns/b"].state is State.FAILED
    assert result.outcomes["ns/b"].reason == "KernelError"
    assert "no memory" in result.outcomes["ns/b"].message
    kernel.clear_failures()
    retry = reconcile(
        take([vs_obj("a", "192.0.2.1"), vs_obj("b", "192.0.2.2")], [], NODE),
        kernel,
        host,
        Memory(),
        1,
    )
    assert retry.outcomes["ns/b"].state is State.PROGRAMMED, "retried on the next pass"


def test_dry_run_changes_nothing() -> None:
    kernel, host = FakeKernel(), FakeHost()
    result = reconcile(
        take([vs_obj("a", "192.0.2.1")], [], NODE), kernel, host, Memory(), 0, dry_run=True
    )
    assert [op.kind for op in result.ops] == [OpKind.ADD_SERVICE, OpKind.ADD_DEST, OpKind.ADD_DEST]
    assert kernel.dump() == {} and host.records == [] and host.addresses == set()


# Bad objects never take the agent down: random JSON in place of VirtualServers, and random
# valid-looking specs, always give outcomes.

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
spec_fields = st.fixed_dictionaries(
    {},
    optional={
        "address": st.sampled_from(["192.0.2.1", "2001:db8::1", "bogus", "127.0.0.1"]),
        "ipFamily": st.sampled_from(["IPv4", "IPv6", "IPv5"]),
        "fwmark": st.integers(-1, 5),
        "ports": st.lists(
            st.fixed_dictionaries(
                {"port": st.integers(0, 70000)},
                optional={
                    "protocol": st.sampled_from(["TCP", "UDP", "SCTP", "X"]),
                    "targetPort": st.one_of(
                        st.integers(0, 70000), st.sampled_from(["http", "BAD"])
                    ),
                },
            ),
            max_size=3,
        ),
        "scheduler": st.fixed_dictionaries(
            {"name": st.sampled_from(["rr", "wrr", "sh", "mh", "twos", "nope"])},
            optional={
                "flags": st.lists(st.sampled_from(["sh-port", "mh-fallback", "x"]), max_size=2)
            },
        ),
        "forwarding": st.fixed_dictionaries(
            {"method": st.sampled_from(["NAT", "DR", "TUN", "X"])},
            optional={
                "tunnel": st.fixed_dictionaries(
                    {"type": st.sampled_from(["ipip", "gue", "gre"])},
                    optional={
                        "port": st.integers(0, 70000),
                        "checksum": st.sampled_from(["nocsum", "csum", "remcsum"]),
                    },
                )
            },
        ),
        "persistence": st.fixed_dictionaries(
            {},
            optional={
                "timeoutSeconds": st.integers(0, 10),
                "ipv4PrefixLength": st.integers(0, 40),
                "engine": st.just("sip"),
            },
        ),
        "onePacketScheduling": st.booleans(),
        "backends": st.one_of(
            st.fixed_dictionaries({"service": st.fixed_dictionaries({"name": st.just("web")})}),
            st.fixed_dictionaries(
                {
                    "static": st.lists(
                        st.fixed_dictionaries(
                            {"address": st.sampled_from(["198.51.100.1", "2001:db8::2", "x"])},
                            optional={
                                "port": st.integers(0, 70000),
                                "weight": st.integers(-1, 70000),
                                "upperThreshold": st.integers(0, 9),
                                "lowerThreshold": st.integers(0, 9),
                            },
                        ),
                        max_size=3,
                    )
                }
            ),
            json_values,
        ),
        "trafficPolicy": st.sampled_from(["Cluster", "Local"]),
        "nodeSelector": json_values,
    },
)
endpoint_slices = st.lists(
    st.fixed_dictionaries(
        {
            "metadata": st.fixed_dictionaries(
                {
                    "namespace": st.just("ns"),
                    "labels": st.just({"kubernetes.io/service-name": "web"}),
                }
            ),
            "addressType": st.sampled_from(["IPv4", "IPv6", "FQDN"]),
            "endpoints": st.lists(
                st.fixed_dictionaries(
                    {
                        "addresses": st.lists(
                            st.sampled_from(["10.0.0.1", "2001:db8::9", "zz"]), max_size=2
                        ),
                        "conditions": st.fixed_dictionaries(
                            {},
                            optional={
                                "ready": st.booleans() | st.none(),
                                "serving": st.booleans(),
                                "terminating": st.booleans(),
                            },
                        ),
                        "nodeName": st.sampled_from(["n1", "n2"]),
                    }
                ),
                max_size=3,
            ),
            "ports": st.lists(
                st.fixed_dictionaries(
                    {"port": st.integers(1, 9), "name": st.sampled_from(["http", ""])}
                ),
                max_size=2,
            ),
        }
    ),
    max_size=2,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(spec_fields, json_values), max_size=4), endpoint_slices)
def test_random_objects_give_outcomes_never_exceptions(specs: list[Any], slices: list[Any]) -> None:
    objects = [
        {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "VirtualServer",
            "metadata": {"name": f"v{i}", "namespace": "ns"},
            "spec": spec,
        }
        for i, spec in enumerate(specs)
    ]
    kernel, host = FakeKernel(), FakeHost()
    # The node knows its kernel's schedulers, as the agent's does: a scheduler the kernel lacks
    # (twos on 6.1) is Unsupported in the plan, not a failed add that every pass retries.
    node = Node(NODE.name, NODE.labels, kernel.info())
    snap = take(objects, slices, node)
    p = plan(snap.virtual_servers, snap.endpoints, node)
    keys = set(p.outcomes) | set(snap.rejected)
    assert keys == {f"ns/v{i}" for i in range(len(specs))}, "every object gets an outcome"
    result = reconcile(snap, kernel, host, Memory(), 0)
    assert all(o.state in State for o in result.outcomes.values())
    assert reconcile(snap, kernel, host, Memory(), 1).ops == [], "one pass converges"


def _agent(vs_mirror: StubMirror, kernel: FakeKernel, reports: list[dict[str, Any]]) -> Agent:
    mirrors = [
        vs_mirror,
        StubMirror("endpointslices", []),
        StubMirror("node", [{"metadata": {"name": "n1", "uid": "u1"}}]),
    ]
    return Agent(
        Settings("n1", resync_seconds=0.05, settle_seconds=0),
        kernel,
        FakeHost(),
        mirrors,
        threading.Event(),
        report=lambda status, uid: reports.append(status),
    )


def test_the_agent_waits_for_every_mirror_before_touching_the_kernel() -> None:
    kernel, reports = FakeKernel(), []  # type: ignore[var-annotated]
    unsynced = StubMirror("virtualservers", [], synced=False)
    agent = _agent(unsynced, kernel, reports)
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    try:
        assert not agent.changed.wait(0.3)
        assert agent.passes == 0 and kernel.applied == [], "no pass before a full list"
        unsynced._items = [vs_obj("a", "192.0.2.1")]
        unsynced.synced.set()
        agent.changed.set()
        deadline = threading.Event()
        for _ in range(100):
            if agent.passes:
                break
            deadline.wait(0.05)
        assert agent.passes >= 1 and kernel.dump()
        assert reports and reports[-1]["virtualServers"][0]["state"] == "Programmed"
    finally:
        stop.set()
        agent.changed.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_resync_repairs_drift_and_counts_it() -> None:
    kernel, reports = FakeKernel(), []  # type: ignore[var-annotated]
    agent = _agent(StubMirror("virtualservers", [vs_obj("a", "192.0.2.1")]), kernel, reports)
    agent.run_once("change")
    (key,) = kernel.dump()
    from ipvs_agent.ops import Op

    kernel.apply([Op(OpKind.DEL_SERVICE, kernel.dump()[key].service)])  # someone deletes it
    result = agent.run_once("resync")
    assert [op.kind for op in result.ops] == [OpKind.ADD_SERVICE, OpKind.ADD_DEST, OpKind.ADD_DEST]

    text = agent.metrics.exposition().decode()
    assert "ipvs_agent_drift_repairs_total 3.0" in text


def test_a_draining_real_server_leaves_soon_after_its_last_connection_not_at_resync() -> None:
    kernel, reports = FakeKernel(), []  # type: ignore[var-annotated]
    vs_mirror = StubMirror("virtualservers", [vs_obj("a", "192.0.2.1")])
    agent = _agent(vs_mirror, kernel, reports)
    agent.settings = Settings("n1", resync_seconds=3600, settle_seconds=0, drain_check_seconds=0.05)
    agent.run_once("change")
    (key,) = kernel.dump()
    gone = next(d for d in kernel.dump()[key].dests if str(d.address) == "198.51.100.12")
    kernel.set_dest_stats(key, gone, DestStats(active_connections=1))
    one = vs_obj("a", "192.0.2.1", backends={"static": [{"address": "198.51.100.11"}]})
    vs_mirror._items = [one]
    agent.run_once("change")
    assert kernel.dump()[key].dests[gone].dest.weight == 0, "quiesced while a connection is open"
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,))
    thread.start()
    try:
        kernel.set_dest_stats(key, gone, DestStats())  # the last connection ends
        for _ in range(100):  # no change event and no resync within the hour: the drain check
            if gone not in kernel.dump()[key].dests:
                break
            stop.wait(0.05)
        assert gone not in kernel.dump()[key].dests
        assert agent.memory.draining == {}
    finally:
        stop.set()
        agent.changed.set()
        thread.join(5)
    text = agent.metrics.exposition().decode()
    assert "ipvs_agent_drift_repairs_total 0.0" in text, "a drain step is not drift"


def test_the_agent_programs_a_requested_address_only_once_the_operator_confirmed_it() -> None:
    unconfirmed = vs_obj("a", "192.0.2.1")
    del unconfirmed["status"]
    other = vs_obj("b", "192.0.2.2")
    other["status"] = {"address": "192.0.2.9"}  # the operator did not confirm 192.0.2.2
    snap = take([unconfirmed, other], [], NODE, admitted_only=True)
    result = reconcile(snap, FakeKernel(), FakeHost(), Memory(), 0)
    assert result.ops == []
    for key in ("ns/a", "ns/b"):
        assert result.outcomes[key].state is State.PENDING
        assert result.outcomes[key].reason == "AddressNotAdmitted"
    offline = take([unconfirmed], [], NODE)  # ipvs-agent apply -f: no operator to ask
    assert [op.kind for op in reconcile(offline, FakeKernel(), FakeHost(), Memory(), 0).ops] == [
        OpKind.ADD_SERVICE,
        OpKind.ADD_DEST,
        OpKind.ADD_DEST,
    ]


def test_a_resync_reads_each_unchanged_version_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from ipvs_agent import snapshot

    calls: list[str] = []
    real = snapshot._read_one

    def counting(obj: Any) -> Any:
        calls.append(obj["metadata"]["name"])
        return real(obj)

    a, bad = vs_obj("a", "192.0.2.1"), vs_obj("b", "192.0.2.2", scheduler={"name": "nope"})
    for obj, version in ((a, "1"), (bad, "7")):
        obj["metadata"]["resourceVersion"] = version
    cache = snapshot.ReadCache()
    monkeypatch.setattr(snapshot, "_read_one", counting)
    first = take([a, bad], [], NODE, cache=cache)
    again = take([a, bad], [], NODE, cache=cache)
    a2 = {**a, "metadata": {**a["metadata"], "resourceVersion": "2"}}
    third = take([a2], [], NODE, cache=cache)
    unversioned = vs_obj("c", "192.0.2.3")
    take([unversioned], [], NODE, cache=cache)
    take([unversioned], [], NODE, cache=cache)
    assert calls == ["a", "b", "a", "c", "c"], "a new version is read, an unversioned one always"
    assert first.virtual_servers == again.virtual_servers and third.virtual_servers
    assert again.rejected["ns/b"].reason == "InvalidSpec", "a rejection is remembered too"


def test_a_pass_parses_only_the_endpoints_of_services_whose_slices_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ipvs_agent import snapshot
    from tests.unit.test_interest import endpoint_slice

    parsed: list[list[str]] = []
    real = snapshot.endpoints_from_slices  # type: ignore[attr-defined]

    def counting(slices: Any) -> Any:
        parsed.append(sorted(s["metadata"]["name"] for s in slices))
        return real(slices)

    def versioned(name: str, service: str, address: str, version: str) -> Any:
        obj = endpoint_slice(name, service, address)
        obj["metadata"]["resourceVersion"] = version
        return obj

    monkeypatch.setattr(snapshot, "endpoints_from_slices", counting)
    cache = snapshot.EndpointCache()
    a1, a2 = versioned("a-1", "a", "10.0.0.1", "1"), versioned("a-2", "a", "10.0.0.2", "2")
    b1 = versioned("b-1", "b", "10.0.1.1", "3")
    first = cache.index([a1, a2, b1])
    again = cache.index([a1, a2, b1])
    assert parsed == [["a-1", "a-2"], ["b-1"]]
    assert again[("ns", "a")] is first[("ns", "a")], "the same list: the plan memo sees it at once"
    b1_new = versioned("b-1", "b", "10.0.1.9", "4")
    changed = cache.index([a1, a2, b1_new])
    assert parsed[2:] == [["b-1"]]
    assert [str(e.address) for e in changed[("ns", "b")]] == ["10.0.1.9"]
    cache.index([a1, b1_new])  # a slice of a went: a is parsed again
    assert parsed[3:] == [["a-1"]]
    unversioned = endpoint_slice("c-1", "c", "10.0.2.1")
    cache.index([unversioned])
    cache.index([unversioned])
    assert parsed[4:] == [["c-1"], ["c-1"]], "a slice without a version is always parsed"
    whole = [a1, a2, b1_new, unversioned]
    assert cache.index(whole) == snapshot.index_endpoints(whole)


def test_a_virtual_address_is_local_before_its_service_and_until_it_is_gone() -> None:
    kernel, host = FakeKernel(), FakeHost()
    seen: list[tuple[str, set[str]]] = []
    apply = kernel.apply

    def watching(ops: Any) -> Any:
        seen.extend((str(op.kind), {str(a) for a in host.addresses}) for op in ops)
        return apply(ops)

    kernel.apply = watching  # type: ignore[method-assign]
    reconcile(take([vs_obj("a", "192.0.2.1")], [], NODE), kernel, host, Memory(), 0)
    assert seen[0] == ("add-service", {"192.0.2.1"}), "the address came first"
    seen.clear()
    reconcile(take([], [], NODE), kernel, host, Memory(), 1)
    assert seen == [("del-service", {"192.0.2.1"})], "the address stayed until the service went"
    assert host.addresses == set()
