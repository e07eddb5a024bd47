"""The lab bed (tests/e2e/bed.py) as a fixture: one VM boot and one control plane per module.

Module scope, not session: the lab's VM must be gone before tests/kernel boots its own (the
machine has two cores).

These tests run on the host: the VM plugin (tests/vm/plugin.py) proxies only tests/kernel/.
They carry the ``e2e`` marker, and ``kernel`` and ``apiserver`` too (they need both beds), so
``-m "not kernel"`` still means "no VM". A lab that cannot come up FAILS every test here with
the reason; nothing skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import scenario
from tests.e2e.bed import LabBed
from tests.e2e.fixtures import lab_up, terminal_log

_HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end to end on the lab (host control plane + agent in the IPVS VM)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.path)).is_relative_to(_HERE):
            for name in ("e2e", "kernel", "apiserver"):
                item.add_marker(name)


@pytest.fixture(autouse=True)
def _apiserver_for_marked_tests() -> None:
    """Overrides the shared plugin's fixture: these tests bring their own bed (``lab``)."""


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabBed]:
    """The lab, up, with the demo namespace and AddressPools; torn down after the module."""
    bed = LabBed(terminal_log(request, "lab"), resync_seconds=10)
    yield from lab_up(bed, "the lab", lambda: scenario.prepare(bed))


@pytest.fixture(scope="module")
def l2lab(request: pytest.FixtureRequest) -> Iterator[tuple[LabBed, str, str, list[str]]]:
    """The layer-2 lab (three directors, tests/e2e/l2guest.py), with a pool announced on layer
    2 and one VirtualServer per family; the VIPs and the order the nodes hold them in."""
    from tests.e2e import l2scenario

    log = terminal_log(request, "l2 lab")
    bed = LabBed(log, resync_seconds=10, guest="tests.e2e.l2guest", nodes=l2scenario.NODES)
    v4, v6, order = l2scenario.pick_addresses()
    for up in lab_up(bed, "the layer-2 lab", lambda: l2scenario.prepare(bed, v4, v6)):
        yield up, v4, v6, order


@pytest.fixture(scope="module")
def bgplab(request: pytest.FixtureRequest) -> Iterator[LabBed]:
    """The lab in BGP mode (two directors and a BIRD router, tests/e2e/bgpguest.py), with the
    router's BGPPeers, a pool announced over BGP and one VirtualServer per family."""
    from tests.e2e import bgpguest, bgpscenario

    log = terminal_log(request, "bgp lab")
    bed = LabBed(log, resync_seconds=10, guest="tests.e2e.bgpguest", nodes=bgpguest.NODES)
    yield from lab_up(bed, "the BGP lab", lambda: bgpscenario.prepare(bed))
