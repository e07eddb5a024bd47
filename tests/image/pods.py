"""The chart's pods run from the image without a kubelet: the lab's image mode (tests/e2e/bed.py).

The pod specs are the chart's own (``helm template`` with the values given); each container
becomes a runc bundle (tests/image/oci.py) whose root is the unpacked image. The agent's
bundles are written into the lab's VM share and started by tests/e2e/guest.py in the VM's
root network namespace (the pod has the host network); the operator runs on the host with
runc, as user 65532 on a read-only root.

What differs from a kubelet: no seccomp profile and no cgroup limits (see oci.py); the operator
shares the host's network namespace to reach the API server on 127.0.0.1 (a pod would reach
it through the ``kubernetes`` Service); its ServiceAccount token is a TokenRequest token
written once, not a projected volume the kubelet refreshes.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client

from tests.apiserver.cluster import LocalApiServer
from tests.chart.helm import CHART, Helm, documents, find
from tests.image.oci import PodContext, runtime_spec
from tests.image.runner import Container

NAMESPACE = "ipvs-system"


@dataclass(frozen=True)
class ImageRun:
    """What the lab needs to run the chart's pods from the image."""

    rootfs: Path
    image_config: dict[str, Any]
    helm: Helm
    #: --set pairs for helm template
    values: tuple[str, ...] = ()


def pod_specs(run: ImageRun, *extra: str) -> dict[str, dict[str, Any]]:
    """The agent's and the operator's pod specs as the chart renders them."""
    args: list[str | Path] = ["template", "ipvs", CHART, "--namespace", NAMESPACE]
    for pair in (*run.values, *extra):
        args += ["--set", pair]
    docs = documents(run.helm.run(*args).stdout)
    return {
        "agent": find(docs, "DaemonSet", "ipvs-agent")["spec"]["template"]["spec"],
        "operator": find(docs, "Deployment", "ipvs-operator")["spec"]["template"]["spec"],
    }


def write_token(api: LocalApiServer, service_account: str, folder: Path) -> None:
    """What the kubelet's projected token volume holds: token, ca.crt, namespace."""
    with api.api_client() as admin:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3 * 3600)
        )
        response: Any = client.CoreV1Api(admin).create_namespaced_service_account_token(
            service_account, NAMESPACE, request
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "token").write_text(response.status.token)
    (folder / "ca.crt").write_bytes((api.kubeconfig.parent / "pki" / "ca.crt").read_bytes())
    (folder / "namespace").write_text(NAMESPACE)


def agent_bundles(
    run: ImageRun,
    spec: dict[str, Any],
    *,
    host_dir: Path,
    vm_dir: str,
    node_name: str,
    host_ip: str,
    api_host: str,
    api_port: int,
) -> None:
    """One bundle per container of the agent's pod under ``host_dir`` (``vm_dir`` in the VM)."""
    (host_dir / "tmp").mkdir(parents=True, exist_ok=True)
    pod = PodContext(
        name="ipvs-agent-image", namespace=NAMESPACE, node_name=node_name, host_ip=host_ip,
        pod_ip=host_ip, api_host=api_host, api_port=api_port,
        volume_dirs={"tmp": Path(vm_dir) / "tmp", "kube-api-access": Path(vm_dir) / "token"},
    )  # fmt: skip
    containers = [(c["name"], True) for c in spec.get("initContainers", [])]
    containers += [(c["name"], False) for c in spec["containers"]]
    for name, init in containers:
        bundle = Container(name, host_dir / name, host_dir / "state", host_dir / f"{name}.log")
        config = runtime_spec(
            rootfs=run.rootfs, image_config=run.image_config, pod_spec=spec,
            container_name=name, pod=pod, init=init,
        )  # fmt: skip
        bundle.write_spec(config)


class ImageOperator:
    """The operator's container from the chart, run from the image with runc on the host.

    The same surface as tests/operator/harness.Operator (start, alive, stop, tail, log).
    """

    def __init__(
        self, run: ImageRun, api: LocalApiServer, folder: Path, name: str, health_port: int
    ) -> None:
        self.run = run
        self.api = api
        self.folder = folder
        self.name = name
        self.health_port = health_port
        self.log = folder / "operator.log"
        self.container = Container(name, folder / "bundle", folder / "state", self.log)

    def start(self) -> ImageOperator:
        spec = pod_specs(self.run, f"operator.healthPort={self.health_port}")["operator"]
        write_token(self.api, "ipvs-operator", self.folder / "token")
        (self.folder / "tmp").mkdir(parents=True, exist_ok=True)
        pod = PodContext(
            name=self.name, namespace=NAMESPACE, node_name="host", host_ip="127.0.0.1",
            pod_ip="127.0.0.1", api_host="127.0.0.1", api_port=self.api.port,
            volume_dirs={"tmp": self.folder / "tmp", "kube-api-access": self.folder / "token"},
        )  # fmt: skip
        config = runtime_spec(
            rootfs=self.run.rootfs, image_config=self.run.image_config, pod_spec=spec,
            container_name="operator", pod=pod,
        )  # fmt: skip
        # The host's network namespace: the API server listens on the host's loopback.
        config["linux"]["namespaces"] = [
            ns for ns in config["linux"]["namespaces"] if ns["type"] not in ("network", "uts")
        ]
        config.pop("hostname", None)
        self.container.write_spec(config)
        self.container.start()
        return self

    def alive(self) -> bool:
        return self.container.running()

    @property
    def pid(self) -> int:
        return self.container.pid

    def stop(self, timeout: float = 20.0) -> None:
        self.container.stop(timeout)

    def tail(self, lines: int = 60) -> str:
        return self.container.tail(lines)


def encode(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_until(what: str, probe: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
