"""pytest plugin: run tests/kernel inside the qemu IPVS VM, transparently.

Register it from the top-level tests/conftest.py::

    pytest_plugins = ["tests.vm.plugin"]

Every test under tests/kernel/ gets the ``kernel`` marker. Inside the VM
(IPVS_IN_VM=1) that is all this plugin does: the tests run normally.

On the host, each *selected* kernel test (after -k/-m/node-id selection) is
replaced by a proxy item with the same node id and no fixtures. The first proxy
that runs boots one VM for the whole session; the VM runs the inner pytest on
exactly those node ids and writes JSON lines (tests/vm/reporter.py) into a
writable share. Each proxy then reports its inner outcome. A proxy whose result
never came back (crash, timeout, collection error), or any proxy when the VM
cannot be built or booted, FAILS with the reason and the console tail: kernel
tests never pass or skip because the environment is missing.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.vm.image import VMBuildError
from tests.vm.qemu import SHARE_IN_VM, VMBootError, VMRun, run_in_vm, vm_timeout
from tests.vm.reporter import REPORT_ENV

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernel"
CHECKOUT = KERNEL_DIR.parent.parent
RESULTS_FILE = "results.jsonl"
# Plugins the inner pytest runs without: importing hypothesis and kmock (aiohttp)
# costs ~30 s of the VM's start-up under TCG, and kernel tests use neither. A
# kernel test that needs one must remove it from here.
INNER_DISABLED_PLUGINS = ("hypothesispytest", "kmock")
CONSOLE_TAIL_LINES = 60
#: The kernel suite's one VM: its whole life (IPVS_VM_TIMEOUT overrides).
SUITE_TIMEOUT = 3600.0
OUTCOME_MARKERS = frozenset({"skip", "skipif", "xfail"})


def in_vm() -> bool:
    """True inside the test VM (set by the VM's run script)."""
    return os.environ.get("IPVS_IN_VM") == "1"


def is_kernel_test(item: pytest.Item) -> bool:
    """Whether an item lives under tests/kernel/."""
    return Path(item.path).resolve().is_relative_to(KERNEL_DIR)


class KernelTestFailure(Exception):
    """Carries the text shown for a failed kernel test (inner failure or VM problem)."""


@dataclass
class _Outcome:
    """Inner outcome of one test, folded from its phase records."""

    status: str  # passed | failed | skipped | xfailed | incomplete
    text: str
    sections: list[tuple[str, str]] = field(default_factory=list)


def fold_records(records: list[dict[str, Any]]) -> _Outcome:
    """Turn the setup/call/teardown records of one test into a single outcome."""
    # Every phase report repeats the sections of the phases before it.
    sections = list(dict.fromkeys((t, x) for r in records for t, x in r["sections"]))
    failed = [r for r in records if r["outcome"] == "failed"]
    if failed:
        parts = []
        for record in failed:
            kind = "failure" if record["when"] == "call" else f"error in {record['when']}"
            parts.append(f"---- {kind} inside the VM ----\n{record['longrepr']}")
        return _Outcome("failed", "\n".join(parts), sections)
    by_phase = {r["when"]: r for r in records}
    for phase in ("setup", "call"):
        skipped = by_phase.get(phase)
        if skipped and skipped["outcome"] == "skipped":
            if skipped.get("wasxfail") is not None:
                return _Outcome("xfailed", skipped["wasxfail"] or "xfail", sections)
            reason = skipped["longrepr"].removeprefix("Skipped: ")
            return _Outcome("skipped", reason, sections)
    if "call" in by_phase and "teardown" in by_phase:
        return _Outcome("passed", "", sections)
    seen = ", ".join(r["when"] for r in records) or "none"
    return _Outcome("incomplete", f"phases reported: {seen}", sections)


@dataclass
class _VMSession:
    """One VM run for all selected kernel tests, started by the first proxy."""

    started: bool = False
    error: str | None = None
    run: VMRun | None = None
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    console_tail: str = ""

    def ensure(self, session: pytest.Session) -> None:
        """Boot the VM once and collect the results of every proxy item."""
        if self.started:
            return
        self.started = True
        nodeids = [i.nodeid for i in session.items if isinstance(i, KernelProxyItem)]
        config = session.config
        argv = [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests.vm.reporter",
            "-v", "--color=no", "--durations=30", "--rootdir", str(config.rootpath),
        ]  # fmt: skip
        for name in INNER_DISABLED_PLUGINS:
            argv += ["-p", f"no:{name}"]
        if config.inipath is not None:
            argv += ["-c", str(config.inipath)]
        argv += nodeids
        env = {
            REPORT_ENV: f"{SHARE_IN_VM}/{RESULTS_FILE}",
            "PYTHONPATH": str(CHECKOUT),
        }
        log = _terminal_log(config)
        _precompile(log)
        log(f"running {len(nodeids)} kernel test(s) in the IPVS VM")
        with tempfile.TemporaryDirectory(prefix="ipvs-vm-") as tmp:
            share = Path(tmp)
            try:
                # Every kernel test in one boot: ~100 tests take 10-27 min under TCG (quiet to
                # loaded host); IPVS_VM_TIMEOUT still wins when set.
                limit = vm_timeout() if os.environ.get("IPVS_VM_TIMEOUT") else SUITE_TIMEOUT
                self.run = run_in_vm(
                    argv, share, cwd=config.rootpath, env=env, log=log, timeout=limit
                )
            except (VMBuildError, VMBootError) as error:
                self.error = f"cannot build or boot the IPVS test VM: {error}"
                return
            except Exception as error:  # any other harness bug must still fail every test
                self.error = f"the IPVS test VM harness failed: {error!r}"
                raise
            results = share / RESULTS_FILE
            if results.exists():
                for line in results.read_text(encoding="utf-8").splitlines():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
                    self.records.setdefault(record["nodeid"], []).append(record)
        self.console_tail = self.run.console_tail(CONSOLE_TAIL_LINES)

    def outcome(self, nodeid: str) -> _Outcome:
        """This test's outcome, or an incomplete one explaining why none came back."""
        if self.error is not None:
            return _Outcome("incomplete", self.error)
        assert self.run is not None
        records = self.records.get(nodeid)
        if records:
            folded = fold_records(records)
            if folded.status != "incomplete":
                return folded
            detail = folded.text
        else:
            detail = "no result came back from the VM"
        return _Outcome(
            "incomplete",
            f"{detail}; {self.run.describe()}\n"
            f"---- last {CONSOLE_TAIL_LINES} console lines ----\n{self.console_tail}",
        )


_VM_SESSION = pytest.StashKey[_VMSession]()

# Folders never worth byte-compiling for the VM.
_NO_COMPILE = re.compile(r"/(\.[^/]*|node_modules|__pycache__)(/|$)")


def _precompile(log: Callable[[str], None]) -> None:
    """Byte-compile the checkout on the host first: the VM's writes vanish with its
    tmpfs overlay, so it would otherwise recompile every module on every run, ~50x
    slower under TCG (a fresh CI clone has no __pycache__ at all)."""
    started = time.monotonic()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        try:
            compileall.compile_dir(str(CHECKOUT), rx=_NO_COMPILE, quiet=2, workers=1)
        except OSError as error:  # only an optimisation: a read-only checkout still works
            log(f"byte-compiling the checkout failed ({error}); the VM will compile")
    elapsed = time.monotonic() - started
    if elapsed > 1:
        log(f"byte-compiled the checkout in {elapsed:.1f}s")


def _terminal_log(config: pytest.Config) -> Callable[[str], None]:
    """Progress lines straight to the terminal, past pytest's output capture."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def log(message: str) -> None:
        line = f"ipvs-vm: {message}"
        suspended = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with suspended:
            if reporter is not None:
                reporter.write_line(line)
            else:
                print(line, file=sys.stderr, flush=True)

    return log


class KernelProxyItem(pytest.Item):
    """Stands in on the host for a kernel test that really runs inside the VM."""

    original_location: tuple[Any, int | None, str] = ("", None, "")

    def runtest(self) -> None:
        vm = self.config.stash[_VM_SESSION]
        vm.ensure(self.session)
        result = vm.outcome(self.nodeid)
        for title, text in result.sections:
            words = title.split()  # e.g. "Captured stdout call"
            if len(words) == 3 and words[0] == "Captured":
                self.add_report_section(words[2], f"{words[1]} (in VM)", text)
            else:
                self.add_report_section("call", f"{title} (in VM)", text)
        if result.status == "passed":
            return
        if result.status == "skipped":
            raise pytest.skip.Exception(result.text, _use_item_location=True)
        if result.status == "xfailed":
            pytest.xfail(result.text)
        raise KernelTestFailure(result.text)

    def repr_failure(
        self,
        excinfo: pytest.ExceptionInfo[BaseException],
        style: Any = None,
    ) -> Any:
        if isinstance(excinfo.value, KernelTestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.original_location


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: runs inside the qemu VM with a real IPVS kernel (tests/kernel)"
    )
    config.stash[_VM_SESSION] = _VMSession()


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark kernel tests early, so -m kernel / -m 'not kernel' select on it."""
    if is_kernel_test(item):
        item.add_marker(pytest.mark.kernel)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """On the host, swap each selected kernel test for a proxy (after deselection)."""
    if in_vm():
        return
    for index, item in enumerate(items):
        if not is_kernel_test(item) or isinstance(item, KernelProxyItem):
            continue
        # Parented to the session, not the module: the host must not evaluate
        # skip/skipif/xfail (module-level ones included) — the VM does, and a
        # proxy that fails because the VM broke must never turn into an XFAIL.
        proxy = KernelProxyItem.from_parent(
            session, name=item.name, nodeid=item.nodeid, path=item.path
        )
        proxy.original_location = item.reportinfo()
        proxy.own_markers = [m for m in item.iter_markers() if m.name not in OUTCOME_MARKERS]
        proxy.keywords.update({k: v for k, v in item.keywords.items() if k not in OUTCOME_MARKERS})
        items[index] = proxy


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Say how long the VM ran and where its console log is."""
    vm = config.stash.get(_VM_SESSION, None)
    if vm is None or not vm.started:
        return
    if vm.error is not None:
        terminalreporter.write_line(f"ipvs-vm: {vm.error}")
    elif vm.run is not None:
        terminalreporter.write_line(f"ipvs-vm: {vm.run.describe()}")
