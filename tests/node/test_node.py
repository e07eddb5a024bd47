"""The chart on a real node: helm install, the pods the kubelet runs, traffic, upgrade, uninstall.

One node bed per module (tests/node/bed.py): the tests run in order and share the release.
The commands are README's "Install into a cluster with Helm" (``INSTALL``; the image is
imported into the node's containerd instead of pushed to a registry), plus the bed's own
values (``BED_VALUES``: the API server's address, as no kube-proxy runs).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from ipvs_agent.host.nftables import TABLE_FAMILY, TABLE_NAME
from tests.apiserver.cluster import REPO_ROOT
from tests.e2e import guest as lab
from tests.e2e import scenario as sc
from tests.e2e.bed import LabError
from tests.image.runner import capability_names
from tests.node.bed import GUEST_API_PORT, IMAGE, NETWORK, NODE_NAME, NodeBed

NAMESPACE = "ipvs-system"
#: README's commands, in order (tests/node/test_readme.py checks README says exactly these).
INSTALL = [
    ["kubectl", "create", "namespace", NAMESPACE],
    ["kubectl", "label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=privileged"],
    ["helm", "install", "ipvs-operator", "charts/ipvs-operator", "-n", NAMESPACE,
     "--set", f"image.repository={IMAGE}"],
    ["kubectl", "-n", NAMESPACE, "rollout", "status", "daemonset/ipvs-agent"],
    ["kubectl", "-n", NAMESPACE, "rollout", "status", "deployment/ipvs-operator"],
    ["kubectl", "get", "ipvsnodes"],
]  # fmt: skip
API_ENV = json.dumps(
    [
        {"name": "KUBERNETES_SERVICE_HOST", "value": NETWORK.forward_address},
        {"name": "KUBERNETES_SERVICE_PORT", "value": str(GUEST_API_PORT)},
    ]
)
#: The bed's own values: the API server's address (no kube-proxy runs), and probe and Lease
#: timings for TCG, where Python runs ~40x slower: a start takes minutes, an answer seconds when
#: busy, and with the default 10 s renew deadline the leader lost its Lease while kopf started.
SLOW = [
    "probes.startup.failureThreshold=450",
    "probes.liveness.timeoutSeconds=30",
    "probes.liveness.failureThreshold=6",
    "probes.readiness.timeoutSeconds=30",
]
BED_VALUES = [
    *(arg for value in SLOW for arg in ("--set", f"agent.{value}", "--set", f"operator.{value}")),
    "--set", "operator.leaderElection.leaseDurationSeconds=120",
    "--set", "operator.leaderElection.renewDeadlineSeconds=90",
    "--set", "operator.leaderElection.retryPeriodSeconds=10",
    "--set-json", f"agent.extraEnv={API_ENV}",
    "--set-json", f"operator.extraEnv={API_ENV}",
]  # fmt: skip
ROLLOUT_TIMEOUT = "900s"
VIP = sc.NAT_VIP  # in the lab's pool of requested addresses (203.0.113.0/27)


def run(node: NodeBed, argv: list[str], timeout: float = 1200) -> str:
    tool, *args = argv
    if tool == "helm":
        args += BED_VALUES if args[0] in ("install", "upgrade") else []
        return node.helm(*args, timeout=timeout).stdout
    if "rollout" in args:
        args += [f"--timeout={ROLLOUT_TIMEOUT}"]
    return node.kubectl(*args, timeout=timeout).stdout


def pods(node: NodeBed, component: str) -> list[dict[str, Any]]:
    out = node.kubectl(
        "-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/component={component}",
        "-o", "json",
    ).stdout  # fmt: skip
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def virtual_server(weights: tuple[int, int, int]) -> str:
    body = sc.virtual_server("node-nat", VIP, weights=weights)
    body["metadata"]["namespace"] = "default"
    return json.dumps(body)


@pytest.fixture(scope="module")
def installed(node: NodeBed) -> NodeBed:
    started = time.monotonic()
    for argv in INSTALL:
        run(node, argv)
    node.timings["install to ready"] = time.monotonic() - started
    node.log(f"installed and rolled out in {node.timings['install to ready']:.0f}s")
    return node


def test_pods_are_ready_with_the_documented_privileges(installed: NodeBed) -> None:
    node = installed
    (agent,) = pods(node, "agent")
    assert ready(agent), agent["status"]
    (init,) = agent["status"]["initContainerStatuses"]
    assert init["name"] == "load-modules"
    assert init["state"]["terminated"]["exitCode"] == 0
    (main,) = agent["status"]["containerStatuses"]
    assert main["restartCount"] == 0, node.diagnostics()  # the probes never failed it
    # What the kernel gives the agent's process under containerd: root, NET_ADMIN and the
    # NET_RAW of layer-2 announcement alone (bounding set too), no_new_privs, a read-only root.
    script = (
        'pid=$(pgrep -o -f "ipvs-agent run") && grep -E "^(Uid|CapEff|CapBnd|NoNewPrivs):" '
        '/proc/$pid/status && awk \'$5 == "/" { print "root", $6 }\' /proc/$pid/mountinfo'
    )
    out = node.call("run", argv=["sh", "-c", script])
    fields = dict(line.split(None, 1) for line in out["stdout"].splitlines())
    assert fields["Uid:"].split() == ["0"] * 4, out
    assert capability_names(fields["CapEff:"].strip()) == {"NET_ADMIN", "NET_RAW"}, out
    assert capability_names(fields["CapBnd:"].strip()) == {"NET_ADMIN", "NET_RAW"}, out
    assert fields["NoNewPrivs:"].strip() == "1", out
    assert "ro" in fields["root"].split(","), out
    operators = pods(node, "operator")
    assert len(operators) == 2 and all(ready(p) for p in operators), node.diagnostics()
    nodes = json.loads(node.kubectl("get", "ipvsnodes", "-o", "json").stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == [NODE_NAME]

    # Pod Security: the namespace must allow privileged; the operator alone meets restricted.
    for level, violators in (("baseline", {"ipvs-agent"}), ("restricted", {"ipvs-agent"})):
        out = node.kubectl(
            "label", "--dry-run=server", "--overwrite", "namespace", NAMESPACE,
            f"pod-security.kubernetes.io/enforce={level}",
        )  # fmt: skip
        warned = set(re.findall(r"(ipvs-agent|ipvs-operator)-[a-z0-9-]+", out.stdout + out.stderr))
        assert warned == violators, (level, out.stderr)

    # The PodDisruptionBudget: one operator may go, not both.
    pdb = json.loads(
        node.kubectl("-n", NAMESPACE, "get", "pdb", "ipvs-operator", "-o", "json").stdout
    )
    assert pdb["status"]["disruptionsAllowed"] == 1


def test_a_virtual_server_applied_with_kubectl_is_served_by_the_agent_pod(
    installed: NodeBed,
) -> None:
    node = installed
    pools = "\n---\n".join(json.dumps(pool) for pool in sc.address_pools())
    node.kubectl("apply", "-f", "-", input_text=pools)
    node.kubectl("apply", "-f", "-", input_text=virtual_server((3, 2, 1)))
    key = f"{VIP}:{lab.PORT}"

    def programmed() -> bool:
        table = sc.parse_table(node_ipvsadm(node))
        found = table.get(key)
        return found is not None and found.scheduler == "wrr" and len(found.dests) == 3

    try:
        node.wait_for(f"{key} in the kernel", programmed, 600)
    except AssertionError as error:
        vs = node.kubectl("get", "virtualservers", "-A", "-o", "yaml", check=False).stdout
        raise AssertionError(f"{error}\n{vs[-3000:]}\n{node.diagnostics()}") from None
    counts = node.call("tcp", client="c1", vip=VIP, port=lab.PORT, count=60, seconds=120)
    assert counts == {"rs1": 30, "rs2": 20, "rs3": 10}


def node_ipvsadm(node: NodeBed) -> list[str]:
    out = node.call("run", argv=["ipvsadm", "-S", "-n"])
    return [line for line in out["stdout"].splitlines() if line.strip()]


def test_upgrade_rolls_the_agent_without_failing_connections(installed: NodeBed) -> None:
    node = installed
    (before,) = pods(node, "agent")
    held = node.call("hold", client="c1", vip=VIP, port=lab.PORT, count=6, seconds=60)
    upgrade = ["helm", "upgrade", "ipvs-operator", "charts/ipvs-operator", "-n", NAMESPACE,
               "--reuse-values", "--set", "agent.resyncSeconds=20"]  # fmt: skip
    run(node, upgrade)
    failures: list[str] = []
    deadline = time.monotonic() + 900
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        try:
            node.call("tcp", client="c1", vip=VIP, port=lab.PORT, count=6, seconds=60)
        except LabError as error:  # a connection refused, reset or timed out in the VM
            failures.append(str(error))
        current = pods(node, "agent")
        if (
            len(current) == 1
            and current[0]["metadata"]["uid"] != before["metadata"]["uid"]
            and ready(current[0])
        ):
            break
    else:
        raise AssertionError(f"the agent did not roll within 900s\n{node.diagnostics()}")
    assert failures == [], failures
    assert rounds > 1
    alive = node.call("held_alive", handle=held["handle"])
    assert all(ok for _, ok in alive), alive
    node.call("release", handle=held["handle"])


def test_uninstall_removes_the_release(installed: NodeBed) -> None:
    node = installed
    node.helm("uninstall", "ipvs-operator", "-n", NAMESPACE, "--wait", "--timeout=600s")
    node.wait_for(
        "the release's pods to go",
        lambda: not pods(node, "agent") and not pods(node, "operator"),
        600,
    )


def test_uninstall_leaves_the_node_clean(installed: NodeBed) -> None:
    node = installed
    table = sc.parse_table(node_ipvsadm(node))
    assert f"{VIP}:{lab.PORT}" not in table
    links = node.call("run", argv=["ip", "-o", "link", "show", "dev", "ipvs0"])
    assert links["code"] != 0, links
    tables = node.call("run", argv=["nft", "list", "tables"])
    assert f"table {TABLE_FAMILY} {TABLE_NAME}" not in tables["stdout"], tables


def test_readme_helm_section_is_what_this_test_runs() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Install into a cluster with Helm", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [
        line
        for line in block.replace("\\\n", " ").splitlines()
        if line.startswith(("kubectl", "helm"))
    ]
    expected = [" ".join(argv).replace(IMAGE, "registry.example/ipvs-operator") for argv in INSTALL]
    assert [" ".join(c.split("#", 1)[0].split()) for c in commands] == expected
