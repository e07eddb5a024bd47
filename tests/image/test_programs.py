"""Both programs run from the image, under exactly the chart's security contexts.

The containers are the chart's (``helm template``), turned into runc bundles whose root is
the unpacked image (tests/image/oci.py, tests/image/pods.py):

* the operator on the host, as user 65532 with no capability, no_new_privs and a read-only
  root, against a real kube-apiserver: it leads, allocates an address for a LoadBalancer
  Service from an AddressPool and reports it in the Service's status and its VirtualServer's;
* the lab (tests/e2e/bed.py) in image mode: the operator as above, and the agent's pod in the
  IPVS VM — its init container loads ip_vs with SYS_MODULE alone, then the agent runs with
  NET_ADMIN and NET_RAW (layer-2 announcement) alone on a read-only root, with the chart's
  mounts, arguments and environment (in-cluster configuration through the ServiceAccount
  token): it answers the chart's probes on the chart's port, programs IPVS and serves real
  connections.
"""

from __future__ import annotations

import ipaddress
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apiserver.cluster import REPO_ROOT, LocalApiServer, TestBedError, build_binaries
from tests.apiserver.fixtures import repo_crd_files, running_apiserver
from tests.chart.helm import Helm, container
from tests.e2e import scenario as sc
from tests.e2e.bed import GUEST_ADDRESS, LabBed, free_port
from tests.e2e.fixtures import lab_up, terminal_log
from tests.image.oci import Image
from tests.image.pods import ImageOperator, ImageRun, pod_specs
from tests.image.runner import capability_names, process_status, root_mount_options
from tests.operator import harness
from tests.operator.harness import wait_for

POOL = "image-test"
POOL_RANGE = "192.0.2.64/28"


@pytest.fixture(scope="module")
def image_run(image: Image, rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageRun:
    failure = ""
    try:
        helm = build_binaries("helm")["helm"]
    except (TestBedError, KeyError) as error:
        failure = str(error)
    if failure:
        pytest.fail(f"helm unavailable (tests/apiserver/build.sh helm):\n{failure}", False)
    return ImageRun(
        rootfs=rootfs,
        image_config=image.config(),
        helm=Helm(helm, tmp_path_factory.mktemp("helm-home")),
    )


def prepare(server: LocalApiServer) -> None:
    server.install_crds(repo_crd_files())
    with server.api_client() as api:
        harness.core(api).create_namespace({"metadata": {"name": harness.OPERATOR_NAMESPACE}})
        for name in ("operator.yaml", "agent.yaml"):
            harness.apply_manifests(api, REPO_ROOT / "rbac" / name)


@pytest.fixture(scope="module")
def bed() -> Iterator[LocalApiServer]:
    with running_apiserver(prepare) as server:
        yield server


def healthz(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return str(response.read().decode().strip())
    except OSError:
        return ""


@pytest.mark.apiserver
def test_operator_from_the_image_allocates_and_reports(
    bed: LocalApiServer, image_run: ImageRun, tmp_path: Path
) -> None:
    port = free_port()
    operator = ImageOperator(image_run, bed, tmp_path, "ipvs-operator-image", port)
    spec = pod_specs(image_run, f"operator.healthPort={port}")["operator"]
    assert container(spec, "operator")["readinessProbe"]["httpGet"]["port"] == "health"
    operator.start()
    try:
        # The chart's probes go to the named port "health", the --health-port it passes.
        assert wait_for("/healthz to answer leader", lambda: healthz(port) == "leader", 60)
        status = process_status(operator.pid)
        assert status["Uid"].split() == ["65532"] * 4
        assert status["Gid"].split() == ["65532"] * 4
        assert capability_names(status["CapEff"]) == set()
        assert capability_names(status["CapBnd"]) == set()
        assert status["NoNewPrivs"] == "1"
        assert "ro" in root_mount_options(operator.pid)
        with bed.api_client() as admin:
            assert harness.lease_holder(admin) == "ipvs-operator-image"
            harness.custom(admin).create_cluster_custom_object(
                harness.GROUP, harness.VERSION, "addresspools",
                harness.address_pool(POOL, [POOL_RANGE]),
            )  # fmt: skip
            body = harness.service("web", annotations={"ipvs.io/address-pool": POOL})
            harness.core(admin).create_namespaced_service("default", body)
            found = wait_for("an ingress address", lambda: harness.ingress(admin, "default", "web"))
            address = found[0]["ip"]
            assert ipaddress.ip_address(address) in ipaddress.ip_network(POOL_RANGE)
            assert found == [{"ip": address, "ipMode": "Proxy"}]
            (vs,) = harness.list_vs(admin, "default")
            assert vs["status"]["address"] == address
            wait_for(
                "an AddressAllocated Event",
                lambda: any(
                    r == "AddressAllocated" for _, r, _ in harness.events(admin, "default")
                ),
            )
        assert operator.alive(), operator.tail()
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- operator log ---\n{operator.tail()}") from None
    finally:
        operator.stop()


# -- the lab, with both programs from the image ------------------------------------------


@pytest.fixture(scope="module")
def image_lab(image_run: ImageRun, request: pytest.FixtureRequest) -> Iterator[LabBed]:
    bed = LabBed(terminal_log(request, "image lab"), resync_seconds=10, image=image_run)
    yield from lab_up(bed, "the lab (image mode)", lambda: sc.prepare(bed))


@pytest.mark.apiserver
@pytest.mark.kernel
def test_agent_from_the_image_programs_ipvs_and_serves(
    image_lab: LabBed, image_run: ImageRun
) -> None:
    lab = image_lab
    spec: Any = pod_specs(image_run)["agent"]
    agent = container(spec, "agent")
    # The kubelet's probes of a host-network pod: the node's address, the named port.
    (port,) = [p["containerPort"] for p in agent["ports"] if p["name"] == "metrics"]
    for probe in ("livenessProbe", "readinessProbe"):
        get = agent[probe]["httpGet"]
        assert get["port"] == "metrics"
        answer = lab.call("http_get", url=f"http://{GUEST_ADDRESS}:{port}{get['path']}")
        assert answer["status"] == 200, (probe, answer)

    status = lab.call("container_status")
    proc = status["status"]
    assert proc["Uid"].split() == ["0"] * 4
    assert capability_names(proc["CapEff"]) == {"NET_ADMIN", "NET_RAW"}
    assert capability_names(proc["CapBnd"]) == {"NET_ADMIN", "NET_RAW"}
    assert proc["NoNewPrivs"] == "1"
    assert "ro" in status["root"]
    init_log = (lab.share / "agent-init.log").read_text()
    assert "load-modules" not in init_log or "error" not in init_log.lower(), init_log
    assert lab.call("run", argv=["sh", "-c", "test -d /sys/module/ip_vs"])["code"] == 0

    # A static VirtualServer: wrr 3:2:1 gives exactly 30/20/10 of 60 connections.
    vip = sc.NAT_VIP
    sc.apply_virtual_server(lab, sc.virtual_server("image-nat", vip, weights=(3, 2, 1)))
    sc.expect_service(lab, vip, "wrr", {"rs1": 3, "rs2": 2, "rs3": 1})
    assert sc.connections(lab, vip, 60) == {"rs1": 30, "rs2": 20, "rs3": 10}

    # A LoadBalancer Service: the operator from the image allocates, the agent programs.
    sc.apply_endpoint_slice(
        lab, sc.endpoint_slice("image-web", {"rs1": "ready", "rs2": "ready", "rs3": "ready"})
    )
    harness.core(lab.admin).create_namespaced_service(
        sc.NAMESPACE, sc.load_balancer_service("image-web", scheduler="rr")
    )
    address = sc.service_address(lab, "image-web")
    sc.expect_service(lab, address, "rr", {"rs1": 1, "rs2": 1, "rs3": 1})
    assert sc.connections(lab, address, 30) == {"rs1": 10, "rs2": 10, "rs3": 10}
    vs = wait_for(
        "the Service's VirtualServer Ready",
        lambda: [
            v
            for v in harness.list_vs(lab.admin, sc.NAMESPACE)
            if v["metadata"]["name"] != "image-nat"
            and harness.condition(v, "Ready").get("status") == "True"
        ],
        120,
    )
    assert vs[0]["status"]["address"] == address
    assert lab.call("agent_alive"), lab.agent_log_tail()


@pytest.mark.apiserver
@pytest.mark.kernel
def test_agent_from_the_image_peers_over_bgp(image_lab: LabBed) -> None:
    """ExaBGP from the image, in the chart's agent container (read-only root, its files under
    the state directory, the chart's capabilities): a session with BIRD, a VIP announced."""
    from tests.e2e import guest

    lab = image_lab
    lab.call("start_router")
    api = harness.custom(lab.admin)
    api.create_cluster_custom_object(
        harness.GROUP, harness.VERSION, "bgppeers",
        {"apiVersion": "ipvs.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "r1"},
         "spec": {"address": guest.ROUTER, "asn": 64512, "localASN": 64513,
                  "holdTimeSeconds": 9}},
    )  # fmt: skip
    pool = harness.address_pool("image-bgp", ["203.0.113.248/29"], autoAssign=False, bgp={})
    api.create_cluster_custom_object(harness.GROUP, harness.VERSION, "addresspools", pool)
    vip = "203.0.113.249"
    body = sc.virtual_server("image-bgp", vip, weights=(1, 1, 1))
    body["spec"]["addressPool"] = "image-bgp"
    sc.apply_virtual_server(lab, body)

    def session() -> dict[str, Any]:
        node = api.get_cluster_custom_object(
            harness.GROUP, harness.VERSION, "ipvsnodes", lab.nodes[0]
        )
        sessions = ((node.get("status") or {}).get("bgp") or {}).get("sessions") or []
        return next((s for s in sessions if s.get("peer") == "r1"), {})

    wait_for("the session with r1 Established", lambda: session().get("state") == "Established",
             300)  # fmt: skip
    wait_for(
        f"{vip} in the router's FIB via the node",
        lambda: f"{vip} via {guest.NODE_LAN_CLIENT}" in lab.call("router_routes"),
        120,
    )
    assert session()["prefixes"] == 1, session()
    assert lab.call("agent_alive"), lab.agent_log_tail()
