"""What every lab fixture does: log through pytest's terminal, bring the bed up and prepare it,
fail every test with the reason and the logs' tails if it cannot, and tear it down after."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.e2e.bed import LabBed, LabError


def terminal_log(request: pytest.FixtureRequest, prefix: str) -> Callable[[str], None]:
    """Progress lines shown as they happen, even while pytest captures output."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def log(message: str) -> None:
        if capture is None or reporter is None:
            print(f"{prefix}: {message}", flush=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"{prefix}: {message}")

    return log


def lab_up(bed: LabBed, what: str, prepare: Callable[[], None]) -> Iterator[LabBed]:
    """Fixture body: ``bed`` started and prepared, yielded once, closed after. A bed that cannot
    come up FAILS the tests with the reason (nothing skips)."""
    failure = ""
    try:
        bed.start()
        prepare()
    except (LabError, AssertionError) as error:
        failure = f"{error}\n{bed.diagnostics()}"
    if failure:
        bed.close()
        pytest.fail(f"{what} did not come up (docs/testing.md):\n{failure}", pytrace=False)
    try:
        yield bed
    finally:
        bed.close()
