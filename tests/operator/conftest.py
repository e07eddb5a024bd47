"""Fixtures for the operator on a real kube-apiserver.

These tests start their own API-server bed rather than the shared ``apiserver`` fixture: it is
dual-stack (a second service CIDR, so dual-stack Services exist), and a cluster-wide operator on
it sees only this package's objects, not the leftovers of other tests in namespaces that never
finish deleting (no namespace controller runs). A missing environment fails, never skips.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.apiserver.cluster import REPO_ROOT, LocalApiServer
from tests.apiserver.fixtures import repo_crd_files, running_apiserver
from tests.operator import harness

DUAL_STACK = "--service-cluster-ip-range=10.96.0.0/16,fd00:10:96::/112"
_ranges = itertools.count(1)
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark this package's tests ``apiserver``, so ``-m "not apiserver"`` leaves them out too."""
    for item in items:
        if Path(str(item.path)).is_relative_to(_HERE):
            item.add_marker(pytest.mark.apiserver)


@pytest.fixture(autouse=True)
def _apiserver_for_marked_tests() -> None:
    """Overrides the shared plugin's fixture: these tests bring their own bed (``bed``)."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome: Any = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_FAILED] = report.failed


_FAILED = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def bed() -> Iterator[LocalApiServer]:
    """A dual-stack kube-apiserver with the CRDs, the ipvs-system namespace and rbac/ applied."""

    def prepare(server: LocalApiServer) -> None:
        server.install_crds(repo_crd_files())
        with server.api_client() as api:
            harness.core(api).create_namespace({"metadata": {"name": harness.OPERATOR_NAMESPACE}})
            for name in ("operator.yaml", "agent.yaml"):
                harness.apply_manifests(api, REPO_ROOT / "rbac" / name)

    with running_apiserver(prepare, extra_apiserver_args=[DUAL_STACK]) as server:
        yield server


@pytest.fixture(scope="session")
def admin(bed: LocalApiServer) -> Iterator[Any]:
    with bed.api_client() as api:
        yield api


@pytest.fixture(scope="session")
def operator_kubeconfig(bed: LocalApiServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    return harness.service_account_kubeconfig(
        bed, harness.OPERATOR_NAMESPACE, harness.OPERATOR_SA, path
    )


def start_operator(kubeconfig: Path, log_dir: Path, identity: str, *args: str) -> harness.Operator:
    return harness.Operator(kubeconfig, log_dir / f"{identity}.log", identity, args).start()


@pytest.fixture(scope="module")
def operator(
    admin: Any,
    operator_kubeconfig: Path,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[harness.Operator]:
    """One operator for the module (the cluster's default load balancer), leading."""
    name = re.sub(r"[^a-z0-9]+", "-", request.module.__name__.rsplit(".", 1)[-1].lower())
    op = start_operator(
        operator_kubeconfig, tmp_path_factory.mktemp("logs"), name, "--default-load-balancer"
    )
    try:
        harness.wait_for(
            f"{name} to hold the Lease",
            lambda: harness.lease_holder(admin) == name or not op.alive(),
            timeout=30,
        )
        assert op.alive(), f"operator exited:\n{op.tail()}"
        yield op
    finally:
        status = op.stop()
        assert status == 0, f"operator exited with {status}:\n{op.tail()}"


@pytest.fixture(autouse=True)
def _operator_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the operator's log tail after a failed test (pytest shows captured output)."""
    yield
    if request.node.stash.get(_FAILED, False) and "operator" in request.fixturenames:
        op: harness.Operator = request.getfixturevalue("operator")
        print(f"--- operator log ({op.log}) ---\n{op.tail(120)}")


@contextmanager
def _namespace(admin: Any, base: str) -> Iterator[str]:
    """A fresh namespace; its Services, VirtualServers and EndpointSlices are deleted after.

    Deleted explicitly because nothing garbage-collects here, and a VirtualServer left behind
    would keep its address in the next test's operator.
    """
    name = f"{base}-{secrets.token_hex(3)}"
    core = harness.core(admin)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    custom = harness.custom(admin)
    deletions: list[Callable[[], Any]] = [
        *(
            lambda n=svc.metadata.name: core.delete_namespaced_service(n, name)
            for svc in core.list_namespaced_service(name).items
        ),
        *(
            lambda n=vs["metadata"]["name"]: custom.delete_namespaced_custom_object(
                harness.GROUP, harness.VERSION, name, "virtualservers", n
            )
            for vs in harness.list_vs(admin, name)
        ),
        lambda: harness.discovery(admin).delete_collection_namespaced_endpoint_slice(name),
    ]
    for delete in deletions:
        try:
            delete()
        except ApiException as exc:
            if exc.status != 404:  # the operator may have deleted it first
                raise
    core.delete_namespace(name)


def _base_name(request: pytest.FixtureRequest, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:length].strip("-")


@pytest.fixture
def ns(admin: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for the test, cleaned up after it."""
    with _namespace(admin, _base_name(request)) as name:
        yield name


@pytest.fixture
def other_ns(admin: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A second namespace (another tenant), cleaned up after the test."""
    with _namespace(admin, "other-" + _base_name(request, 30)) as name:
        yield name


@pytest.fixture
def record() -> Iterator[Callable[..., harness.Recorder]]:
    """Start Recorders (watches) that end with the test, whatever happens."""
    made: list[harness.Recorder] = []

    def make(lister: Callable[..., Any], *args: Any) -> harness.Recorder:
        made.append(harness.Recorder(lister, *args))
        return made[-1]

    yield make
    for recorder in made:
        recorder.close()


PoolFactory = Callable[..., tuple[str, list[str]]]


@pytest.fixture
def pool(admin: Any, ns: str) -> Iterator[PoolFactory]:
    """Make AddressPools for this test's namespace, each with ranges no other test uses."""
    made: list[str] = []
    custom = harness.custom(admin)

    def make(
        size: int = 16, *, v6: bool = False, name: str | None = None, **spec: Any
    ) -> tuple[str, list[str]]:
        """A pool of ``size`` fresh addresses (``addresses=None``: none, marks only)."""
        n = next(_ranges)
        assert n < 250 and size <= 256
        addresses = [f"10.77.{n}.0-10.77.{n}.{size - 1}"]
        if v6:
            addresses.append(f"fd77:0:{n:x}::-fd77:0:{n:x}::{size - 1:x}")
        pool_name = name or f"{ns}-{len(made)}"
        spec.setdefault("namespaces", [ns])
        body = harness.address_pool(pool_name, spec.pop("addresses", addresses), **spec)
        custom.create_cluster_custom_object(harness.GROUP, harness.VERSION, "addresspools", body)
        made.append(pool_name)
        return pool_name, body["spec"].get("addresses", [])

    yield make
    for name in made:
        try:
            custom.delete_cluster_custom_object(
                harness.GROUP, harness.VERSION, "addresspools", name
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
