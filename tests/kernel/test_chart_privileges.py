"""The chart's agent pod gets by with the privileges it is given (charts/ipvs-operator).

Each test recreates, inside the VM, what the container runtime gives that pod: root in the
node's user namespace with every capability but the granted ones dropped from the bounding set
(``setpriv``), no_new_privs (``allowPrivilegeEscalation: false``), ``/proc/sys`` mounted
read-only as runc mounts it for unprivileged containers, and the hostPath of the node's
``/proc/sys/net`` bound read-write at the pod's mount point. Then it runs the container's own
command, read from the chart template, and looks at the network namespace's sysctls and the
loaded modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs_agent.host import sysctl
from ipvs_agent.kernel.ipvs import IPVSKernel
from tests.chart.helm import template_script
from tests.kernel.topology import Lab, Netns

POD_MOUNT = "/host/proc/sys"

# Sets up the pod's mounts in a private mount namespace, then execs the container's command
# ("$@") with only the capabilities the chart grants (CAPS). $1 is the pod's mount point.
CONTAINER = r"""
set -e
root=$1; shift
mount -t tmpfs pod "$root"
mkdir -p "$root/proc/sys/net"
mount --bind /proc/sys/net "$root/proc/sys/net"
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
exec setpriv --no-new-privs --inh-caps=-all --bounding-set="$CAPS" -- "$@"
"""


def run_as_pod(
    ns: Netns, caps: str, mount_point: Path, command: list[str]
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CAPS": caps, "IPVS_SYSCTLS": "true"}
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", CONTAINER]
    with ns.entered():
        return subprocess.run(
            [*argv, "pod", str(mount_point), *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def agent_command(root: str) -> list[str]:
    """The agent container's start-up, with the pod's mount point moved to ``root``."""
    interpreter, flag, script = template_script("agent")
    assert interpreter == "python" and POD_MOUNT in script
    return [sys.executable, flag, script.replace(POD_MOUNT, root), "true"]


@pytest.fixture
def director(lab: Lab) -> Netns:
    """A namespace whose director sysctls are all 0 (none as a director needs them)."""
    (ns,) = lab.netns("director")
    ns.call(lambda: IPVSKernel().close())  # loads ip_vs: the net.ipv4.vs.* entries appear
    for item in sysctl.required(os.uname().release):
        if ns.call(sysctl.read, item) is not None:
            ns.sysctl(item.path, "0")
    return ns


def test_agent_start_sets_director_sysctls_with_net_admin_alone(
    director: Netns, tmp_path: Path
) -> None:
    root = tmp_path / "host"
    root.mkdir()
    proc = run_as_pod(director, "-all,+net_admin", root, agent_command(f"{root}/proc/sys"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wanted = sysctl.required(os.uname().release)
    values = {item.name: director.call(sysctl.read, item) for item in wanted}
    assert values == {item.name: item.value for item in wanted}
    assert "sysctl net.ipv4.ip_forward: 0 -> 1" in proc.stdout


def test_without_the_mount_the_read_only_proc_sys_refuses(director: Netns, tmp_path: Path) -> None:
    root = tmp_path / "host"
    root.mkdir()
    proc = run_as_pod(director, "-all,+net_admin", root, agent_command("/proc/sys"))
    assert proc.returncode != 0
    assert "Read-only file system" in proc.stderr
    assert director.read_sysctl("net.ipv4.ip_forward") == "0"


def test_without_net_admin_the_agent_cannot_open_ipvs(director: Netns, tmp_path: Path) -> None:
    root = tmp_path / "host"
    root.mkdir()
    proc = run_as_pod(director, "-all", root, agent_command(f"{root}/proc/sys"))
    assert proc.returncode != 0
    assert "KernelError" in proc.stderr, proc.stderr
    assert director.read_sysctl("net.ipv4.ip_forward") == "0"


def unloaded_scheduler() -> str:
    modules = Path(f"/lib/modules/{os.uname().release}/kernel/net/netfilter/ipvs")
    for name in ("ovf", "twos", "nq", "sed", "lblcr", "lblc", "dh", "fo"):
        module = f"ip_vs_{name}"
        if any(modules.glob(f"{module}.ko*")) and not Path("/sys/module", module).exists():
            return module
    pytest.fail("every candidate IPVS scheduler module is already loaded in this VM")


def test_load_modules_needs_sys_module_and_nothing_else(lab: Lab, tmp_path: Path) -> None:
    (ns,) = lab.netns("modules")
    module = unloaded_scheduler()
    command = [*template_script("load-modules"), module]
    refused = run_as_pod(ns, "-all", tmp_path, command)
    assert refused.returncode != 0
    assert not Path("/sys/module", module).exists()
    loaded = run_as_pod(ns, "-all,+sys_module", tmp_path, command)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert Path("/sys/module", module).exists()
