"""``helm install``, ``upgrade`` and ``uninstall`` on a real kube-apiserver.

No kubelet or controllers run on the bed, so no pod ever starts and ``--wait`` would hang:
these tests check what the API server holds after each step — the CRDs Established, every
object of the release present with the values asked for, and gone again after uninstall
(except the CRDs, which Helm never deletes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from tests.apiserver.cluster import LocalApiServer
from tests.chart.helm import CHART, RELEASE, Helm, container, documents, value_args

NAMESPACE = "ipvs-system"
CRDS = {
    "virtualservers.ipvs.io",
    "addresspools.ipvs.io",
    "ipvsnodes.ipvs.io",
    "ipvsnodereports.ipvs.io",
}
pytestmark = pytest.mark.apiserver


@pytest.fixture(scope="module")
def admin(apiserver: LocalApiServer) -> Iterator[Any]:
    with apiserver.api_client() as api:
        yield api


def helm_k(helm: Helm, kubeconfig: Path, *args: str | Path) -> str:
    return helm.run(*args, "--kubeconfig", kubeconfig, "--namespace", NAMESPACE).stdout


def read(admin: Any, api_version: str, kind: str, name: str, namespace: str = "") -> Any:
    """One object as a dict (the dynamic client's view), or a 404 ApiException."""
    resource = dynamic.DynamicClient(admin).resources.get(api_version=api_version, kind=kind)
    return resource.get(name=name, namespace=namespace or None).to_dict()


def crd_conditions(admin: Any) -> dict[str, dict[str, str]]:
    resource = dynamic.DynamicClient(admin).resources.get(
        api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition"
    )
    return {
        crd["metadata"]["name"]: {
            c["type"]: c["status"] for c in crd.get("status", {}).get("conditions", [])
        }
        for crd in resource.get().to_dict()["items"]
        if crd["metadata"]["name"] in CRDS
    }


def release_objects(helm: Helm, kubeconfig: Path) -> list[dict[str, Any]]:
    return documents(helm_k(helm, kubeconfig, "get", "manifest", RELEASE))


def exists(admin: Any, obj: dict[str, Any]) -> bool:
    meta = obj["metadata"]
    try:
        read(admin, obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace", ""))
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


def test_install_upgrade_uninstall(helm: Helm, kubeconfig: Path, admin: Any) -> None:
    assert crd_conditions(admin) == {}, "the bed must start without the CRDs"
    out = helm_k(helm, kubeconfig, "install", RELEASE, CHART, "--create-namespace")
    assert "STATUS: deployed" in out
    assert "pod-security.kubernetes.io/enforce=privileged" in out  # NOTES: what to do next

    # The CRDs came from the chart's crds/ and are served.
    conditions = crd_conditions(admin)
    assert set(conditions) == CRDS
    for name, state in conditions.items():
        assert state.get("Established") == "True", name
        assert state.get("NamesAccepted") == "True", name
    custom: Any = client.CustomObjectsApi(admin)
    pool = {
        "apiVersion": "ipvs.io/v1alpha1",
        "kind": "AddressPool",
        "metadata": {"name": "chart-test"},
        "spec": {"addresses": ["192.0.2.0/28"]},
    }
    custom.create_cluster_custom_object("ipvs.io", "v1alpha1", "addresspools", pool)

    # Every object of the release is on the server.
    objects = release_objects(helm, kubeconfig)
    assert len(objects) == 13
    for obj in objects:
        assert exists(admin, obj), f"{obj['kind']}/{obj['metadata']['name']}"
    deployment = read(admin, "apps/v1", "Deployment", "ipvs-operator", NAMESPACE)
    assert deployment["spec"]["replicas"] == 2
    daemonset = read(admin, "apps/v1", "DaemonSet", "ipvs-agent", NAMESPACE)
    assert daemonset["spec"]["template"]["spec"]["hostNetwork"] is True
    binding = read(admin, "rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "ipvs-agent")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ipvs-agent", "namespace": NAMESPACE}
    ]

    # upgrade: new values reach the objects; a newly enabled ConfigMap appears.
    sets = [
        "operator.replicas=3",
        "agent.metricsPort=9900",
        "metrics.dashboard.enabled=true",
        "metrics.service.enabled=true",
    ]
    out = helm_k(helm, kubeconfig, "upgrade", RELEASE, CHART, *value_args((), sets))
    assert "REVISION: 2" in out
    assert read(admin, "apps/v1", "Deployment", "ipvs-operator", NAMESPACE)["spec"]["replicas"] == 3
    pod = read(admin, "apps/v1", "DaemonSet", "ipvs-agent", NAMESPACE)["spec"]["template"]["spec"]
    assert "--metrics-port=9900" in container(pod, "agent")["args"]
    dashboard = read(admin, "v1", "ConfigMap", "ipvs-agent-dashboard", NAMESPACE)
    shipped = json.loads((CHART / "files" / "dashboards" / "ipvs-agent.json").read_text())
    assert json.loads(dashboard["data"]["ipvs-agent.json"]) == shipped
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    service = read(admin, "v1", "Service", "ipvs-agent-metrics", NAMESPACE)
    assert service["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("metrics", 9900)]

    # upgrade back to the defaults: what is no longer rendered is deleted.
    helm_k(helm, kubeconfig, "upgrade", RELEASE, CHART, "--reset-values")
    with pytest.raises(ApiException) as gone:
        read(admin, "v1", "ConfigMap", "ipvs-agent-dashboard", NAMESPACE)
    assert gone.value.status == 404
    history = json.loads(helm_k(helm, kubeconfig, "history", RELEASE, "--output", "json"))
    assert [(h["revision"], h["status"]) for h in history] == [
        (1, "superseded"),
        (2, "superseded"),
        (3, "deployed"),
    ]

    # uninstall: every object of the release goes; the CRDs and the objects in them stay.
    objects = release_objects(helm, kubeconfig)
    out = helm_k(helm, kubeconfig, "uninstall", RELEASE)
    assert "uninstalled" in out
    left = [f"{o['kind']}/{o['metadata']['name']}" for o in objects if exists(admin, o)]
    assert left == []
    assert set(crd_conditions(admin)) == CRDS
    assert custom.get_cluster_custom_object("ipvs.io", "v1alpha1", "addresspools", "chart-test")
    custom.delete_cluster_custom_object("ipvs.io", "v1alpha1", "addresspools", "chart-test")
