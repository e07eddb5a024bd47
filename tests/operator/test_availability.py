"""Restart and failover (issue points 2 and 4): allocations live in the objects, one replica acts.

These tests run their own operator processes (no module-wide operator), so they can stop, kill
and start them. Lease timings are short (4 s) to keep the tests quick.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.operator import harness
from tests.operator.conftest import PoolFactory, start_operator
from tests.operator.harness import condition, ingress, wait_for

BURST = 60


def addresses(api: Any, ns: str) -> dict[str, str]:
    """VirtualServer name -> allocated address, for those that have one."""
    return {
        vs["metadata"]["name"]: vs["status"]["address"]
        for vs in harness.list_vs(api, ns)
        if condition(vs, "AddressAllocated").get("status") == "True"
    }


def create_services(api: Any, ns: str, names: list[str]) -> None:
    core = harness.core(api)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: core.create_namespaced_service(ns, harness.service(n)), names))


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "kill"])
def test_restart_in_a_burst_reshuffles_nothing(
    admin: Any,
    ns: str,
    pool: PoolFactory,
    operator_kubeconfig: Path,
    logs: Path,
    how: signal.Signals,
) -> None:
    """Stopped (it releases the Lease) or killed (the next waits for it to expire) mid-burst."""
    pool(200)
    names = [f"svc-{i:03d}" for i in range(BURST)]
    first = start_operator(operator_kubeconfig, logs, "restart-a")
    second: harness.Operator | None = None
    try:
        wait_for("restart-a to lead", lambda: harness.lease_holder(admin) == "restart-a")
        burst = threading.Thread(target=create_services, args=(admin, ns, names))
        burst.start()
        wait_for("a third of the burst allocated", lambda: len(addresses(admin, ns)) >= BURST // 3)
        first.signal(how)
        status = first.stop()
        assert status == (0 if how is signal.SIGTERM else -signal.SIGKILL), first.tail()
        before = addresses(admin, ns)
        assert len(before) < BURST, "the burst finished before the restart; nothing was proven"
        second = start_operator(operator_kubeconfig, logs, "restart-b")
        burst.join()

        def all_allocated() -> dict[str, str] | None:
            found = addresses(admin, ns)
            return found if len(found) == BURST else None

        after = wait_for("the whole burst allocated", all_allocated, timeout=90)
        assert len(set(after.values())) == BURST, "an address was given twice"
        assert {n: after[n] for n in before} == before, "an address changed over the restart"
        restored = re.search(r"restored (\d+) address", second.log.read_text())
        assert restored is not None and int(restored.group(1)) >= len(before)

        def ingress_matches(name: str) -> bool:
            return ingress(admin, ns, name) == [{"ip": after[name], "ipMode": "Proxy"}]

        for name in names[:5] + names[-5:]:
            wait_for(f"{name}'s ingress", partial(ingress_matches, name))
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0, second.tail()


def test_standby_takes_over_when_the_leader_is_killed(
    admin: Any, ns: str, pool: PoolFactory, operator_kubeconfig: Path, logs: Path
) -> None:
    pool(8)
    a = start_operator(operator_kubeconfig, logs, "replica-a")
    wait_for("replica-a to lead", lambda: harness.lease_holder(admin) == "replica-a")
    port = free_port()
    b = start_operator(operator_kubeconfig, logs, "replica-b", "--health-port", str(port))
    try:
        assert wait_for("the standby's /healthz", lambda: healthz(port)) == "standby"
        core = harness.core(admin)
        core.create_namespaced_service(ns, harness.service("before"))
        kept = wait_for("before's address", lambda: ingress(admin, ns, "before"))
        assert harness.lease_holder(admin) == "replica-a"
        assert "became the leader" not in b.log.read_text()  # the standby did nothing
        a.signal(signal.SIGKILL)
        core.create_namespaced_service(ns, harness.service("after"))
        wait_for("replica-b to take the Lease", lambda: harness.lease_holder(admin) == "replica-b")
        got = wait_for("after's address from the new leader", lambda: ingress(admin, ns, "after"))
        assert got != kept
        assert ingress(admin, ns, "before") == kept
        assert healthz(port) == "leader"
    finally:
        a.kill()
        assert b.stop() == 0, b.tail()


def test_a_leader_that_loses_the_lease_stops_and_exits(
    admin: Any, ns: str, operator_kubeconfig: Path, logs: Path
) -> None:
    port = free_port()
    op = start_operator(operator_kubeconfig, logs, "loser", "--health-port", str(port))
    try:
        wait_for("loser to lead", lambda: harness.lease_holder(admin) == "loser")
        assert wait_for("/healthz", lambda: healthz(port)) == "leader"
        # Someone else holds the Lease now (as after a network partition healed).
        lease: Any = client.CoordinationV1Api(admin).read_namespaced_lease(
            harness.LEASE, harness.OPERATOR_NAMESPACE
        )
        lease.spec.holder_identity = "intruder"
        lease.spec.lease_duration_seconds = 3600
        client.CoordinationV1Api(admin).replace_namespaced_lease(
            harness.LEASE, harness.OPERATOR_NAMESPACE, lease
        )
        wait_for("the operator to exit", lambda: not op.alive(), timeout=20)
        assert op.stop() == 1, op.tail()
        assert "lost the Lease" in op.log.read_text()
    finally:
        op.kill()
        client.CoordinationV1Api(admin).delete_namespaced_lease(
            harness.LEASE, harness.OPERATOR_NAMESPACE
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthz(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            text: str = answer.read().decode().strip()
            return text
    except OSError:
        return None
