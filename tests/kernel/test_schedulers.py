"""Every kernel scheduler, programmed by the agent from a VirtualServer, against its exact rule.

Each test writes VirtualServer manifests, runs the agent's reconcile pass against the director's
netns (tests/kernel/agent_harness.py) and makes real TCP connections through NAT. Expectations are
exact wherever the kernel's rule is deterministic (net/netfilter/ipvs/ip_vs_<name>.c, Linux 6.1);
several rules break ties by the kernel's list order of real servers, which is newest first — the
agent adds them sorted by address, so rs3, rs2, rs1 — and the tests read that order from the
kernel rather than assume it.

"Active" connections (lc, wlc, sed, nq, ovf) are held open; closed ones stay in the table as
inactive for two minutes, so every test starts from a fresh topology.
"""

from __future__ import annotations

from collections import Counter

import pytest

from ipvs_agent.desired import State
from ipvs_api.types import Scheduler
from tests.kernel.agent_harness import Agent, manifest
from tests.kernel.hashing import dh_pick, sh_pick, sh_table
from tests.kernel.ipvsctl import ipvsadm_list
from tests.kernel.topology import Lab, Topology, build_nat
from tests.kernel.traffic import (
    REFUSED,
    add_client_addresses,
    client_addresses,
    held_tcp,
    tcp_identities_from,
    tcp_identity,
)

#: The schedulers whose rule a test below proves; each one the VM's kernel offers must be here.
RULES_PROVEN = frozenset(
    {"rr", "wrr", "lc", "wlc", "sed", "nq", "fo", "ovf", "sh", "mh", "dh", "lblc", "lblcr"}
)
OTHER_PORT = 8001


def other_port(port: int = OTHER_PORT) -> list[dict[str, object]]:
    """A second VIP port, forwarded (NAT) to the real servers' port 80."""
    return [{"port": port, "protocol": "TCP", "targetPort": 80}]


@pytest.fixture
def nat3(lab: Lab) -> tuple[Topology, Agent]:
    topology = build_nat(lab, family=4, real_servers=3)
    return topology, Agent(topology)


# ---------------------------------------------------------------- which schedulers exist


def test_every_kernel_scheduler_is_programmed_and_a_missing_one_is_unsupported(
    nat3: tuple[Topology, Agent],
) -> None:
    """One VirtualServer per scheduler the API names, each on its own port of the VIP."""
    topology, agent = nat3
    offered = set(agent.info().schedulers)
    named = [str(s) for s in Scheduler]
    assert offered <= set(named), "a kernel scheduler the API cannot name"
    assert offered - {"twos"} <= RULES_PROVEN, "a kernel scheduler without a rule test here"
    ports = {s: 8100 + i for i, s in enumerate(named)}
    result = agent.reconcile(
        *(manifest(topology, f"s-{s}", s, ports=other_port(ports[s])) for s in named)
    )
    assert result.failures == []
    table = ipvsadm_list(topology.director)
    live = agent.dump()
    for s in named:
        outcome = result.outcomes[f"lab/s-{s}"]
        if s in offered:
            assert outcome.state is State.PROGRAMMED, (s, outcome)
            assert agent.service(ports[s], table=live).service.scheduler == s
            served = tcp_identity(topology.client, topology.vip, ports[s])
            assert served in {"rs1", "rs2", "rs3"}, (s, served, table)
        else:
            assert (outcome.state, outcome.reason) == (State.UNSUPPORTED, "Unsupported"), s
            assert f"scheduler {s} is not available" in outcome.message
            assert f":{ports[s]} " not in table, "an unsupported VirtualServer left a service"
            assert tcp_identity(topology.client, topology.vip, ports[s]) == REFUSED
    if "twos" not in offered:  # Debian's 6.1: twos came with Linux 6.2
        refused = topology.director.run(
            "ipvsadm", "-A", "-t", f"{topology.vip}:9", "-s", "twos", check=False
        )
        assert refused.returncode != 0, "the kernel has twos after all: the probe is wrong"
        assert result.outcomes["lab/s-twos"].state is State.UNSUPPORTED


# ---------------------------------------------------------------- rr, wrr


def test_rr_skips_a_weight_zero_server_and_wrr_follows_weights_exactly(
    nat3: tuple[Topology, Agent],
) -> None:
    topology, agent = nat3
    agent.programmed(
        manifest(topology, "rr", "rr", weights=[1, 0, 5]),
        manifest(topology, "wrr", "wrr", weights=[4, 3, 2], ports=other_port()),
    )
    client, vip = topology.client, topology.vip
    assert client.tcp_identities(vip, topology.port, 12) == Counter(rs1=6, rs3=6)
    assert client.tcp_identities(vip, OTHER_PORT, 18) == Counter(rs1=8, rs2=6, rs3=4)


# ---------------------------------------------------------------- lc, wlc, sed, nq


def test_lc_and_wlc_spread_held_connections_by_count_and_by_weight(
    nat3: tuple[Topology, Agent],
) -> None:
    topology, agent = nat3
    agent.programmed(
        manifest(topology, "lc", "lc", weights=[1, 1, 5]),  # lc ignores weights other than 0
        manifest(topology, "wlc", "wlc", weights=[1, 1, 4], ports=other_port()),
    )
    client, vip = topology.client, topology.vip
    with held_tcp(client, vip, topology.port, 6) as lc, held_tcp(client, vip, OTHER_PORT, 6) as wlc:
        assert lc.counts() == Counter(rs1=2, rs2=2, rs3=2)
        assert wlc.counts() == Counter(rs1=1, rs2=1, rs3=4)


def test_sed_fills_the_heavy_server_first_while_nq_first_takes_the_idle_one(lab: Lab) -> None:
    topology = build_nat(lab, family=4, real_servers=2)
    agent = Agent(topology)
    agent.programmed(
        manifest(topology, "sed", "sed", weights=[1, 10]),
        manifest(topology, "nq", "nq", weights=[1, 10], ports=other_port()),
    )
    assert agent.kernel_order() == ["rs2", "rs1"]
    client, vip = topology.client, topology.vip
    with held_tcp(client, vip, topology.port, 4) as sed, held_tcp(client, vip, OTHER_PORT, 4) as nq:
        # sed: (active + 1) / weight, so rs2 (weight 10) takes ten before rs1 takes one.
        assert sed.identities == ["rs2", "rs2", "rs2", "rs2"]
        # nq: an idle server first, then as sed.
        assert nq.identities == ["rs2", "rs1", "rs2", "rs2"]


# ---------------------------------------------------------------- fo, ovf


def test_fo_overflows_at_the_upper_threshold_and_ovf_at_the_weight(
    nat3: tuple[Topology, Agent],
) -> None:
    topology, agent = nat3
    agent.programmed(
        manifest(
            topology, "fo", "fo", weights=[10, 5, 1], real_server_fields={0: {"upperThreshold": 3}}
        ),
        manifest(topology, "ovf", "ovf", weights=[3, 2, 1], ports=other_port()),
    )
    client, vip = topology.client, topology.vip
    with held_tcp(client, vip, topology.port, 5) as fo:
        # fo: the highest weight until it is overloaded (3 connections), then the next.
        assert fo.identities == ["rs1"] * 3 + ["rs2"] * 2
    with held_tcp(client, vip, OTHER_PORT, 10) as ovf:
        # ovf: the highest weight while its active connections do not exceed its weight;
        # when every server is full there is no destination and the client is refused.
        assert ovf.identities == ["rs1"] * 4 + ["rs2"] * 3 + ["rs3"] * 2 + [REFUSED]


# ---------------------------------------------------------------- sh, mh

HASHING = {"sh": 80, "mh": OTHER_PORT}  # one VirtualServer each, side by side


def test_sh_and_mh_map_each_client_to_one_server_and_fallback_moves_only_a_drained_ones(
    nat3: tuple[Topology, Agent],
) -> None:
    topology, agent = nat3
    clients = add_client_addresses(topology, client_addresses(9))

    def program(weights: list[int], fallback: bool = False) -> None:
        agent.programmed(
            *(
                manifest(
                    topology, s, s, weights=weights, ports=other_port(port),
                    flags=[f"{s}-fallback"] if fallback else [],
                )
                for s, port in HASHING.items()
            )
        )  # fmt: skip

    def visit() -> dict[str, dict[str, str]]:
        """scheduler -> client -> the server it reached (one connection each)."""
        out = {}
        for s, port in HASHING.items():
            seen = tcp_identities_from(topology.client, topology.vip, port, clients)
            out[s] = {c: ids[0] for c, ids in seen.items()}
        return out

    program([1, 1, 1])
    first = visit()
    for s in HASHING:
        assert len(set(first[s].values())) >= 2, f"{s}: 9 clients, all on one server"
    # sh's table is the kernel's exact rule, predictable from the addresses alone.
    order = agent.kernel_order(HASHING["sh"])
    table = sh_table(order, {"rs1": 1, "rs2": 1, "rs3": 1})
    assert first["sh"] == {c: sh_pick(table, {"rs1", "rs2", "rs3"}, c) for c in clients}

    # rs2 quiesced (weight 0): without the fallback flag its clients find no server and
    # every other client stays where it was.
    program([1, 0, 1])
    drained = visit()
    for s in HASHING:
        expected = {c: (REFUSED if rs == "rs2" else rs) for c, rs in first[s].items()}
        assert drained[s] == expected, s

    # With the fallback flag exactly rs2's clients move, to the others; nobody else moves.
    program([1, 0, 1], fallback=True)
    moved = visit()
    for s in HASHING:
        for c, rs in first[s].items():
            assert moved[s][c] in ({"rs1", "rs3"} if rs == "rs2" else {rs}), (s, c, rs)
    table = sh_table(agent.kernel_order(HASHING["sh"]), {"rs1": 1, "rs2": 0, "rs3": 1})
    assert moved["sh"] == {c: sh_pick(table, {"rs1", "rs3"}, c, fallback=True) for c in clients}


# ---------------------------------------------------------------- dh, lblc, lblcr

BY_DESTINATION = {"dh": 80, "lblc": OTHER_PORT, "lblcr": OTHER_PORT + 1}


def test_dh_lblc_lblcr_send_every_client_of_one_vip_to_one_server(
    nat3: tuple[Topology, Agent],
) -> None:
    topology, agent = nat3
    clients = add_client_addresses(topology, client_addresses(4))
    vip = topology.vip

    def program(weights: list[int]) -> None:
        agent.programmed(
            *(
                manifest(topology, s, s, weights=weights, ports=other_port(port))
                for s, port in BY_DESTINATION.items()
            )
        )

    def reached(port: int, visits: int) -> Counter[str]:
        seen = tcp_identities_from(topology.client, vip, port, clients * visits)
        return Counter(rs for ids in seen.values() for rs in ids)

    program([1, 1, 1])
    order = agent.kernel_order()
    # dh hashes the VIP; lblc/lblcr give a new destination the least loaded server (all idle:
    # the first in list order) and keep it while it is not overloaded.
    expected = {"dh": dh_pick(order, vip), "lblc": order[0], "lblcr": order[0]}
    assert len(set(expected.values())) == 1, "the test below assumes one mapped server"
    mapped = expected["dh"]
    for s, port in BY_DESTINATION.items():
        assert agent.kernel_order(port) == order
        assert reached(port, 2) == Counter({mapped: 8}), s

    # The mapped server quiesced: dh has no fallback; lblc/lblcr pick the least loaded other.
    program([0 if f"rs{i + 1}" == mapped else 1 for i in range(3)])
    others = [rs for rs in order if rs != mapped]
    assert reached(BY_DESTINATION["dh"], 1) == Counter({REFUSED: 4})
    assert reached(BY_DESTINATION["lblc"], 1) == Counter({others[0]: 4})
    assert reached(BY_DESTINATION["lblcr"], 1) == Counter({others[0]: 4})
