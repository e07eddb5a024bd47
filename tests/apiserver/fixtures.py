"""pytest plugin: the API-server test bed as fixtures.

Register it in tests/conftest.py with ``pytest_plugins = ["tests.apiserver.fixtures"]``.

- ``apiserver`` (session): one LocalApiServer for the whole run, with the repo's CRDs
  installed. Starting it takes seconds, so tests share it and isolate via namespaces.
- ``k8s_namespace`` (function): a fresh namespace name per test.

A missing environment (no etcd, a failed build) makes the tests *fail* with the reason:
a skipped contract test would read as a pass in CI.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apiserver.cluster import REPO_ROOT, LocalApiServer, TestBedError, build_binaries

#: Tests in these folders always get the apiserver marker (and so the server).
_APISERVER_DIRS = (REPO_ROOT / "tests" / "apiserver_tests",)


def repo_crd_files() -> list[Path]:
    """The project's CRD manifests, which every session installs before the first test."""
    return sorted((REPO_ROOT / "crds").glob("*.yaml"))


def _in_dir(path: Path, folders: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(folder) for folder in folders)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that need the server ``apiserver`` so ``-m "not apiserver"`` can drop them.

    A test needs it if it uses the ``apiserver`` fixture (directly or through another
    fixture such as ``k8s_namespace``) or lives under tests/apiserver_tests/.
    """
    for item in items:
        if item.get_closest_marker("apiserver") is not None:
            continue
        uses_fixture = "apiserver" in getattr(item, "fixturenames", ())
        if uses_fixture or _in_dir(Path(str(item.path)), _APISERVER_DIRS):
            item.add_marker(pytest.mark.apiserver)


@contextlib.contextmanager
def running_apiserver(
    prepare: Callable[[LocalApiServer], object] | None = None, **options: Any
) -> Iterator[LocalApiServer]:
    """A started LocalApiServer (``options`` go to its constructor), ``prepare``d, then stopped.

    A bed that cannot be built, started or prepared fails the test with the reason: never a
    skip, since a skipped API test would read as a pass in CI.
    """
    server: LocalApiServer | None = None
    failure = ""
    try:
        binaries = build_binaries("apiserver")
        server = LocalApiServer(
            apiserver_binary=binaries["kube-apiserver"], etcd_binary=binaries["etcd"], **options
        )
        server.start()
        if prepare is not None:
            prepare(server)
    except (TestBedError, KeyError) as e:
        failure = str(e)
    if failure:
        # Outside the except block so the report is this message, not a chained traceback.
        if server is not None:
            server.stop()
        pytest.fail(
            f"API-server test bed unavailable (see docs/testing.md):\n{failure}", pytrace=False
        )
    assert server is not None
    try:
        yield server
    finally:
        server.stop()


def _install_repo_crds(server: LocalApiServer) -> None:
    crds = repo_crd_files()
    if crds:
        server.install_crds(crds)


@pytest.fixture(scope="session")
def apiserver() -> Iterator[LocalApiServer]:
    """A running kube-apiserver + etcd with the repo's CRDs installed, for the session."""
    with running_apiserver(_install_repo_crds) as server:
        yield server


@pytest.fixture(autouse=True)
def _apiserver_for_marked_tests(request: pytest.FixtureRequest) -> None:
    """Start the server for tests marked ``apiserver`` that do not request it themselves."""
    if request.node.get_closest_marker("apiserver") is not None:
        request.getfixturevalue("apiserver")


def _namespace_name(test_name: str) -> str:
    """A DNS-1123 label from the test's name (readable in logs) plus a random suffix."""
    base = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:48].strip("-") or "test"
    return f"{base}-{secrets.token_hex(3)}"


@pytest.fixture
def k8s_namespace(apiserver: LocalApiServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """Create a fresh namespace (with its ``default`` ServiceAccount) and delete it after.

    No kube-controller-manager runs, so this creates the ``default`` ServiceAccount the way
    its serviceaccount controller would (pods are rejected without it), and after deletion
    the namespace stays Terminating with its objects in place: tests must not assume a
    deleted namespace is empty or gone, and should scope cluster-wide lists by namespace.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    name = _namespace_name(request.node.name)
    with apiserver.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
        core.create_namespaced_service_account(
            name, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="default"))
        )
    yield name
    with apiserver.api_client() as api_client:
        try:
            client.CoreV1Api(api_client).delete_namespace(name)
        except ApiException as e:
            if e.status != 404:
                raise
