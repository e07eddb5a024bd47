"""The agent's reconcile pass on a real kernel, proven with real connections (runs in the VM).

The pass runs in-process against the director's network namespace, exactly as
``ipvs-agent apply`` and the in-cluster agent run it. The host side (addresses, nftables) is
an in-memory double here — the topology already puts the VIP on the director — and is proven
on its own in tests/kernel/test_host_*.py.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_agent.desired import State
from ipvs_agent.ops import Op, OpKind
from ipvs_agent.reconciler import Memory
from tests.kernel.agent_harness import Agent, manifest
from tests.kernel.ipvsctl import ipvsadm, ipvsadm_list
from tests.kernel.topology import Lab, Topology, build_nat


@pytest.fixture
def nat(lab: Lab) -> Iterator[tuple[Topology, Agent]]:
    topology = build_nat(lab, family=4, real_servers=3)
    yield topology, Agent(topology)


def test_wrr_from_a_virtual_server_balances_real_connections(
    nat: tuple[Topology, Agent],
) -> None:
    topology, agent = nat
    result = agent.reconcile(manifest(topology, weights=[3, 2, 1]))
    assert result.failures == [] and result.outcomes["lab/web"].state is State.PROGRAMMED
    assert [op.kind for op in result.ops] == [OpKind.ADD_SERVICE] + [OpKind.ADD_DEST] * 3
    counts = topology.client.tcp_identities(topology.vip, topology.port, 60)
    assert counts == Counter(rs1=30, rs2=20, rs3=10), ipvsadm_list(topology.director)


def test_a_restarted_agent_adopts_the_table_and_changes_nothing(
    nat: tuple[Topology, Agent],
) -> None:
    topology, agent = nat
    vs = manifest(topology, weights=[3, 2, 1])
    agent.reconcile(vs)
    before = ipvsadm(topology.director, "-S", "-n").stdout
    agent.memory = Memory()  # a new process: nothing in memory, the kernel socket is new
    again = agent.reconcile(vs)
    assert again.ops == [], [str(op) for op in again.ops]
    assert ipvsadm(topology.director, "-S", "-n").stdout == before


def test_a_weight_change_is_one_operation_and_takes_effect(nat: tuple[Topology, Agent]) -> None:
    topology, agent = nat
    agent.reconcile(manifest(topology, weights=[1, 1, 1]))
    result = agent.reconcile(manifest(topology, weights=[1, 1, 4]))
    assert [(op.kind, op.dest.weight if op.dest else None) for op in result.ops] == [
        (OpKind.EDIT_DEST, 4)
    ]
    counts = topology.client.tcp_identities(topology.vip, topology.port, 60)
    assert counts == Counter(rs1=10, rs2=10, rs3=40)


def test_a_scheduler_change_keeps_the_service_and_its_counters(
    nat: tuple[Topology, Agent],
) -> None:
    topology, agent = nat
    agent.reconcile(manifest(topology, scheduler="wrr"))
    topology.client.tcp_identities(topology.vip, topology.port, 6)
    result = agent.reconcile(manifest(topology, scheduler="rr"))
    assert [op.kind for op in result.ops] == [OpKind.EDIT_SERVICE]
    # The kernel folds its counters into the dumped stats on a 2 s timer: poll for them.
    deadline = time.monotonic() + 30
    while True:
        with agent.kernel() as kernel:
            (observed,) = kernel.dump().values()
        if observed.stats.connections == 6 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert observed.service.scheduler == "rr"
    assert observed.stats.connections == 6, "edited in place, not deleted and re-added"


def _alive(sock: socket.socket) -> bool:
    """An established connection neither closed nor reset: a read would block."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b"x"  # the identity server sends nothing more
    except BlockingIOError:
        return True
    except OSError as e:
        return e.errno not in (errno.ECONNRESET, errno.EPIPE)
    finally:
        sock.setblocking(True)


def test_a_removed_real_server_drains_without_reset_then_goes(
    nat: tuple[Topology, Agent],
) -> None:
    topology, agent = nat
    agent.reconcile(manifest(topology, scheduler="rr"))
    idle = agent.reconcile(manifest(topology, scheduler="rr", servers=[0, 1]))
    assert [op.kind for op in idle.ops] == [OpKind.DEL_DEST], "no connections: removed at once"

    with topology.client.hold_tcp(topology.vip, topology.port, 4) as held:
        assert held.identities == Counter(rs1=2, rs2=2)
        result = agent.reconcile(manifest(topology, scheduler="rr", servers=[0]))
        assert [(op.kind, op.dest.weight if op.dest else None) for op in result.ops] == [
            (OpKind.EDIT_DEST, 0)
        ], "quiesced, not deleted, while connections are open"
        assert result.outcomes["lab/web"].state is State.PROGRAMMED
        fresh = topology.client.tcp_identities(topology.vip, topology.port, 20)
        assert fresh == Counter(rs1=20), "no new connection reaches a draining server"
        assert all(_alive(s) for s in held.sockets), "no held connection was reset"
        assert agent.reconcile(manifest(topology, scheduler="rr", servers=[0])).ops == []
    # Closed connections linger in the kernel as TIME_WAIT entries for two minutes, so a
    # drain ends at its timeout here: shorten it to 1 s, and a pass after that deletes the real
    # server (the agent's drain check runs passes every couple of seconds while one drains).
    steps: list[Op] = []
    deadline = time.monotonic() + 30
    while not steps and time.monotonic() < deadline:
        steps = agent.reconcile(manifest(topology, scheduler="rr", servers=[0], drain=1)).ops
        time.sleep(0.2)  # poll interval of the loop, not synchronisation
    assert [op.kind for op in steps] == [OpKind.DEL_DEST]
    assert topology.real_servers[1].rip not in ipvsadm_list(topology.director)


def test_foreign_services_and_real_servers_are_never_touched(
    nat: tuple[Topology, Agent],
) -> None:
    topology, agent = nat
    d = topology.director
    ipvsadm(d, "-A", "-t", f"{topology.vip}:8443", "-s", "sh")
    ipvsadm(
        d,
        "-a",
        "-t",
        f"{topology.vip}:8443",
        "-r",
        f"{topology.real_servers[0].rip}:8443",
        "-m",
        "-w",
        "7",
    )
    ipvsadm(d, "-A", "-u", "203.0.113.99:53", "-s", "rr")
    foreign = ipvsadm(d, "-S", "-n").stdout

    agent.reconcile(manifest(topology))
    agent.memory = Memory()
    agent.reconcile(manifest(topology))  # a restart and resync
    agent.reconcile()  # the VirtualServer is deleted: our service goes, theirs stay
    assert ipvsadm(d, "-S", "-n").stdout == foreign


def test_a_foreign_service_at_our_address_is_a_conflict_not_a_takeover(
    nat: tuple[Topology, Agent],
) -> None:
    topology, agent = nat
    d = topology.director
    ipvsadm(d, "-A", "-t", f"{topology.vip}:{topology.port}", "-s", "lc")
    before = ipvsadm(d, "-S", "-n").stdout
    result = agent.reconcile(manifest(topology))
    assert result.ops == []
    assert result.outcomes["lab/web"].state is State.FAILED
    assert result.outcomes["lab/web"].reason == "AddressConflict"
    assert ipvsadm(d, "-S", "-n").stdout == before


def test_one_unprogrammable_virtual_server_leaves_the_others_working(
    nat: tuple[Topology, Agent],
) -> None:
    topology, agent = nat
    good = manifest(topology, scheduler="rr")
    twos = manifest(topology, name="twos", scheduler="twos")
    twos["spec"]["ports"][0]["port"] = topology.port + 1
    with agent.kernel() as kernel:
        has_twos = "twos" in kernel.info().schedulers
    result = agent.reconcile(good, twos)
    assert result.outcomes["lab/web"].state is State.PROGRAMMED
    if has_twos:
        assert result.outcomes["lab/twos"].state is State.PROGRAMMED
    else:
        assert result.outcomes["lab/twos"].state is State.UNSUPPORTED
        assert "twos" in result.outcomes["lab/twos"].message
    counts = topology.client.tcp_identities(topology.vip, topology.port, 9)
    assert counts == Counter(rs1=3, rs2=3, rs3=3)


def test_an_lblc_service_waits_for_its_module_then_serves(nat: tuple[Topology, Agent]) -> None:
    """ip_vs_lblc sets up state in every network namespace as it loads. Loaded by the kernel
    on first use, inside the IPVS command and under its lock, it waits for any namespace being
    removed, which waits for that lock: the node's namespaces hang for good (docs/agent.md).
    So the agent sends no lblc service before the module is in (the test bed loads it at boot,
    as the chart's init container does; here it is taken out and put back)."""
    topology, agent = nat
    module = Path("/sys/module/ip_vs_lblc")
    subprocess.run(["rmmod", "ip_vs_lblc"], check=True, capture_output=True)
    try:
        held = agent.reconcile(manifest(topology, scheduler="lblc"))
        outcome = held.outcomes["lab/web"]
        assert (outcome.state, outcome.reason) == (State.UNSUPPORTED, "SchedulerNotLoaded")
        assert held.ops == [] and ipvsadm(topology.director, "-S", "-n").stdout == ""
        assert not module.exists(), "nothing the agent did loaded it"
    finally:
        subprocess.run(["modprobe", "ip_vs_lblc"], check=True, capture_output=True)
    with agent.kernel() as kernel:
        assert kernel.unloaded() == ()
    agent.forget_kernel_info()  # the in-cluster agent asks again at every pass
    result = agent.reconcile(manifest(topology, scheduler="lblc"))
    assert result.outcomes["lab/web"].state is State.PROGRAMMED
    counts = topology.client.tcp_identities(topology.vip, topology.port, 6)
    assert sum(counts.values()) == 6 and len(counts) == 1, "one destination IP, one server"
