"""The chart's agent pod gets by with the privileges it is given (charts/ipvs-operator).

Each test recreates, inside the VM, what the container runtime gives that pod: root in the
node's user namespace with every capability but the granted ones dropped from the bounding set
(``setpriv``), no_new_privs (``allowPrivilegeEscalation: false``), ``/proc/sys`` mounted
read-only as runc mounts it for unprivileged containers, and the hostPath of the node's
``/proc/sys/net`` bound read-write at the pod's mount point. Then it runs the container's own
program, read from the chart template (``ipvs-agent``), with ``apply`` instead of ``run`` — the
same pass without the API server — and looks at the network namespace's IPVS table, sysctls
and loaded modules.
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
from tests.kernel.ipvsctl import ipvsadm_list
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
    env = {**os.environ, "CAPS": caps}
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


NAT_SERVICE = """
apiVersion: ipvs.io/v1alpha1
kind: VirtualServer
metadata: {name: web, namespace: lab}
spec:
  address: 203.0.113.10
  ports: [{port: 80}]
  scheduler: {name: rr}
  backends: {static: [{address: 192.0.2.11}]}
"""


def agent_command(sysctl_root: str, tmp_path: Path) -> list[str]:
    """The agent container's program and the pass of ``run``, on a NAT VirtualServer."""
    (program,) = template_script("agent")
    manifest = tmp_path / "web.yaml"
    manifest.write_text(NAT_SERVICE)
    state = tmp_path / "state"
    return [
        str(Path(sys.executable).parent / program),
        "apply",
        "-f",
        str(manifest),
        f"--sysctl-root={sysctl_root}",
        f"--state-dir={state}",
        "--proc=",
    ]


@pytest.fixture
def director(lab: Lab) -> Netns:
    """A namespace whose NAT sysctls are all 0 (none as a NAT director needs them)."""
    (ns,) = lab.netns("director")
    ns.call(lambda: IPVSKernel().close())  # loads ip_vs: the net.ipv4.vs.* entries appear
    for item in sysctl.needed(sysctl.Needs(True, True, False, True), os.uname().release):
        if ns.call(sysctl.read, item) is not None:
            ns.sysctl(item.path, "0")
    return ns


def test_the_agent_sets_what_its_services_need_with_net_admin_alone(
    director: Netns, tmp_path: Path
) -> None:
    root = tmp_path / "host"
    root.mkdir()
    command = agent_command(f"{root}/proc/sys", tmp_path)
    proc = run_as_pod(director, "-all,+net_admin", root, command)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wanted = sysctl.needed(sysctl.Needs(True, True, False, True), os.uname().release)
    values = {item.name: director.call(sysctl.read, item) for item in wanted}
    assert values == {item.name: item.value for item in wanted}
    assert "203.0.113.10:80" in ipvsadm_list(director)
    assert "sysctl net.ipv4.ip_forward: 0 -> 1" in proc.stderr


def test_without_the_mount_the_read_only_proc_sys_refuses(director: Netns, tmp_path: Path) -> None:
    root = tmp_path / "host"
    root.mkdir()
    proc = run_as_pod(director, "-all,+net_admin", root, agent_command("/proc/sys", tmp_path))
    assert "Read-only file system" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert director.read_sysctl("net.ipv4.ip_forward") == "0"


def test_without_net_admin_the_agent_cannot_open_ipvs(director: Netns, tmp_path: Path) -> None:
    root = tmp_path / "host"
    root.mkdir()
    proc = run_as_pod(director, "-all", root, agent_command(f"{root}/proc/sys", tmp_path))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Operation not permitted" in lines[0], proc.stderr
    assert director.read_sysctl("net.ipv4.ip_forward") == "0"


def unloaded_scheduler() -> str:
    """A scheduler module this kernel has and has not loaded: one no earlier test used, else
    one taken out again (no service uses it when no test runs)."""
    modules = Path(f"/lib/modules/{os.uname().release}/kernel/net/netfilter/ipvs")
    names = [f"ip_vs_{name}" for name in ("ovf", "twos", "nq", "sed", "dh", "fo")]
    present = [m for m in names if any(modules.glob(f"{m}.ko*"))]
    for module in present:
        if not Path("/sys/module", module).exists():
            return module
    for module in present:
        if subprocess.run(["rmmod", module], capture_output=True).returncode == 0:
            return module
    pytest.fail(f"every candidate IPVS scheduler module is loaded and in use: {present}")


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
