"""The test runtime does the kubelet's part for the chart's pods (tests/image/oci.py).

The image tests run the chart's pods with runc, not a kubelet; what a kubelet does before a
start must be reproduced here or the image tests test something else than a node runs.
"""

from __future__ import annotations

from pathlib import Path

from tests.image.oci import PodContext, expand, kubelet_env, runtime_spec
from tests.image.runner import CREATE_ANNOTATION

POD = PodContext(
    name="ipvs-agent-x",
    namespace="ipvs-system",
    node_name="node-1",
    host_ip="198.18.0.2",
    pod_ip="198.18.0.2",
    api_host="198.18.0.10",
    api_port=6443,
    volume_dirs={},
)


HOST_IP = {"fieldPath": "status.hostIP"}


def test_args_expand_variables_as_the_kubelet_does() -> None:
    env = {"NODE_IP": "198.18.0.2"}
    assert expand("--metrics-address=$(NODE_IP)", env) == "--metrics-address=198.18.0.2"
    assert expand("$$(NODE_IP)", env) == "$(NODE_IP)"  # $$ escapes
    assert expand("$(UNSET)", env) == "$(UNSET)"  # unknown names stay as written


def test_a_spec_carries_the_field_refs_and_the_directories_to_create() -> None:
    pod_spec = {
        "hostNetwork": True,
        "containers": [
            {
                "name": "agent",
                "args": ["run", "--metrics-address=$(NODE_IP)"],
                "env": [{"name": "NODE_IP", "valueFrom": {"fieldRef": HOST_IP}}],
                "volumeMounts": [{"name": "state", "mountPath": "/run/ipvs-agent"}],
            }
        ],
        "volumes": [
            {"name": "state", "hostPath": {"path": "/run/ipvs-agent", "type": "DirectoryOrCreate"}}
        ],
    }
    spec = runtime_spec(
        rootfs=Path("/rootfs"), image_config={"config": {"Entrypoint": ["ipvs-agent"]}},
        pod_spec=pod_spec, container_name="agent", pod=POD,
    )  # fmt: skip
    assert spec["process"]["args"] == ["ipvs-agent", "run", "--metrics-address=198.18.0.2"]
    assert "NODE_IP=198.18.0.2" in spec["process"]["env"]
    assert spec["annotations"][CREATE_ANNOTATION] == '["/run/ipvs-agent"]'


def test_env_values_and_args_expand_as_the_kubelet_does() -> None:
    """An env value sees the variables defined before it; args see the kubelet's variables,
    not the image's ENV (the runtime adds that, after the kubelet expanded)."""
    container = {
        "name": "agent",
        "image": "x",
        "args": ["--to=$(TARGET)", "--path=$(PATH)", "--late=$(LATE)"],
        "env": [
            {"name": "NODE_IP", "valueFrom": {"fieldRef": HOST_IP}},
            {"name": "TARGET", "value": "$(NODE_IP):$(KUBERNETES_SERVICE_PORT)"},
            {"name": "EARLY", "value": "$(LATE)"},
            {"name": "LATE", "value": "set"},
            {"name": "EMPTY"},
        ],
    }
    assert kubelet_env(container, POD) == {
        "KUBERNETES_SERVICE_HOST": "198.18.0.10",
        "KUBERNETES_SERVICE_PORT": "6443",
        "KUBERNETES_SERVICE_PORT_HTTPS": "6443",
        "NODE_IP": "198.18.0.2",
        "TARGET": "198.18.0.2:6443",
        "EARLY": "$(LATE)",
        "LATE": "set",
        "EMPTY": "",
    }
    spec = runtime_spec(
        rootfs=Path("/rootfs"), image_config={"config": {"Env": ["PATH=/usr/bin"]}},
        pod_spec={"containers": [container]}, container_name="agent", pod=POD,
    )  # fmt: skip
    assert spec["process"]["args"] == ["--to=198.18.0.2:6443", "--path=$(PATH)", "--late=set"]
    assert "PATH=/usr/bin" in spec["process"]["env"]
    assert "TARGET=198.18.0.2:6443" in spec["process"]["env"]
