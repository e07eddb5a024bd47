"""Fixtures of the chart tests: helm (built and cached by tests/apiserver/build.sh) and a bed.

The chart tests bring their own kube-apiserver (overriding the shared ``apiserver`` fixture for
this package) with *no* CRDs installed, so that ``helm install`` is what creates them. A
missing helm or API server fails the tests, never skips them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apiserver.cluster import LocalApiServer, TestBedError, build_binaries
from tests.apiserver.fixtures import running_apiserver
from tests.chart.helm import Helm

_HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    failure = ""
    try:
        binary = build_binaries("helm")["helm"]
    except (TestBedError, KeyError) as exc:
        failure = str(exc)
    if failure:
        pytest.fail(f"helm unavailable (tests/apiserver/build.sh helm):\n{failure}", False)
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="package")
def apiserver() -> Iterator[LocalApiServer]:
    """A kube-apiserver of this package's own, without the CRDs (helm installs them).

    Package-scoped: it stops when tests/chart is done, not at the end of the whole session.
    """
    with running_apiserver() as server:
        yield server


@pytest.fixture(scope="package")
def kubeconfig(apiserver: LocalApiServer) -> Path:
    return apiserver.kubeconfig
