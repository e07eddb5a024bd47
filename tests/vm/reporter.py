"""pytest plugin loaded by the inner pytest inside the VM (``-p tests.vm.reporter``).

It appends one JSON line per test phase report to ``$IPVS_VM_REPORT`` (a file on
the writable 9p share) so the host can give each proxy item its inner outcome. A
line is written and flushed as soon as a phase ends, so results of tests that
finished before a crash or timeout still reach the host.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

REPORT_ENV = "IPVS_VM_REPORT"


def _longrepr_text(report: pytest.TestReport) -> str:
    """Readable failure/skip text of a report."""
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def report_record(report: pytest.TestReport) -> dict[str, Any]:
    """The JSON-serialisable subset of a phase report the host needs."""
    return {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": report.duration,
        "longrepr": _longrepr_text(report),
        "wasxfail": getattr(report, "wasxfail", None),
        "sections": [[title, text] for title, text in report.sections],
    }


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Append this phase's record to the results file, if one is configured."""
    path = os.environ.get(REPORT_ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(report_record(report)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
