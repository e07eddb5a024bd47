"""``helm lint``, ``helm template`` and values.schema.json, judged by a real kube-apiserver.

Every rendered object (CRDs included) goes to the API server as a server-side apply with
``dryRun=All`` and ``fieldValidation=Strict``: schema, defaulting, admission and unknown fields
are the server's verdict, not a linter's. Pods never run here (no kubelet), so the pod
templates are also judged as Pods by Pod Security admission at the level each needs.
"""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from tests.apiserver.cluster import LocalApiServer
from tests.chart.helm import (
    CHART,
    RELEASE,
    Helm,
    HelmError,
    Manifest,
    container,
    find,
    kinds,
    template_script,
    value_args,
)

HERE = Path(__file__).resolve().parent
VALUE_SETS = {
    "defaults": (),
    "full": ("full.yaml",),
    "privileged": ("privileged.yaml",),
    "minimal-privileges": ("minimal-privileges.yaml",),
}


@pytest.fixture(scope="module")
def admin(apiserver: LocalApiServer) -> Iterator[Any]:
    with apiserver.api_client() as api:
        yield api


@pytest.fixture(scope="module")
def servicemonitor_crd(apiserver: LocalApiServer) -> None:
    apiserver.install_crds([HERE / "servicemonitor-crd.yaml"])


def dry_run_apply(api: Any, obj: Manifest, namespace: str) -> Manifest:
    """Server-side apply with dryRun=All and fieldValidation=Strict; the server's result."""
    resource = dynamic.DynamicClient(api).resources.get(
        api_version=obj["apiVersion"], kind=obj["kind"]
    )
    result = resource.server_side_apply(
        body=obj,
        namespace=namespace if resource.namespaced else None,
        field_manager="chart-test",
        dry_run="All",
        force_conflicts=True,
        query_params=[("fieldValidation", "Strict")],
    )
    out: Manifest = result.to_dict()
    return out


# --------------------------------------------------------------------------------------------
# helm lint and the schema


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_strict(helm: Helm, values: tuple[str, ...]) -> None:
    proc = helm.run("lint", "--strict", CHART, *value_args(values))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


BAD_VALUES = {
    "replicas-not-a-number": ["operator.replicas=two"],
    "negative-replicas": ["operator.replicas=-1"],
    "two-replicas-without-leader-election": ["operator.leaderElection.enabled=false"],
    "metrics-port-out-of-range": ["agent.metricsPort=70000"],
    "unknown-key": ["agent.hostPID=true"],
    "unknown-top-level-key": ["rbac.create=false"],
    "pull-policy": ["image.pullPolicy=Sometimes"],
    "digest": ["image.digest=latest"],
    "interface-too-long": ["agent.interface=ipvs-interface-0"],
    "module-name": ["agent.modules={ip_vs;rm -rf}"],
    "privileged-not-bool": ["agent.privileged=yes please"],
    "scrape-interval": ["metrics.serviceMonitor.interval=often"],
    "update-strategy": ["agent.updateStrategy.type=Recreate"],
}


@pytest.mark.parametrize("sets", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(helm: Helm, sets: list[str]) -> None:
    args = ["template", RELEASE, CHART, *value_args((), sets)]
    proc = helm.run(*args, check=False)
    assert proc.returncode != 0, f"helm accepted {sets}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    lint = helm.run("lint", "--strict", CHART, *value_args((), sets), check=False)
    assert lint.returncode != 0


# --------------------------------------------------------------------------------------------
# Rendered objects on the API server


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_objects_pass_strict_server_side_validation(
    helm: Helm,
    admin: Any,
    k8s_namespace: str,
    servicemonitor_crd: None,
    values: tuple[str, ...],
) -> None:
    docs = helm.template(*values, namespace=k8s_namespace, include_crds=True)
    assert {"CustomResourceDefinition", "Deployment", "DaemonSet", "ClusterRole"} <= {
        d["kind"] for d in docs
    }
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            applied = dry_run_apply(admin, doc, k8s_namespace)
        except ApiException as exc:
            pytest.fail(f"the API server refused {where} ({values}):\n{exc.body}")
        assert applied["metadata"]["name"] == doc["metadata"]["name"], where


def test_defaults_render_the_expected_objects(helm: Helm) -> None:
    docs = helm.template()
    assert kinds(docs) == [
        ("ClusterRole", "ipvs-agent"),
        ("ClusterRole", "ipvs-operator"),
        ("ClusterRoleBinding", "ipvs-agent"),
        ("ClusterRoleBinding", "ipvs-operator"),
        ("DaemonSet", "ipvs-agent"),
        ("Deployment", "ipvs-operator"),
        ("PodDisruptionBudget", "ipvs-operator"),
        ("Role", "ipvs-agent"),
        ("Role", "ipvs-operator-leader-election"),
        ("RoleBinding", "ipvs-agent"),
        ("RoleBinding", "ipvs-operator-leader-election"),
        ("ServiceAccount", "ipvs-agent"),
        ("ServiceAccount", "ipvs-operator"),
    ]
    full = helm.template("full.yaml")
    assert {("ConfigMap", "ipvs-agent-dashboard"), ("Service", "ipvs-agent-metrics")} <= set(
        kinds(full)
    )
    assert ("ServiceMonitor", "ipvs-agent") in kinds(full)


def test_rbac_is_the_repository_rbac_moved_to_the_release_namespace(helm: Helm) -> None:
    rendered = helm.template(namespace="lb")
    source = [
        d
        for name in ("operator.yaml", "agent.yaml")
        for d in yaml.safe_load_all((CHART.parents[1] / "rbac" / name).read_text())
        if d
    ]
    for want in source:
        have = find(rendered, want["kind"], want["metadata"]["name"])
        for key in ("rules", "roleRef"):
            assert have.get(key) == want.get(key), f"{want['kind']} {key}"
        if "namespace" in want["metadata"]:
            assert have["metadata"]["namespace"] == "lb"
        for subject in have.get("subjects", []):
            assert subject["namespace"] == "lb"
        assert want["metadata"]["labels"].items() <= have["metadata"]["labels"].items()


def test_operator_deployment(helm: Helm) -> None:
    deployment = find(helm.template(), "Deployment", "ipvs-operator")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    op = container(pod, "operator")
    assert spec["replicas"] == 2
    assert "--leader-election" in op["args"]
    assert "--lease-name=ipvs-operator" in op["args"]  # the one Lease rbac/ lets it renew
    assert pod["serviceAccountName"] == "ipvs-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert op["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {e["name"] for e in op["env"]} >= {"POD_NAME", "POD_NAMESPACE"}
    health = {p["name"]: p["containerPort"] for p in op["ports"]}["health"]
    assert f"--health-port={health}" in op["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert op[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe
    assert op["resources"]["requests"] and op["resources"]["limits"]["memory"]
    pdb = find(helm.template(), "PodDisruptionBudget", "ipvs-operator")
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    single = helm.template("privileged.yaml")
    assert "PodDisruptionBudget" not in {d["kind"] for d in single}
    assert (
        "--no-leader-election"
        in container(find(single, "Deployment")["spec"]["template"]["spec"], "operator")["args"]
    )


def agent_pod(helm: Helm, *values: str) -> dict[str, Any]:
    spec: dict[str, Any] = find(helm.template(*values), "DaemonSet", "ipvs-agent")["spec"]
    return spec["template"]["spec"]  # type: ignore[no-any-return]


def test_agent_daemonset_has_net_admin_and_nothing_it_does_not_use(helm: Helm) -> None:
    pod = agent_pod(helm)
    agent = container(pod, "agent")
    modules = container(pod, "load-modules", init=True)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == "ipvs-agent"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in (
        agent["env"]
    )
    # NET_RAW: the layer-2 responder's raw sockets (agent.layer2.enabled, the default).
    assert agent["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "NET_RAW"],
    }
    assert modules["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_MODULE"]}
    for c in (agent, modules):
        assert "privileged" not in c["securityContext"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["lib-modules"]["hostPath"]["path"] == "/lib/modules"
    assert volumes["proc-sys-net"]["hostPath"]["path"] == "/proc/sys/net"
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert mounts["lib-modules"].get("readOnly") is True
    assert mounts["proc-sys-net"]["mountPath"] == "/host/proc/sys/net"
    assert {m["name"]: m.get("readOnly") for m in modules["volumeMounts"]} == {"lib-modules": True}
    port = {p["name"]: p["containerPort"] for p in agent["ports"]}["metrics"]
    assert f"--metrics-port={port}" in agent["args"]
    assert agent["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["startupProbe"]["periodSeconds"] * agent["startupProbe"]["failureThreshold"] == 60
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert agent["resources"]["requests"] and agent["resources"]["limits"]["memory"]


def test_agent_without_modules_has_no_sys_module(helm: Helm) -> None:
    pod = agent_pod(helm, "minimal-privileges.yaml")
    assert "initContainers" not in pod
    assert container(pod, "agent")["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]


def test_agent_privileged_is_an_option(helm: Helm) -> None:
    pod = agent_pod(helm, "privileged.yaml")
    agent = container(pod, "agent")
    assert agent["securityContext"]["privileged"] is True
    assert "proc-sys-net" not in {v["name"] for v in pod["volumes"]}


def test_agent_args_follow_values(helm: Helm) -> None:
    agent = container(agent_pod(helm, "full.yaml"), "agent")
    assert agent["command"] == ["ipvs-agent"]
    assert agent["args"] == [
        "run",
        "--interface=lvs0",
        "--resync-seconds=10",
        "--full-resync-seconds=120",
        "--metrics-port=9900",
        "--metrics-address=::",
        "--timeouts=1000000,120,300",
        "--protected-ports=22,6443",
        "--state-dir=/run/ipvs-agent",
        "--lease-seconds=3",
        "--renew-seconds=1",
        "--netns-dir=/var/run/netns",
        "--proc=",
        "--sysctl-root=/host/proc/sys",
    ]


def test_agent_args_parse_with_the_agents_own_parser(
    helm: Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ipvs_agent.__main__ as cli

    parsed: list[Any] = []

    def run_command(args: Any) -> int:
        parsed.append(args)
        return 0

    monkeypatch.setattr(cli, "run_command", run_command)
    agent = container(agent_pod(helm, "full.yaml"), "agent")
    assert cli.main(agent["args"]) == 0
    (args,) = parsed
    assert (args.interface, args.resync_seconds, args.metrics_port) == ("lvs0", 10.0, 9900)
    assert args.full_resync_seconds == 120.0
    assert (args.metrics_address, args.timeouts) == ("::", (1000000, 120, 300))
    assert (args.netns_dir, args.proc) == (["/var/run/netns"], "")
    assert args.sysctl_root == "/host/proc/sys", "sysctls through the mount"
    assert (args.protected_ports, args.state_dir, args.daemonset) == (
        [22, 6443],
        "/run/ipvs-agent",
        "",
    )


def test_agent_defaults_bind_metrics_to_the_node_and_clean_up_on_uninstall(helm: Helm) -> None:
    pod = agent_pod(helm)
    agent = container(pod, "agent")
    env = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in agent["env"]
    }
    assert env["NODE_IP"] == "status.hostIP" and env["POD_NAMESPACE"] == "metadata.namespace"
    assert "--metrics-address=$(NODE_IP)" in agent["args"], "never 0.0.0.0: not on the VIPs"
    assert "--daemonset=$(POD_NAMESPACE)/ipvs-agent" in agent["args"]
    assert (
        "--protected-ports=22,2379,2380,6443,9753,10249,10250,10255,10256,10257,10259"
        in (agent["args"])
    )
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["state"] == "/run/ipvs-agent"
    assert volumes["state"]["hostPath"] == {"path": "/run/ipvs-agent", "type": "DirectoryOrCreate"}
    assert "--sysctl-root=/host/proc/sys" in agent["args"]
    assert mounts["proc-sys-net"] == "/host/proc/sys/net"


def test_pod_real_servers_add_sys_admin_and_the_nodes_namespaces(helm: Helm) -> None:
    default = container(agent_pod(helm), "agent")
    assert "--netns-dir" not in " ".join(default["args"])
    assert "netns" not in {m["name"] for m in default["volumeMounts"]}
    pod = agent_pod(helm, "full.yaml")
    agent = container(pod, "agent")
    assert agent["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]
    mount = {m["name"]: m for m in agent["volumeMounts"]}["netns"]
    assert mount == {
        "name": "netns",
        "mountPath": "/var/run/netns",
        "readOnly": True,
        "mountPropagation": "HostToContainer",
    }
    volume = {v["name"]: v for v in pod["volumes"]}["netns"]
    assert volume["hostPath"]["path"] == "/var/run/netns"


def test_load_modules_script(helm: Helm, tmp_path: Path) -> None:
    """The init container's shell loop, run with a modprobe that has ip_vs_nope but cannot
    load it, and lacks ip_vs_absent altogether."""
    assert container(agent_pod(helm), "load-modules", init=True)["args"] == [
        "ip_vs",
        "ip_vs_lblc",
        "ip_vs_lblcr",
    ]
    init = container(agent_pod(helm, "full.yaml"), "load-modules", init=True)
    assert init["args"] == ["ip_vs", "ip_vs_wrr", "ip_vs_mh"]
    fake = tmp_path / "modprobe"
    fake.write_text(
        '#!/bin/sh\necho "$*" >> "$LOG"\n'
        'case "$*" in *ip_vs_absent) exit 1 ;; "-n -q ip_vs_nope") exit 0 ;; '
        "*ip_vs_nope) exit 1 ;; esac\n"
    )
    fake.chmod(0o755)
    log = tmp_path / "log"
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "LOG": str(log)}
    ok = subprocess.run([*init["command"], *init["args"]], env=env, check=False)
    assert ok.returncode == 0
    assert log.read_text().splitlines() == init["args"]
    bad = subprocess.run([*init["command"], "ip_vs", "ip_vs_nope"], env=env, check=False)
    assert bad.returncode == 1  # in the kernel, not loadable, not in /sys/module: no start
    absent = [*init["command"], "ip_vs_absent", "ip_vs"]
    skipped = subprocess.run(absent, env=env, check=False, capture_output=True, text=True)
    assert skipped.returncode == 0, "a module the kernel lacks is skipped"
    assert "ip_vs_absent is not in this kernel" in skipped.stdout
    assert log.read_text().splitlines()[-2:] == ["-n -q ip_vs_absent", "ip_vs"]


def test_agent_without_sysctls_has_no_mount_to_write_through(helm: Helm) -> None:
    agent = container(agent_pod(helm, "privileged.yaml"), "agent")
    assert agent["command"] == ["ipvs-agent"] and agent["args"][0] == "run"
    assert not any(a.startswith("--sysctl-root") for a in agent["args"])
    assert "proc-sys-net" not in {m["name"] for m in agent["volumeMounts"]}


# --------------------------------------------------------------------------------------------
# Pod Security admission: what the pods would face in a namespace with an enforced level


def pod_from(workload: Manifest, namespace: str) -> Manifest:
    template = workload["spec"]["template"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"psa-{workload['metadata']['name']}",
            "namespace": namespace,
            "labels": template["metadata"]["labels"],
        },
        "spec": template["spec"],
    }


@pytest.fixture
def psa_namespace(admin: Any) -> Iterator[Any]:
    """Make namespaces that enforce a Pod Security level, with the chart's ServiceAccounts."""
    core: Any = client.CoreV1Api(admin)  # plain dicts as bodies
    made: list[str] = []

    def make(level: str) -> str:
        name = f"psa-{level}-{len(made)}-{id(made) % 10000}"
        labels = {"pod-security.kubernetes.io/enforce": level}
        core.create_namespace({"metadata": {"name": name, "labels": labels}})
        for account in ("ipvs-operator", "ipvs-agent"):
            core.create_namespaced_service_account(name, {"metadata": {"name": account}})
        made.append(name)
        return name

    yield make
    for name in made:
        core.delete_namespace(name)


def create_pod_dry_run(admin: Any, pod: Manifest) -> None:
    core: Any = client.CoreV1Api(admin)
    core.create_namespaced_pod(
        pod["metadata"]["namespace"], pod, dry_run="All", field_validation="Strict"
    )


def test_operator_pod_meets_the_restricted_pod_security_level(
    helm: Helm, admin: Any, psa_namespace: Any
) -> None:
    namespace = psa_namespace("restricted")
    for values in (("defaults",), ("full.yaml",)):
        docs = helm.template(*(v for v in values if v != "defaults"), namespace=namespace)
        create_pod_dry_run(admin, pod_from(find(docs, "Deployment", "ipvs-operator"), namespace))


def test_agent_pod_needs_the_privileged_level(helm: Helm, admin: Any, psa_namespace: Any) -> None:
    baseline = psa_namespace("baseline")
    docs = helm.template(namespace=baseline)
    with pytest.raises(ApiException) as refused:
        create_pod_dry_run(admin, pod_from(find(docs, "DaemonSet", "ipvs-agent"), baseline))
    assert refused.value.status == 403
    for reason in ("host namespaces", "hostPath volumes", "NET_ADMIN"):
        assert reason in str(refused.value.body), reason
    privileged = psa_namespace("privileged")
    docs = helm.template(namespace=privileged)
    create_pod_dry_run(admin, pod_from(find(docs, "DaemonSet", "ipvs-agent"), privileged))


def test_helm_errors_carry_helm_output(helm: Helm) -> None:
    with pytest.raises(HelmError, match="Error"):
        helm.run("template", RELEASE, CHART / "no-such-dir")


@pytest.mark.parametrize("name", ["agent", "load-modules"])
def test_commands_read_without_helm_are_the_rendered_ones(helm: Helm, name: str) -> None:
    """tests/kernel/test_chart_privileges.py runs these in the VM, where helm is not built."""
    pod = agent_pod(helm)
    assert template_script(name) == container(pod, name, init=name != "agent")["command"]


def test_packaged_chart_renders_like_the_directory(helm: Helm, tmp_path: Path) -> None:
    """``helm package`` carries the copies (crds/, files/) that a symlink would have lost."""
    helm.run("package", CHART, "--destination", tmp_path)
    (archive,) = tmp_path.glob("ipvs-operator-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for path in [*CHART.glob("crds/*.yaml"), *CHART.glob("files/*/*")]:
        assert f"ipvs-operator/{path.relative_to(CHART)}" in names, path
    args = ["--include-crds", "--namespace", "ipvs-system", *value_args(("full.yaml",))]
    from_archive = helm.run("template", RELEASE, archive, *args).stdout
    from_directory = helm.run("template", RELEASE, CHART, *args).stdout
    assert from_archive == from_directory
