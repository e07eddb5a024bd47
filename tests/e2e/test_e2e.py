"""End to end: objects in a real API server, the operator, the agent on a real IPVS kernel.

Each test sends real TCP connections from a client namespace in the VM through the kernel
table the agent programmed from what the test applied, and counts which real server
answered. Every wait polls with a deadline (tests/e2e/scenario.py); nothing sleeps a fixed
time. Each test uses its own virtual address, so a failure does not cascade.
"""

from __future__ import annotations

from tests.e2e import scenario as sc
from tests.e2e.bed import LabBed, wait_for
from tests.operator import harness


def test_virtual_server_wrr_then_scheduler_and_weight_changes(lab: LabBed) -> None:
    vip = sc.NAT_VIP
    sc.apply_virtual_server(lab, sc.virtual_server("e2e-nat", vip, weights=(3, 2, 1)))
    sc.expect_service(lab, vip, "wrr", {"rs1": 3, "rs2": 2, "rs3": 1})
    assert sc.connections(lab, vip, 60) == {"rs1": 30, "rs2": 20, "rs3": 10}

    # The scheduler alone: rr ignores the weights.
    sc.apply_virtual_server(
        lab, sc.virtual_server("e2e-nat", vip, scheduler="rr", weights=(3, 2, 1))
    )
    sc.expect_service(lab, vip, "rr", {"rs1": 3, "rs2": 2, "rs3": 1})
    assert sc.connections(lab, vip, 30) == {"rs1": 10, "rs2": 10, "rs3": 10}

    # Scheduler and weights together.
    sc.apply_virtual_server(lab, sc.virtual_server("e2e-nat", vip, weights=(1, 1, 4)))
    sc.expect_service(lab, vip, "wrr", {"rs1": 1, "rs2": 1, "rs3": 4})
    assert sc.connections(lab, vip, 60) == {"rs1": 10, "rs2": 10, "rs3": 40}

    sc.delete_virtual_server(lab, "e2e-nat")
    sc.expect_gone(lab, vip)


def test_service_endpoints_drain_then_delete(lab: LabBed) -> None:
    name = "e2e-web"
    drain = 30  # long enough for the checks below while rs3 drains
    sc.apply_endpoint_slice(
        lab, sc.endpoint_slice(name, {"rs1": "ready", "rs2": "ready", "rs3": "ready"})
    )
    lab_core = harness.core(lab.admin)
    lab_core.create_namespaced_service(
        sc.NAMESPACE, sc.load_balancer_service(name, scheduler="rr", drain_seconds=drain)
    )
    vip = sc.service_address(lab, name)
    assert vip.startswith("203.0.113."), vip
    sc.expect_service(lab, vip, "rr", {"rs1": 1, "rs2": 1, "rs3": 1})
    assert sc.connections(lab, vip, 30) == {"rs1": 10, "rs2": 10, "rs3": 10}

    held = lab.call("hold", client="c1", vip=vip, port=sc.PORT, count=3, seconds=60)
    assert sorted(held["identities"]) == ["rs1", "rs2", "rs3"]
    try:
        # rs3's pod is terminating but still serving: quiesced, its connection kept.
        sc.apply_endpoint_slice(
            lab, sc.endpoint_slice(name, {"rs1": "ready", "rs2": "ready", "rs3": "terminating"})
        )
        sc.expect_node_entry(lab, name, real_servers=2, draining=1)
        sc.expect_service(lab, vip, "rr", {"rs1": 1, "rs2": 1, "rs3": 0})
        assert sc.connections(lab, vip, 20) == {"rs1": 10, "rs2": 10}
        assert all(alive for _, alive in lab.call("held_alive", handle=held["handle"]))

        # rs3's endpoint is gone: it drains (weight 0) while its connection is open.
        sc.apply_endpoint_slice(lab, sc.endpoint_slice(name, {"rs1": "ready", "rs2": "ready"}))
        # The agent's own report says when it saw that: 2 real servers, none terminating.
        sc.expect_node_entry(lab, name, real_servers=2, draining=0)
        sc.expect_service(lab, vip, "rr", {"rs1": 1, "rs2": 1, "rs3": 0})
        assert sc.connections(lab, vip, 20) == {"rs1": 10, "rs2": 10}
        assert all(alive for _, alive in lab.call("held_alive", handle=held["handle"]))
    finally:
        lab.call("release", handle=held["handle"])
    # Closed connections linger as TIME_WAIT entries, so the drain ends at its timeout.
    sc.expect_service(lab, vip, "rr", {"rs1": 1, "rs2": 1})

    # Scaled up again: rs3 takes its share at once.
    sc.apply_endpoint_slice(
        lab, sc.endpoint_slice(name, {"rs1": "ready", "rs2": "ready", "rs3": "ready"})
    )
    sc.expect_service(lab, vip, "rr", {"rs1": 1, "rs2": 1, "rs3": 1})
    assert sc.connections(lab, vip, 30) == {"rs1": 10, "rs2": 10, "rs3": 10}

    lab_core.delete_namespaced_service(name, sc.NAMESPACE)
    sc.expect_gone(lab, vip)
    harness.discovery(lab.admin).delete_namespaced_endpoint_slice(f"{name}-lab", sc.NAMESPACE)
    wait_for(
        "the operator to delete the Service's VirtualServer",
        lambda: harness.get_vs(lab.admin, sc.NAMESPACE, name) is None,
        sc.PROGRAM_TIMEOUT,
    )


def test_direct_routing_and_tunnelling_balance(lab: LabBed) -> None:
    sc.apply_virtual_server(
        lab, sc.virtual_server("e2e-dr", sc.DR_VIP, method="DR", weights=(1, 2, 3))
    )
    sc.apply_virtual_server(
        lab, sc.virtual_server("e2e-tun", sc.TUN_VIP, method="TUN", scheduler="rr")
    )
    sc.expect_service(lab, sc.DR_VIP, "wrr", {"rs1": 1, "rs2": 2, "rs3": 3}, "DR")
    sc.expect_service(lab, sc.TUN_VIP, "rr", {"rs1": 1, "rs2": 1, "rs3": 1}, "TUN")
    assert sc.connections(lab, sc.DR_VIP, 60, "DR") == {"rs1": 10, "rs2": 20, "rs3": 30}
    assert sc.connections(lab, sc.TUN_VIP, 30, "TUN") == {"rs1": 10, "rs2": 10, "rs3": 10}
    sc.delete_virtual_server(lab, "e2e-dr")
    sc.delete_virtual_server(lab, "e2e-tun")
    sc.expect_gone(lab, sc.DR_VIP)
    sc.expect_gone(lab, sc.TUN_VIP)


def test_the_kernel_table_is_clean_after_everything_is_deleted(lab: LabBed) -> None:
    """Runs last: every object of the other tests is gone, so is every kernel entry."""
    assert harness.list_vs(lab.admin, sc.NAMESPACE) == []
    wait_for("an empty IPVS table", lambda: lab.ipvsadm() == [], sc.PROGRAM_TIMEOUT)
    assert {a for a in sc.local_addresses(lab) if not a.startswith("fe80:")} == set()


def test_uninstall_cleans_the_node(lab: LabBed) -> None:
    """Runs last: deleting the agent's DaemonSet (helm uninstall) and stopping the agent, as
    the kubelet then does, leaves no trace of the agent in the node's kernel."""
    sc.apply_virtual_server(lab, sc.virtual_server("e2e-last", sc.NAT_VIP, weights=(1, 1, 1)))
    sc.expect_service(lab, sc.NAT_VIP, "wrr", {"rs1": 1, "rs2": 1, "rs3": 1})
    foreign = ["ipvsadm", "-A", "-t", "198.51.100.99:25", "-s", "rr"]
    assert lab.call("run", argv=foreign)["code"] == 0
    harness.apps(lab.admin).delete_namespaced_daemon_set("ipvs-agent", harness.OPERATOR_NAMESPACE)
    stopped = lab.call("stop_agent", timeout=180.0)
    assert stopped == 0, f"the agent's exit status: {stopped}\n{lab.agent_log_tail()}"
    assert lab.ipvsadm() == ["-A -t 198.51.100.99:25 -s rr"], "only the foreign service stays"
    assert {a for a in sc.local_addresses(lab) if not a.startswith("fe80:")} == set()
    tables = lab.call("run", argv=["nft", "list", "tables"])["stdout"]
    assert "ipvs-operator" not in tables
    links = lab.call("run", argv=["ip", "-br", "link"])["stdout"]
    assert "ipvs0" not in links
