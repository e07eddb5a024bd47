"""The lab: a real control plane on the host and a real IPVS node in the VM, driven from here.

One ``LabBed`` is what both the demo (``tests/lab``, tests/e2e/lab.py) and the end-to-end
tests (tests/e2e/test_e2e.py) run:

* host: ``LocalApiServer`` (kube-apiserver + etcd on 127.0.0.1, the CRDs, ``rbac/``, a Node
  object for the VM) and the operator (``ipvs-operator run`` as a subprocess, as its
  ServiceAccount; tests/operator/harness.py);
* VM (tests/vm/qemu.py with a ``UserNetwork``): the node agent in the VM's root netns and
  the demo network around it (tests/e2e/guest.py). The VM reaches the host only through
  two ``guestfwd`` forwards on a NIC with ``restrict=on``: 198.18.0.10:6443 to the API
  server (whose serving certificate names 198.18.0.10) and 198.18.0.10:7000 to this
  module's control listener, over which the guest takes requests (traffic, ipvsadm) as
  JSON lines.

Every wait is a poll with a deadline; a bed that cannot come up raises ``LabError`` with
the reason and the logs' tails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes.client.exceptions import ApiException

from tests.apiserver.cluster import REPO_ROOT, LocalApiServer, TestBedError, build_binaries
from tests.apiserver.fixtures import repo_crd_files
from tests.image.pods import ImageOperator, ImageRun, agent_bundles, pod_specs, write_token
from tests.operator import harness
from tests.operator.harness import wait_for as wait_for  # the one poll loop of the API tests
from tests.vm.image import VMBuildError, ensure_image
from tests.vm.plugin import _precompile
from tests.vm.qemu import CHECKOUT, SHARE_IN_VM, GuestForward, UserNetwork, VMRun, run_in_vm

T = TypeVar("T")

NODE_NAME = "lab-node"
GUEST_API_PORT = 6443
GUEST_CONTROL_PORT = 7000
#: ClusterIPs come from a documentation range too (nothing routes them here).
SERVICE_RANGE = "--service-cluster-ip-range=198.19.0.0/24"
BOOT_TIMEOUT = 240.0
#: The agent's first report: its imports take minutes under TCG, more on a loaded machine.
AGENT_TIMEOUT = 480.0
GUEST_ADDRESS = UserNetwork(forwards=()).guest_address
REQUEST_TIMEOUT = 180.0

Log = Callable[[str], None]


class LabError(RuntimeError):
    """The lab could not be brought up or lost a piece; the message says which and why."""


#: The agent's DaemonSet object (never run here): its deletion tells the agent to clean up.
AGENT_DAEMONSET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "ipvs-agent"},
    "spec": {
        "selector": {"matchLabels": {"app.kubernetes.io/component": "agent"}},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/component": "agent"}},
            "spec": {"containers": [{"name": "agent", "image": "example.invalid/ipvs-operator"}]},
        },
    },
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stderr_progress(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def await_call_home(
    listener: socket.socket,
    vm_thread: threading.Thread,
    qemu: Callable[[], subprocess.Popen[bytes] | None],
    ended: Callable[[], str],
    timeout: float,
) -> socket.socket:
    """The guest's control connection, once the VM calls home.

    A VM that ends first, or is still silent after ``timeout`` (then it is killed), raises
    LabError with how it ended and its console's tail: a guest kernel that panicked (a hung
    task, a soft lockup) says where there, not only in a console log on the CI machine.
    """
    deadline = time.monotonic() + timeout
    listener.settimeout(1.0)
    while True:
        try:
            conn, _ = listener.accept()
            return conn
        except TimeoutError:
            pass
        if not vm_thread.is_alive():
            raise LabError(f"the VM ended before it called home: {ended()}")
        if time.monotonic() > deadline:
            proc = qemu()
            if proc is not None:
                proc.kill()
            vm_thread.join(timeout=30)
            raise LabError(f"the VM did not call home within {timeout:.0f}s: {ended()}")


class Guest:
    """The request channel to tests/e2e/guest.py (one JSON line each way per request)."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.reader = conn.makefile("r", encoding="utf-8")
        self.writer = conn.makefile("w", encoding="utf-8")
        self.lock = threading.Lock()
        line = self._read_line(REQUEST_TIMEOUT)
        self.hello: dict[str, Any] = json.loads(line)["hello"]

    def _read_line(self, timeout: float) -> str:
        self.conn.settimeout(timeout)
        try:
            line = self.reader.readline()
        except TimeoutError as error:
            raise LabError(f"the VM did not answer within {timeout:.0f}s") from error
        if not line:
            raise LabError("the VM closed the control connection")
        return line

    def call(self, op: str, timeout: float = REQUEST_TIMEOUT, **args: Any) -> Any:
        """Run ``op`` in the guest; its result, or LabError with the guest's traceback."""
        with self.lock:
            self.writer.write(json.dumps({"op": op, **args}) + "\n")
            self.writer.flush()
            reply = json.loads(self._read_line(timeout))
        if not reply["ok"]:
            raise LabError(f"{op} failed in the VM: {reply['error']}\n{reply['traceback']}")
        return reply["result"]

    def close(self) -> None:
        with contextlib.suppress(OSError, LabError):
            self.call("shutdown", timeout=60)
        self.conn.close()


class LabBed:
    """API server + operator on the host, agent + demo network in the VM (see module doc)."""

    def __init__(
        self,
        log: Log = stderr_progress,
        *,
        resync_seconds: float = 30.0,
        vm_timeout: float | None = None,
        guest: str = "tests.e2e.guest",
        nodes: tuple[str, ...] = (NODE_NAME,),
        image: ImageRun | None = None,
    ) -> None:
        """``vm_timeout``: the VM's whole life (default IPVS_VM_TIMEOUT, 1800 s); ``guest``: the
        module the VM runs (the one-node lab, or tests.e2e.l2guest's several directors) and
        ``nodes`` the Node objects it needs (one agent each).

        ``image``: run the operator and the agent from the image, as the chart's containers
        (tests/image/pods.py): the operator with runc on the host, the agent's pod (its init
        container, then the agent) with runc in the VM. Otherwise both run from the checkout.
        """
        self.guest_module = guest
        self.nodes = nodes
        self.image = image
        self.log = log
        self.vm_timeout = vm_timeout
        self.resync_seconds = resync_seconds
        self.dir = Path(tempfile.mkdtemp(prefix="ipvs-lab-"))
        self.share = self.dir / "vm"
        self.share.mkdir()
        self.network: UserNetwork | None = None
        self.api: LocalApiServer | None = None
        self.admin: Any = None
        self.operator: harness.Operator | ImageOperator | None = None
        self.guest: Guest | None = None
        self.vm_run: VMRun | None = None
        self.vm_error: BaseException | None = None
        self._qemu: subprocess.Popen[bytes] | None = None
        self._vm_thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self.timings: dict[str, float] = {}
        self.keep = os.environ.get("IPVS_TEST_KEEP") == "1"

    # -- bring-up ---------------------------------------------------------------------

    def _step(self, name: str, began: float) -> None:
        self.timings[name] = time.monotonic() - began
        self.log(f"{name} ({self.timings[name]:.1f}s)")

    def __enter__(self) -> LabBed:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        began = time.monotonic()
        self.log("building or finding kube-apiserver (cached; a cold build takes ~5 min)")
        t = time.monotonic()
        try:
            binaries = build_binaries("apiserver")
        except TestBedError as error:
            raise LabError(str(error)) from error
        self._step("kube-apiserver ready to run", t)
        t = time.monotonic()
        self.log("fetching Debian's kernel and building the VM's initramfs (cached)")
        try:
            ensure_image(self.log)
        except VMBuildError as error:
            raise LabError(f"cannot build the IPVS VM: {error}") from error
        _precompile(self.log)
        self._step("VM image ready", t)
        self._start_control_plane(binaries)
        self._boot_vm()
        t = time.monotonic()
        self.log("waiting for the agents to report their IPVSNodes (they import slowly under TCG)")
        wait_for("the agents' first IPVSNode reports", self._agent_reported, AGENT_TIMEOUT, 1.0)
        self._step("agents running and reporting", t)
        self.timings["total"] = time.monotonic() - began
        self.log(f"lab up in {self.timings['total']:.0f}s")

    def _start_control_plane(self, binaries: dict[str, Path]) -> None:
        t = time.monotonic()
        self.log("starting etcd and kube-apiserver on 127.0.0.1")
        forward = UserNetwork(forwards=())
        try:
            self.api = LocalApiServer(
                apiserver_binary=binaries["kube-apiserver"],
                etcd_binary=binaries["etcd"],
                extra_apiserver_args=[SERVICE_RANGE],
                extra_sans=[forward.forward_address],
                keep_dir=self.keep,
            )
            self.api.start()
            self.api.install_crds(repo_crd_files())
        except (TestBedError, KeyError) as error:
            raise LabError(f"API server: {error}") from error
        self.admin = self.api.api_client()
        harness.core(self.admin).create_namespace(
            {"metadata": {"name": harness.OPERATOR_NAMESPACE}}
        )
        for name in ("operator.yaml", "agent.yaml"):
            harness.apply_manifests(self.admin, REPO_ROOT / "rbac" / name)
        # The agent's DaemonSet, as the chart makes it (nothing runs it: no controllers here).
        # The agent in the VM watches it; deleting it is an uninstall.
        harness.apps(self.admin).create_namespaced_daemon_set(
            harness.OPERATOR_NAMESPACE, AGENT_DAEMONSET
        )
        # No kubelet registers the VM: the lab does, so nodeSelector and IPVSNode owners work.
        for node in self.nodes:
            harness.core(self.admin).create_node(
                {"metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}}
            )
        self._step(f"kube-apiserver up at {self.api.url}", t)
        t = time.monotonic()
        kubeconfig = harness.service_account_kubeconfig(
            self.api,
            harness.OPERATOR_NAMESPACE,
            harness.OPERATOR_SA,
            self.dir / "operator.kubeconfig",
        )
        if self.image is not None:
            folder = self.dir / "operator"
            folder.mkdir()
            self.operator = ImageOperator(self.image, self.api, folder, "lab-operator", free_port())
        else:
            self.operator = harness.Operator(kubeconfig, self.dir / "operator.log", "lab-operator")
        self.operator.start()
        wait_for(
            "the operator to hold its Lease",
            lambda: (
                harness.lease_holder(self.admin) == "lab-operator" or not self._operator_alive()
            ),
            60,
        )
        if not self._operator_alive():
            raise LabError(f"the operator exited:\n{self.operator.tail()}")
        self._step("operator leading", t)

    def _operator_alive(self) -> bool:
        return self.operator is not None and self.operator.alive()

    def _boot_vm(self) -> None:
        t = time.monotonic()
        assert self.api is not None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self._listener = listener
        self.network = UserNetwork(
            forwards=(
                GuestForward(GUEST_API_PORT, self.api.port),
                GuestForward(GUEST_CONTROL_PORT, listener.getsockname()[1]),
            )
        )
        address = self.network.forward_address
        harness.service_account_kubeconfig(
            self.api,
            harness.OPERATOR_NAMESPACE,
            harness.AGENT_SA,
            self.share / "agent.kubeconfig",
            server=f"https://{address}:{GUEST_API_PORT}",
        )
        argv = [
            sys.executable, "-m", self.guest_module,
            "--control", f"{address}:{GUEST_CONTROL_PORT}",
            "--kubeconfig", f"{SHARE_IN_VM}/agent.kubeconfig",
            "--node-name", NODE_NAME,
            "--resync-seconds", str(self.resync_seconds),
            "--daemonset", f"{harness.OPERATOR_NAMESPACE}/ipvs-agent",
        ]  # fmt: skip
        if self.image is not None:
            self._agent_bundles(address)
            argv += ["--agent-bundles", f"{SHARE_IN_VM}/agent"]
        # This checkout's packages first: the venv's editable installs may point at another
        # checkout (a git worktree run with main's venv), and the VM must run this one's agent.
        sources = [CHECKOUT / folder for folder in ("api", "operator", "node-agent")]
        env = {"PYTHONPATH": os.pathsep.join(map(str, [*sources, CHECKOUT]))}

        def boot() -> None:
            try:
                self.vm_run = run_in_vm(
                    argv, self.share, env=env, log=self.log, network=self.network,
                    on_start=self._remember_qemu, timeout=self.vm_timeout,
                )  # fmt: skip
            except BaseException as error:  # reported by _accept
                self.vm_error = error

        self.log(
            "booting the VM (qemu TCG, restricted user network); in it "
            f"{self.guest_module} builds its network and starts the agents"
        )
        self._vm_thread = threading.Thread(target=boot, name="lab-vm", daemon=True)
        self._vm_thread.start()
        conn = await_call_home(
            listener, self._vm_thread, lambda: self._qemu, self._vm_ended, BOOT_TIMEOUT
        )
        conn.settimeout(None)
        self.guest = Guest(conn)
        hello = self.guest.hello
        self._step(
            f"VM up (kernel {hello['kernel']}; network built in {hello['build_seconds']}s)", t
        )

    def _agent_bundles(self, address: str) -> None:
        """The chart's agent pod as runc bundles in the share, its token beside them."""
        assert self.image is not None and self.api is not None
        spec = pod_specs(self.image, f"agent.resyncSeconds={self.resync_seconds:g}")["agent"]
        write_token(self.api, harness.AGENT_SA, self.share / "agent" / "token")
        agent_bundles(
            self.image, spec, host_dir=self.share / "agent", vm_dir=f"{SHARE_IN_VM}/agent",
            node_name=NODE_NAME, host_ip=GUEST_ADDRESS, api_host=address,
            api_port=GUEST_API_PORT,
        )  # fmt: skip

    def _remember_qemu(self, proc: subprocess.Popen[bytes]) -> None:
        self._qemu = proc

    def _vm_ended(self) -> str:
        if self.vm_error is not None:
            return repr(self.vm_error)
        if self.vm_run is not None:
            return f"{self.vm_run.describe()}\n{self.vm_run.console_tail(40)}"
        return "no outcome"

    def _agent_reported(self) -> bool:
        if self.guest is not None:
            alive = (
                self.guest.call("agents_alive")
                if self.guest_module != "tests.e2e.guest"
                else {NODE_NAME: self.guest.call("agent_alive")}
            )
            dead = [node for node, up in alive.items() if not up]
            if dead:
                raise LabError(f"the agent of {dead[0]} exited:\n{self.agent_log_tail(dead[0])}")
        for name in self.nodes:
            try:
                node = harness.custom(self.admin).get_cluster_custom_object(
                    harness.GROUP, harness.VERSION, "ipvsnodes", name
                )
            except ApiException as exc:
                if exc.status == 404:
                    return False
                raise
            if not node.get("status"):
                return False
        return True

    # -- use --------------------------------------------------------------------------

    def call(self, op: str, **args: Any) -> Any:
        if self.guest is None:
            raise LabError("the VM is not connected")
        return self.guest.call(op, **args)

    def ipvsadm(self) -> list[str]:
        """The kernel's table as ``ipvsadm -Sn`` lines (the agent's view is not trusted)."""
        out = self.call("run", argv=["ipvsadm", "-S", "-n"])
        if out["code"] != 0:
            raise LabError(f"ipvsadm failed: {out['stderr']}")
        return [line for line in out["stdout"].splitlines() if line.strip()]

    def agent_log_tail(self, node: str = "", lines: int = 60) -> str:
        path = self.share / (f"agent-{node}.log" if node and len(self.nodes) > 1 else "agent.log")
        if not path.exists():
            return "(no agent log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def diagnostics(self) -> str:
        """Logs' tails for a failure report."""
        parts = [f"--- agent log of {node} ---\n{self.agent_log_tail(node)}" for node in self.nodes]
        if self.operator is not None:
            parts.append(f"--- operator log ({self.operator.log}) ---\n{self.operator.tail()}")
        if self.guest is not None:
            with contextlib.suppress(LabError, OSError):
                parts.append("--- ipvsadm -Sn ---\n" + "\n".join(self.ipvsadm()))
        return "\n".join(parts)

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        if self._vm_thread is not None:
            self._vm_thread.join(timeout=60)
            if self._vm_thread.is_alive() and self._qemu is not None:
                self._qemu.kill()
                self._vm_thread.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
        if self.operator is not None:
            self.operator.stop()
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.keep:
            self.log(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
