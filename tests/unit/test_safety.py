"""The safety rules of the pass, with the in-memory kernel (issue: production safety).

Each is proven on the real kernel too (tests/kernel/test_safety.py); here every branch runs fast.
"""

from __future__ import annotations

import errno
import ipaddress
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from ipvs_agent import desired
from ipvs_agent.agent import BoundedHTTPServer
from ipvs_agent.desired import Node, State, node_needs, plan
from ipvs_agent.host.state import State as HostState
from ipvs_agent.host.state import SysctlNote, decode, encode
from ipvs_agent.host.sysctl import Needs
from ipvs_agent.kernel import NOT_SENT
from ipvs_agent.kernel.fake import FakeKernel
from ipvs_agent.model import Protocol, Service, ServiceKey
from ipvs_agent.ops import Op, OpKind
from ipvs_agent.reconciler import Memory, reconcile
from ipvs_agent.report import Outbox
from ipvs_agent.snapshot import take
from tests.unit.agent_helpers import FakeHost, slice_

NODE = Node("n1", {})
VIP = "192.0.2.1"


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
        "status": {"address": address},
    }


def key(address: str = VIP, port: int = 80) -> ServiceKey:
    return ServiceKey.for_address(ipaddress.ip_address(address), Protocol.TCP, port)


class RacingKernel(FakeKernel):
    """Another program creates ``key`` between the agent's dump and its apply."""

    def __init__(self, key: ServiceKey) -> None:
        super().__init__()
        self.race = key

    def apply(self, ops: Sequence[Op]) -> list[Any]:
        if self.race is not None:
            super().apply([Op(OpKind.ADD_SERVICE, Service(self.race, "rr"))])
            self.race = None  # type: ignore[assignment]
        return super().apply(ops)


# ------------------------------------------------------------------ the race with a foreign program


def test_a_service_created_meanwhile_by_another_program_gets_none_of_our_real_servers() -> None:
    kernel, host = RacingKernel(key()), FakeHost()
    result = reconcile(take([vs_obj("a", VIP)], [], NODE), kernel, host, Memory(), 0)
    foreign = kernel.dump()[key()]
    assert foreign.service.scheduler == "rr" and dict(foreign.dests) == {}, "dests went in"
    assert [r.error for r in result.results] == [errno.EEXIST, NOT_SENT, NOT_SENT]
    assert key() not in host.owned_keys, "the agent must never own what it did not create"
    outcome = result.outcomes["ns/a"]
    assert (outcome.state, outcome.reason) == (State.FAILED, "AddressConflict")
    assert "another program created" in outcome.message
    again = reconcile(take([vs_obj("a", VIP)], [], NODE), kernel, host, Memory(), 1)
    assert again.ops == [] and again.outcomes["ns/a"].reason == "AddressConflict"
    assert dict(kernel.dump()[key()].dests) == {}, "the next pass leaves the foreign one alone"


def test_ops_of_a_service_created_in_the_same_call_wait_for_its_confirmation() -> None:
    kernel = FakeKernel()
    svc = Service(key(), "wrr")
    other = Service(key("192.0.2.9"), "wrr")
    kernel.apply([Op(OpKind.ADD_SERVICE, other)])
    kernel.fail(lambda op: op.kind is OpKind.ADD_SERVICE and op.service == svc, errno.EEXIST)
    from ipvs_agent.model import Dest, DestKey

    dest = Dest(DestKey("198.51.100.11", 80))
    results = kernel.apply(
        [
            Op(OpKind.ADD_SERVICE, svc),
            Op(OpKind.ADD_DEST, svc, dest),
            Op(OpKind.ADD_DEST, other, dest),  # an existing service: not held back
        ]
    )
    assert [r.error for r in results] == [errno.EEXIST, NOT_SENT, 0]


# ------------------------------------------------------------------ the guard


def test_the_guard_opens_declared_services_before_the_address_and_closes_them_after() -> None:
    kernel, host = FakeKernel(), FakeHost()
    objects = [vs_obj("a", VIP, ports=[{"port": 80}, {"port": 443}])]
    reconcile(take(objects, [], NODE), kernel, host, Memory(), 0)
    first = host.rulesets[0]
    assert first.vips == {ipaddress.ip_address(VIP)}
    assert first.open == {key(port=80), key(port=443)}
    reconcile(take([vs_obj("a", VIP)], [], NODE), kernel, host, Memory(), 1)
    during, after = host.rulesets[-2:]
    assert key(port=443) in during.open, "still open while the service is being deleted"
    assert after.open == {key(port=80)}
    reconcile(take([], [], NODE), kernel, host, Memory(), 2)
    assert host.rulesets[-1].vips == frozenset() and host.rulesets[-1].open == frozenset()


def test_a_declared_service_held_by_a_foreign_program_stays_reachable() -> None:
    kernel, host = FakeKernel(), FakeHost()
    kernel.apply([Op(OpKind.ADD_SERVICE, Service(key(), "rr"))])  # keepalived's
    result = reconcile(take([vs_obj("a", VIP)], [], NODE), kernel, host, Memory(), 0)
    assert result.outcomes["ns/a"].reason == "AddressConflict"
    assert key() in host.rulesets[-1].open and key() not in host.rulesets[-1].owned


# ------------------------------------------------------------------ a planner bug


def _breaks(monkeypatch: pytest.MonkeyPatch, name: str, where: str = "_services") -> None:
    real = getattr(desired, where)

    def broken(vs: Any, *args: Any, **kwargs: Any) -> Any:
        if vs.name == name:
            raise RuntimeError("planner bug")
        return real(vs, *args, **kwargs)

    monkeypatch.setattr(desired, where, broken)


def test_a_planner_bug_leaves_what_the_virtual_server_programmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel, host, memory = FakeKernel(), FakeHost(), Memory()
    objects = [vs_obj("a", VIP), vs_obj("b", "192.0.2.2", trafficPolicy="Cluster")]
    reconcile(take(objects, [], NODE), kernel, host, memory, 0)
    before = kernel.dump()
    _breaks(monkeypatch, "a")
    # An edit of a meets the bug (an unchanged object is not planned again: Memory.plans).
    objects[0]["metadata"]["generation"] = 3
    objects[0]["spec"]["backends"]["static"].append({"address": "198.51.100.14"})
    objects[1]["spec"]["backends"]["static"].append({"address": "198.51.100.13"})
    result = reconcile(take(objects, [], NODE), kernel, host, memory, 1)
    outcome = result.outcomes["ns/a"]
    assert (outcome.state, outcome.reason) == (State.FAILED, "InternalError")
    assert "stays as it was" in outcome.message
    assert kernel.dump()[key()] == before[key()], "a's service and real servers untouched"
    assert len(kernel.dump()[key("192.0.2.2")].dests) == 3, "the others are still reconciled"
    assert ipaddress.ip_address(VIP) in host.addresses and key() in host.owned_keys
    again = reconcile(take(objects, [], NODE), kernel, host, memory, 2)
    assert again.ops == [] and kernel.dump()[key()] == before[key()], "frozen while it lasts"


def test_a_planner_bug_right_after_a_restart_deletes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kernel, host = FakeKernel(), FakeHost()
    objects = [vs_obj("a", VIP)]
    reconcile(take(objects, [], NODE), kernel, host, Memory(), 0)
    _breaks(monkeypatch, "a")
    memory = Memory()  # a new process
    for now in (1, 2, 3):
        result = reconcile(take(objects, [], NODE), kernel, host, memory, now)
        assert not [op for op in result.ops if op.kind is OpKind.DEL_SERVICE]
        assert key() in kernel.dump()
    monkeypatch.undo()  # fixed: the VirtualServer is planned again and nothing moves
    assert reconcile(take(objects, [], NODE), kernel, host, memory, 4).ops == []


def test_a_planner_bug_in_the_real_server_part_keeps_the_last_setup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = [vs_obj("a", VIP, forwarding={"method": "DR"})]
    node = Node("n1", {}, addresses=frozenset({ipaddress.ip_address("198.51.100.11")}))
    first = plan(take(objects, [], node).virtual_servers, {}, node, previous={})
    assert first.real_servers, "the node is a DR real server of a"
    _breaks(monkeypatch, "a", "real_server_part")
    parts = first.real_server_parts
    again = plan(take(objects, [], node).virtual_servers, {}, node, previous=parts)
    assert again.real_servers == first.real_servers and again.real_servers_complete
    assert again.outcomes["ns/a"].reason == "InternalError"
    cold = plan(take(objects, [], node).virtual_servers, {}, node, previous={})
    assert not cold.real_servers_complete, "unknown after a restart: change nothing there"


# ------------------------------------------------------------------ what a VIP may reach


def test_a_static_real_server_at_a_protected_port_of_the_node_is_left_out() -> None:
    node = Node(
        "n1",
        {},
        addresses=frozenset({ipaddress.ip_address("198.51.100.11")}),
        protected_ports=desired.PROTECTED_PORTS,
    )
    objects = [vs_obj("a", VIP, port=10250)]
    p = plan(take(objects, [], node).virtual_servers, {}, node)
    dests = {str(d) for d in p.table[key(port=10250)].dests}
    assert dests == {"198.51.100.12:10250"}, "the node's own kubelet is never a real server"
    outcome = p.outcomes["ns/a"]
    assert (outcome.state, outcome.reason) == (State.PROGRAMMED, "RealServerRefused")
    assert "198.51.100.11:10250" in outcome.message
    only = [vs_obj("b", VIP, port=22, backends={"static": [{"address": "198.51.100.11"}]})]
    p = plan(take(only, [], node).virtual_servers, {}, node)
    assert p.outcomes["ns/b"].state is State.FAILED and not p.table


def test_link_local_and_other_special_endpoints_never_become_real_servers() -> None:
    objects = [vs_obj("a", VIP, backends={"service": {"name": "web"}})]
    slices = [
        {
            "metadata": {
                "name": "web-1",
                "namespace": "ns",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            **slice_(
                [
                    ("169.254.169.254", {"ready": True}, None),
                    ("224.0.0.5", {"ready": True}, None),
                    ("198.51.100.11", {"ready": True}, None),
                ],
                [("", 80, "TCP")],
            ),
        }
    ]
    snap = take(objects, slices, NODE)
    p = plan(snap.virtual_servers, snap.endpoints, NODE)
    assert {str(d) for d in p.table[key()].dests} == {"198.51.100.11:80"}


# ------------------------------------------------------------------ node settings


def test_sysctl_needs_follow_the_planned_services() -> None:
    def needs(*objects: dict[str, Any]) -> Needs:
        snap = take(objects, [], NODE)
        return node_needs(plan(snap.virtual_servers, snap.endpoints, NODE))

    assert needs() == Needs()
    assert needs(vs_obj("dr", VIP, forwarding={"method": "DR"})) == Needs(services=True)
    nat6 = vs_obj(
        "nat6",
        "2001:db8::1",
        backends={"static": [{"address": "2001:db8:5e::11"}]},
        persistence={"timeoutSeconds": 60},
    )
    assert needs(nat6) == Needs(services=True, nat6=True, masquerade=True, persistence=True)


def test_the_state_file_round_trips_and_refuses_another_namespace_or_boot() -> None:
    state = HostState(
        frozenset({key()}),
        frozenset({key()}),
        "abc",
        {"net/ipv4/ip_forward": SysctlNote("1", "0")},
    )
    text = encode(state, (1, 2), "boot-a")
    assert decode(text, (1, 2), "boot-a") == state
    assert decode(text, (1, 3), "boot-a") is None, "another network namespace's table"
    assert decode(text, (1, 2), "boot-b") is None, "written before the last reboot"
    assert decode("{not json", (1, 2), "boot-a") is None
    noted = state.with_sysctls([("net/ipv4/ip_forward", "1", "1")])
    assert noted.sysctls["net/ipv4/ip_forward"].previous == "0", "the first value found stays"


# ------------------------------------------------------------------ the API side never blocks


def test_a_stalled_status_write_never_blocks_the_caller() -> None:
    release = threading.Event()
    sent: list[dict[str, Any]] = []

    def send(status: dict[str, Any], uid: str) -> None:
        release.wait(30)  # an API server that does not answer
        sent.append(status)

    stop = threading.Event()
    outbox = Outbox(send)
    outbox.start(stop)
    started = time.monotonic()
    for n in range(50):
        outbox.put({"n": n})
    assert time.monotonic() - started < 1.0, "put() must hand over and return"
    release.set()
    deadline = time.monotonic() + 10
    while (not sent or sent[-1] != {"n": 49}) and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval
    stop.set()
    assert sent[-1] == {"n": 49} and len(sent) <= 3, "only the newest report is sent"


def test_the_metrics_server_serves_a_bounded_number_of_clients() -> None:
    import socket
    from http.server import BaseHTTPRequestHandler

    class Slow(BaseHTTPRequestHandler):
        timeout = 5

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    server = BoundedHTTPServer(("127.0.0.1", 0), Slow, limit=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        address = (str(host), int(port))
        idle = [socket.create_connection(address) for _ in range(2)]  # hold both slots
        deadline = time.monotonic() + 5
        refused = False
        while not refused and time.monotonic() < deadline:
            extra = socket.create_connection(address)
            extra.settimeout(2)
            try:
                refused = extra.recv(1) == b""  # closed at once, not queued
            except TimeoutError:
                refused = False
            extra.close()
        assert refused
        for conn in idle:
            conn.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_firewall_mark_is_programmed_only_once_a_pool_granted_it() -> None:
    """The operator confirms a mark an AddressPool grants in status.firewallMark; until then
    the in-cluster agent programs nothing for it (a tenant cannot grant itself a mark)."""
    body = vs_obj("marked", VIP)
    spec = {k: v for k, v in body["spec"].items() if k not in ("address", "ports")}
    body = {**body, "spec": {**spec, "fwmark": 256}, "status": {}}
    snap = take([body], [], NODE, admitted_only=True)
    assert snap.virtual_servers == ()
    assert snap.rejected["ns/marked"].reason == "AddressNotAdmitted"
    assert "firewall mark 256" in snap.rejected["ns/marked"].message
    granted = {**body, "status": {"firewallMark": 256}}
    assert [vs.key for vs in take([granted], [], NODE, admitted_only=True).virtual_servers] == [
        "ns/marked"
    ]
