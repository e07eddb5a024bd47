"""The node test bed (tests/node/bed.py) as a module fixture: one control plane, one VM boot.

These tests run on the host (the VM plugin proxies only tests/kernel/) and are marked
``node``, ``kernel`` and ``apiserver``. A bed that cannot come up FAILS them with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.bed import LabError
from tests.e2e.fixtures import terminal_log
from tests.image.oci import ImageError
from tests.node.bed import NodeBed

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "node: the chart on a real node (kubelet in the IPVS VM), tests/node"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.path)).is_relative_to(_HERE) and item.name != (
            "test_readme_helm_section_is_what_this_test_runs"
        ):
            for name in ("node", "kernel", "apiserver"):
                item.add_marker(name)


@pytest.fixture(autouse=True)
def _apiserver_for_marked_tests() -> None:
    """Overrides the shared plugin's fixture: these tests bring their own bed (``node``)."""


@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest) -> Iterator[NodeBed]:
    log = terminal_log(request, "node")
    bed = NodeBed(log)
    failure = ""
    try:
        bed.start()
    except (LabError, ImageError, AssertionError) as error:
        failure = f"{error}\n{bed.diagnostics()}"
    if failure:
        bed.close()
        pytest.fail(f"the node bed did not come up (docs/testing.md):\n{failure}", pytrace=False)
    try:
        yield bed
    finally:
        log(f"timings: { {k: round(v) for k, v in bed.timings.items()} }")
        bed.close()
