"""Fixtures for kernel tests; these run only inside the IPVS VM (tests/vm/plugin.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.kernel.topology import Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh set of namespaces and servers, all removed after the test."""
    if os.environ.get("IPVS_IN_VM") != "1":
        pytest.fail(
            "kernel tests must run inside the IPVS VM: load the tests.vm.plugin pytest plugin "
            "(tests/conftest.py) so the host runs them there"
        )
    created = Lab()
    try:
        yield created
    finally:
        created.close()
