"""The v1alpha1 contract on a real kube-apiserver: examples apply, invalid objects are refused.

Objects are sent with ``fieldValidation=Strict``, as ``kubectl apply`` does by default, so a
misspelt field is refused too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, dynamic
from kubernetes.client.exceptions import ApiException

from ipvs_api import constants, load, schema
from tests.apiserver.cluster import LocalApiServer
from tests.unit.test_health_api import VALID_SPECS
from tests.unit.test_validation import CORPUS, corpus_object

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


class Applier:
    """Creates any object by its apiVersion and kind, through API discovery."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.dynamic = dynamic.DynamicClient(api)

    def path(self, obj: dict[str, Any], namespace: str | None) -> tuple[str, bool]:
        res = self.dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        return res.path(namespace=namespace if res.namespaced else None), res.namespaced

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: list[tuple[str, str]] | None = None,
        accept: str = "application/json",
    ) -> Any:
        """One raw API call; raises ApiException with the server's Status on failure."""
        headers = {"Accept": accept, "Content-Type": "application/json"}
        args = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*args)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiException(status=response.status, reason=response.reason, body=data)
        return json.loads(data) if data else None

    def create(self, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
        path, namespaced = self.path(obj, namespace)
        body = json.loads(json.dumps(obj))
        if namespaced:
            body["metadata"]["namespace"] = namespace
        result: dict[str, Any] = self.request(
            "POST", path, body, query=[("fieldValidation", "Strict")]
        )
        return result

    def delete(self, obj: dict[str, Any], namespace: str) -> None:
        path, _ = self.path(obj, namespace)
        self.request("DELETE", f"{path}/{obj['metadata']['name']}")


@pytest.fixture(scope="module")
def applier(apiserver: LocalApiServer) -> Iterator[Applier]:
    with apiserver.api_client() as api:
        yield Applier(api)


@pytest.fixture(scope="module")
def namespace(applier: Applier) -> str:
    name = "contract"
    core = client.CoreV1Api(applier.api)
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    except ApiException as e:
        if e.status != 409:
            raise
    return name


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_applies_as_it_is(path: Path, applier: Applier, namespace: str) -> None:
    objects = list(load.read_manifests([path]))
    created: list[dict[str, Any]] = []
    try:
        for obj in objects:
            result = applier.create(obj, namespace)
            created.append(obj)
            if obj["apiVersion"] == constants.API_VERSION:
                # Defaults come back from the server exactly as ipvs_api computes them.
                local, _ = schema.validate(obj["kind"], obj)
                assert result["spec"] == local["spec"], "server and ipvs_api default alike"
    finally:
        for obj in reversed(created):
            applier.delete(obj, namespace)


@pytest.mark.parametrize("case", CORPUS, ids=[c["name"] for c in CORPUS])
def test_invalid_object_is_refused_naming_the_field(
    case: dict[str, Any], applier: Applier, namespace: str
) -> None:
    obj = corpus_object(case)
    with pytest.raises(ApiException) as info:
        applier.create(obj, namespace)
    status = json.loads(info.value.body or "{}")
    assert info.value.status in (400, 422), status
    causes = [c.get("field", "") for c in (status.get("details") or {}).get("causes", [])]
    message = status.get("message", "")
    named = case["field"] in causes or (not causes and case["field"] in message)
    assert named, f"expected {case['field']} in causes {causes} / message {message!r}"


def test_printer_columns_and_short_names(applier: Applier) -> None:
    def crd(name: str) -> dict[str, Any]:
        found: dict[str, Any] = applier.request(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}.ipvs.io"
        )
        return found

    vs = crd("virtualservers")
    columns = vs["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == [
        "Address",
        "Ports",
        "Scheduler",
        "Method",
        "Ready",
        "Age",
    ]
    assert vs["spec"]["names"]["shortNames"] == ["ivs"], "must not collide with Istio's vs"
    for name in ("virtualservers", "addresspools", "ipvsnodes"):
        found = crd(name)
        assert "ipvs" in found["spec"]["names"]["categories"]
        established = {c["type"]: c["status"] for c in found["status"]["conditions"]}
        assert established.get("Established") == "True"


def test_table_view_shows_the_columns(applier: Applier, namespace: str) -> None:
    """What `kubectl get ivs` prints: the server renders the printer columns as a Table."""
    obj = next(
        o
        for o in load.read_manifests([ROOT / "examples/dr-static.yaml"])
        if o["kind"] == constants.VIRTUAL_SERVER
    )
    applier.create(obj, namespace)
    try:
        table = applier.request(
            "GET",
            f"/apis/{constants.API_VERSION}/namespaces/{namespace}/virtualservers",
            accept="application/json;as=Table;v=v1;g=meta.k8s.io",
        )
        names = [c["name"] for c in table["columnDefinitions"]]
        row = dict(zip(names, table["rows"][0]["cells"], strict=True))
        assert row["Name"] == "api-dr"
        assert row["Ports"] == "443" and row["Scheduler"] == "mh" and row["Method"] == "DR"
    finally:
        applier.delete(obj, namespace)


def test_crd_manifests_round_trip_through_yaml() -> None:
    """The CRD files are plain YAML documents the chart can copy byte for byte."""
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "CustomResourceDefinition"


@pytest.mark.parametrize("name", sorted(VALID_SPECS))
def test_valid_health_and_feedback_specs_apply(name: str, applier: Applier, namespace: str) -> None:
    """Every check type and option that the offline tests read, the API server takes too."""
    obj = {
        "apiVersion": constants.API_VERSION,
        "kind": constants.VIRTUAL_SERVER,
        "metadata": {"name": name},
        "spec": VALID_SPECS[name],
    }
    applier.create(obj, namespace)
    applier.delete(obj, namespace)
