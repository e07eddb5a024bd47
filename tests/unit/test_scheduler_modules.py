"""Schedulers whose module must be loaded before first use (``kernel.PRELOAD_SCHEDULERS``).

The kernel loads a scheduler's module from inside the IPVS command, holding the IPVS lock;
lblc and lblcr register per-namespace state as they load, which waits for any network
namespace being torn down, which waits for the IPVS lock: the node's namespaces hang for good
(reproduced in the test VM, docs/agent.md). So the agent never sends such a scheduler before
its module is loaded: the virtual service is reported, and programmed once the module is in.
"""

from __future__ import annotations

from pathlib import Path

from ipvs_agent.audit import Auditor
from ipvs_agent.desired import Node, State, plan
from ipvs_agent.kernel.ipvs import loaded_modules, probe_modules, unloaded_schedulers
from ipvs_agent.model import KernelInfo
from ipvs_agent.ops import OpKind
from tests.unit.agent_helpers import vs
from tests.unit.test_audit import Second, looping, until
from tests.unit.test_change_pass import Bed, virtual_server

RELEASE = "6.1.0-test"
STATIC = {"static": [{"address": "198.51.100.1"}]}


def module_tree(root: Path, loaded: str, sysfs: list[str], builtin: str, installed: str) -> None:
    (root / "proc").mkdir(parents=True)
    (root / "proc/modules").write_text(loaded)
    for name in sysfs:
        (root / "sys/module" / name).mkdir(parents=True)
    tree = root / "lib/modules" / RELEASE
    tree.mkdir(parents=True)
    (tree / "modules.builtin").write_text(builtin)
    (tree / "modules.dep").write_text(installed)


def test_a_module_counts_as_in_the_kernel_when_loaded_or_built_in(tmp_path: Path) -> None:
    ipvs = "kernel/net/netfilter/ipvs"
    module_tree(
        tmp_path,
        loaded="ip_vs_lblc 16384 0 - Live 0x0\nip_vs 184320 1 ip_vs_lblc\n",
        sysfs=["ip_vs", "ip_vs_lblc"],
        builtin=f"{ipvs}/ip_vs_sh.ko\n",
        installed="".join(f"{ipvs}/ip_vs_{s}.ko.xz:\n" for s in ("lblc", "lblcr", "sh", "wrr")),
    )
    assert loaded_modules(RELEASE, tmp_path) == {"ip_vs", "ip_vs_lblc", "ip_vs_sh"}
    schedulers, _ = probe_modules(RELEASE, tmp_path)
    assert unloaded_schedulers(schedulers, RELEASE, tmp_path) == ("lblcr",)
    # Known from /proc/modules alone (a container without /sys), and none to ask about.
    (tmp_path / "sys/module/ip_vs_lblc").rmdir()
    assert unloaded_schedulers(("lblc", "rr"), RELEASE, tmp_path) == ()
    assert unloaded_schedulers(("rr", "wrr"), RELEASE, tmp_path) == ()


def test_the_planner_holds_back_an_unloaded_scheduler_and_says_what_to_do() -> None:
    kernel = KernelInfo("1.2.1", 4096, "6.1.0", ("rr", "lblc", "lblcr"), (), unloaded=("lblc",))
    node = Node("node-a", {}, kernel)
    lblc = vs("lblc", address="192.0.2.1", ports=[{"port": 80}], scheduler={"name": "lblc"},
              backends=STATIC)  # fmt: skip
    lblcr = vs("lblcr", address="192.0.2.2", ports=[{"port": 80}], scheduler={"name": "lblcr"},
               backends=STATIC)  # fmt: skip
    p = plan([lblc, lblcr], {}, node)
    held = p.outcomes["ns/lblc"]
    assert (held.state, held.reason) == (State.UNSUPPORTED, "SchedulerNotLoaded")
    assert "ip_vs_lblc" in held.message and "agent.modules" in held.message
    assert {k.address for k in p.table} == {"192.0.2.2"}, "a loaded one programs"


def test_the_agent_programs_the_service_once_the_module_is_loaded() -> None:
    """No service with the scheduler reaches the kernel (the fake kernel fails the test if one
    does) until the module is in; the next resync, taken by the auditor otherwise, is then a
    full pass that programs it."""
    bed = Bed(services=1)
    bed.kernel.unloaded_schedulers = {"lblc"}
    bed.virtual_servers.put(virtual_server("v0", "s0", "192.0.2.1", scheduler={"name": "lblc"}))
    result = bed.agent.run_once("change")
    assert result.outcomes["ns/v0"].reason == "SchedulerNotLoaded"
    assert bed.kernel.dump() == {}
    second = Second(bed.kernel)
    stop, thread = looping(bed, Auditor(second, None))  # type: ignore[arg-type]
    try:
        until(lambda: second.dumps >= 2, "audits take the resyncs")
        full = bed.passes("full")
        bed.kernel.unloaded_schedulers = set()  # modprobe ip_vs_lblc
        until(lambda: bed.real_servers("192.0.2.1") == {"198.51.100.1"}, "the service")
        assert bed.passes("full") == full + 1
        assert bed.agent.kernel_info is not None and bed.agent.kernel_info.unloaded == ()
    finally:
        stop.set()
        thread.join(10)


def test_a_service_changed_to_an_unloaded_scheduler_keeps_its_old_one_meanwhile() -> None:
    bed = Bed(services=1)
    bed.agent.run_once("change")
    (key,) = bed.kernel.dump()
    bed.kernel.unloaded_schedulers = {"lblc"}
    bed.virtual_servers.put(virtual_server("v0", "s0", "192.0.2.1", scheduler={"name": "lblc"}))
    held = bed.agent.run_once("change")
    assert held.outcomes["ns/v0"].reason == "SchedulerNotLoaded"
    assert held.ops == [], "not taken down: it keeps serving with its old scheduler"
    assert bed.kernel.dump()[key].service.scheduler == "wlc"
    bed.kernel.unloaded_schedulers = set()
    loaded = bed.agent.run_once("resync")
    assert [op.kind for op in loaded.ops] == [OpKind.EDIT_SERVICE]
    assert bed.kernel.dump()[key].service.scheduler == "lblc"
