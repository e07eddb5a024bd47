"""Smoke tests of the API-server test bed itself (tests/apiserver).

If these fail, every contract test under tests/api/ is suspect, so they check the bed's
promises one by one: the right version, plain CRUD, CRDs Established, and RBAC enforced.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.apiserver.cluster import LocalApiServer, kubernetes_version
from tests.apiserver.fixtures import repo_crd_files
from tests.unit.test_vm_qemu import gone

TEST_GROUP = "testbed.ipvs-operator.example"


def test_version_is_the_built_release(apiserver: LocalApiServer) -> None:
    with apiserver.api_client() as api:
        info = client.VersionApi(api).get_code()
    want = kubernetes_version()
    assert info.git_version == want
    assert (info.major, info.minor) == ("1", want.split(".")[1])


def test_namespace_is_created_and_listed(apiserver: LocalApiServer, k8s_namespace: str) -> None:
    with apiserver.api_client() as api:
        listed = client.CoreV1Api(api).list_namespace().to_dict()["items"]
    names = {ns["metadata"]["name"] for ns in listed}
    assert k8s_namespace in names
    assert "default" in names


def test_repo_crds_are_established(apiserver: LocalApiServer) -> None:
    files = repo_crd_files()
    assert files, "crds/*.yaml is empty: the project's CRDs should be installed by the fixture"
    want = set()
    for path in files:
        with path.open() as f:
            want |= {d["metadata"]["name"] for d in yaml.safe_load_all(f) if d}
    with apiserver.api_client() as api:
        listed = client.ApiextensionsV1Api(api).list_custom_resource_definition().to_dict()
    crds = {c["metadata"]["name"]: c for c in listed["items"]}
    for name in sorted(want):
        assert name in crds, f"CRD {name} from crds/ is not installed"
        conditions = {c["type"]: c["status"] for c in crds[name]["status"]["conditions"]}
        assert conditions.get("Established") == "True", f"{name}: {conditions}"


def _widget_crd(extra_column: bool) -> dict[str, Any]:
    column = {"name": "Size", "type": "integer", "jsonPath": ".spec.size"}
    columns = [column] if extra_column else []
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{TEST_GROUP}"},
        "spec": {
            "group": TEST_GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def test_install_crds_creates_updates_and_serves(
    apiserver: LocalApiServer, k8s_namespace: str, tmp_path: Path
) -> None:
    path = tmp_path / "widget.yaml"
    path.write_text(yaml.safe_dump(_widget_crd(extra_column=False)))
    assert apiserver.install_crds([path]) == [f"widgets.{TEST_GROUP}"]
    # A second install of a changed file updates in place instead of failing with 409.
    path.write_text(yaml.safe_dump(_widget_crd(extra_column=True)))
    apiserver.install_crds([path])
    with apiserver.api_client() as api:
        extensions = client.ApiextensionsV1Api(api)
        crd = extensions.read_custom_resource_definition(f"widgets.{TEST_GROUP}").to_dict()
        assert crd["spec"]["versions"][0]["additional_printer_columns"][0]["name"] == "Size"
        objects = client.CustomObjectsApi(api)
        body = {"apiVersion": f"{TEST_GROUP}/v1", "kind": "Widget", "metadata": {"name": "w"}}
        objects.create_namespaced_custom_object(
            TEST_GROUP, "v1", k8s_namespace, "widgets", {**body, "spec": {"size": 3}}
        )
        # The schema is enforced by the real server, which is the point of this bed.
        with pytest.raises(ApiException) as denied:
            objects.create_namespaced_custom_object(
                TEST_GROUP,
                "v1",
                k8s_namespace,
                "widgets",
                {**body, "metadata": {"name": "bad"}, "spec": {"size": 0}},
            )
        assert denied.value.status == 422


def test_service_account_is_denied_then_allowed_by_rbac(
    apiserver: LocalApiServer, k8s_namespace: str
) -> None:
    sa = "rbac-probe"
    with apiserver.client_for_service_account(k8s_namespace, sa) as sa_client:
        core = client.CoreV1Api(sa_client)
        # 403 rather than 401: the token authenticated, and RBAC said no.
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_secret(k8s_namespace)
        assert denied.value.status == 403
        assert f"system:serviceaccount:{k8s_namespace}:{sa}" in str(denied.value.body)

        with apiserver.api_client() as admin:
            rbac = client.RbacAuthorizationV1Api(admin)
            rbac.create_namespaced_role(
                k8s_namespace,
                client.V1Role(
                    metadata=client.V1ObjectMeta(name="secret-reader"),
                    rules=[
                        client.V1PolicyRule(api_groups=[""], resources=["secrets"], verbs=["list"])
                    ],
                ),
            )
            rbac.create_namespaced_role_binding(
                k8s_namespace,
                client.V1RoleBinding(
                    metadata=client.V1ObjectMeta(name="secret-reader"),
                    role_ref=client.V1RoleRef(
                        api_group="rbac.authorization.k8s.io", kind="Role", name="secret-reader"
                    ),
                    subjects=[
                        client.RbacV1Subject(
                            kind="ServiceAccount", name=sa, namespace=k8s_namespace
                        )
                    ],
                ),
            )
        # The RBAC authorizer reads from an informer cache: poll until the grant lands.
        deadline = time.monotonic() + 10
        while True:
            try:
                core.list_namespaced_secret(k8s_namespace)
                break
            except ApiException as e:
                if e.status != 403 or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
        # Still only what was granted.
        with pytest.raises(ApiException) as still_denied:
            core.list_namespaced_config_map(k8s_namespace)
        assert still_denied.value.status == 403


#: A bench's shape: exit_on_signals first, then an API server it must not leave behind.
SIGNALLED = """
import time
from tests.apiserver.cluster import LocalApiServer
from tests.vm.qemu import exit_on_signals

exit_on_signals()
with LocalApiServer() as bed:
    print(bed._apiserver.pid, bed._etcd.pid, bed.dir, bed._etcd_data, flush=True)
    time.sleep(600)
"""


def test_a_bench_stopped_by_sigterm_stops_its_api_server_and_removes_its_data() -> None:
    """The host-side benches call ``exit_on_signals`` before they start an API server, so a
    SIGTERM unwinds the run and ``LocalApiServer.stop`` runs. That stops kube-apiserver and
    etcd, and it removes their directories. One of those directories is etcd's data in
    /dev/shm, which is memory. Without the call, the parent-death signal still kills both
    processes, but both directories stay behind."""
    import os
    import signal
    import subprocess
    import sys

    checkout = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED], cwd=checkout, stdout=subprocess.PIPE, text=True
    )
    started: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the bed prints once ready (its own start is bounded)
        fields = line.split()
        assert len(fields) == 4, f"the child printed {line!r} (exit {proc.poll()})"
        started = [int(fields[0]), int(fields[1])]
        directories = [Path(fields[2]), Path(fields[3])]
        assert all(d.is_dir() for d in directories)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while not all(gone(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in started), "kube-apiserver or etcd outlived the run"
        assert not any(d.exists() for d in directories), "the bed's directories were left"
    finally:
        for pid in started:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
