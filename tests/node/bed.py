"""The node test bed: a real control plane on the host and a real node (kubelet) in the IPVS VM.

* host: etcd + kube-apiserver (``LocalApiServer`` with the Node authorizer and NodeRestriction,
  as a cluster has them), kube-controller-manager and kube-scheduler (built from the Go module
  proxy by tests/apiserver/build.sh node), each with a client certificate of its own;
* VM (tests/node/guest.py): containerd and runc (Debian's) with the bridge CNI plugin, the
  image (tests/image/build.sh) and a pause image imported, and a kubelet joined to the host's
  API server through the restricted NIC's forward (198.18.0.10:6443); the lab's network
  (real servers, clients) around it.

The chart is then installed with helm and kubectl from the host, like on any cluster; its pods
run in the VM. Everything waits by polling with a deadline.

What differs from a cluster: no kube-proxy and no cluster DNS. The chart's pods reach the API
server through ``KUBERNETES_SERVICE_HOST``/``PORT`` set to the forward (``extraEnv``), not
through the ``kubernetes`` Service's ClusterIP.
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
from typing import Any

from tests.apiserver.cluster import LocalApiServer, TestBedError, build_binaries
from tests.e2e.bed import Guest, LabError, await_call_home, free_port, stderr_progress
from tests.image.oci import Image, build_image
from tests.vm.image import VMBuildError, ensure_image
from tests.vm.plugin import _precompile
from tests.vm.qemu import CHECKOUT, SHARE_IN_VM, GuestForward, UserNetwork, VMRun, run_in_vm

NODE_NAME = "ipvs-node"
GUEST_API_PORT = 6443
GUEST_CONTROL_PORT = 7000
NETWORK = UserNetwork(forwards=())
SERVICE_RANGE = "198.19.0.0/24"
POD_SUBNET = "198.18.64.0/24"
BOOT_TIMEOUT = 600.0
NODE_READY_TIMEOUT = 600.0
VM_MEMORY_MB = 3072
IMAGE = "localhost/ipvs-operator"
PAUSE = "localhost/pause:catatonit"

Log = Callable[[str], None]

CONTAINERD_TOML = """\
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"""


def cni_conflist() -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": "ipvs-bed",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(client_ca: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": client_ca},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "failSwapOn": False,
        "resolvConf": "/etc/resolv.conf",
        "clusterDomain": "cluster.local",
        # tmpfs-backed state: disk-pressure eviction would only measure the VM's memory.
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "0%",
            "imagefs.available": "0%",
        },
        "imageGCHighThresholdPercent": 100,
        "serializeImagePulls": False,
        "podPidsLimit": 4096,
        "registerNode": True,
        "fileCheckFrequency": "5s",
        "nodeStatusUpdateFrequency": "10s",
        "syncFrequency": "10s",
    }


class NodeBed:
    """Control plane on the host, kubelet in the VM (see module doc)."""

    def __init__(self, log: Log = stderr_progress, *, vm_timeout: float | None = None) -> None:
        self.log = log
        self.vm_timeout = vm_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="ipvs-node-"))
        self.share = self.dir / "vm"
        (self.share / "node").mkdir(parents=True)
        self.api: LocalApiServer | None = None
        self.image: Image | None = None
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.guest: Guest | None = None
        self.vm_run: VMRun | None = None
        self.vm_error: BaseException | None = None
        self._qemu: subprocess.Popen[bytes] | None = None
        self._vm_thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self.binaries: dict[str, Path] = {}
        self.timings: dict[str, float] = {}
        self.keep = os.environ.get("IPVS_TEST_KEEP") == "1"

    def _step(self, name: str, began: float) -> None:
        self.timings[name] = time.monotonic() - began
        self.log(f"{name} ({self.timings[name]:.1f}s)")

    # -- bring-up ---------------------------------------------------------------------

    def start(self) -> None:
        began = time.monotonic()
        t = time.monotonic()
        self.log("building or finding the control plane, kubelet, kubectl, helm (cached)")
        try:
            for target in ("apiserver", "node", "helm"):
                self.binaries.update(build_binaries(target))
        except TestBedError as error:
            raise LabError(str(error)) from error
        self._step("binaries ready", t)
        t = time.monotonic()
        self.image = build_image()
        pause = subprocess.run(
            [str(CHECKOUT / "tests/image/build.sh"), "pause"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if pause.returncode != 0:
            raise LabError(f"pause image: {pause.stderr[-2000:]}")
        self.pause_archive = pause.stdout.strip().splitlines()[-1]
        try:
            ensure_image(self.log)
        except VMBuildError as error:
            raise LabError(f"cannot build the IPVS VM: {error}") from error
        _precompile(self.log)
        self._step("images ready", t)
        self._start_control_plane()
        self._boot_vm()
        t = time.monotonic()
        self.wait_for("node Ready", self._node_ready, NODE_READY_TIMEOUT)
        self._step("node Ready", t)
        self.timings["total"] = time.monotonic() - began
        self.log(f"node bed up in {self.timings['total']:.0f}s")

    def _start_control_plane(self) -> None:
        t = time.monotonic()
        try:
            self.api = LocalApiServer(
                apiserver_binary=self.binaries["kube-apiserver"],
                etcd_binary=self.binaries["etcd"],
                extra_apiserver_args=[
                    f"--service-cluster-ip-range={SERVICE_RANGE}",
                    "--authorization-mode=Node,RBAC",
                    "--enable-admission-plugins=NodeRestriction",
                ],
                extra_sans=[NETWORK.forward_address],
                keep_dir=self.keep,
            )
            self.api.start()
        except TestBedError as error:
            raise LabError(f"API server: {error}") from error
        assert self.api.dir is not None
        pki = self.api.dir / "pki"
        for name, user in (
            ("kube-controller-manager", "system:kube-controller-manager"),
            ("kube-scheduler", "system:kube-scheduler"),
        ):
            config = self.api.client_kubeconfig(self.dir / f"{name}.kubeconfig", user)
            common = [
                f"--kubeconfig={config}",
                f"--authentication-kubeconfig={config}",
                f"--authorization-kubeconfig={config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ]
            extra = []
            if name == "kube-controller-manager":
                extra = [
                    f"--service-account-private-key-file={pki / 'sa.key'}",
                    f"--root-ca-file={pki / 'ca.crt'}",
                    "--use-service-account-credentials=true",
                    f"--service-cluster-ip-range={SERVICE_RANGE}",
                    "--node-monitor-grace-period=60s",
                ]
            log = (self.dir / f"{name}.log").open("wb")
            self.processes[name] = subprocess.Popen(
                [str(self.binaries[name]), *common, *extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()
        self._step(f"control plane up at {self.api.url}", t)

    def _write_node_config(self) -> None:
        assert self.api is not None and self.api.dir is not None and self.image is not None
        node = self.share / "node"
        (node / "containerd.toml").write_text(CONTAINERD_TOML.format(pause=PAUSE))
        (node / "cni.conflist").write_text(json.dumps(cni_conflist(), indent=1))
        shutil.copyfile(self.api.dir / "pki" / "client-ca.crt", node / "client-ca.crt")
        (node / "kubelet.yaml").write_text(
            json.dumps(kubelet_config(f"{SHARE_IN_VM}/node/client-ca.crt"), indent=1)
        )
        self.api.client_kubeconfig(
            node / "kubelet.kubeconfig",
            f"system:node:{NODE_NAME}",
            ["system:nodes"],
            server=f"https://{NETWORK.forward_address}:{GUEST_API_PORT}",
        )
        (node / "kubelet-binary").write_text(str(self.binaries["kubelet"]))
        (node / "kubelet-args").write_text(
            f"--hostname-override={NODE_NAME} --node-ip={NETWORK.guest_address} --v=1\n"
        )
        (node / "images.txt").write_text(f"{self.image.archive}\n{self.pause_archive}\n")

    def _boot_vm(self) -> None:
        t = time.monotonic()
        assert self.api is not None
        self._write_node_config()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self._listener = listener
        network = UserNetwork(
            forwards=(
                GuestForward(GUEST_API_PORT, self.api.port),
                GuestForward(GUEST_CONTROL_PORT, listener.getsockname()[1]),
            )
        )
        argv = [
            sys.executable, "-m", "tests.node.guest",
            "--control", f"{network.forward_address}:{GUEST_CONTROL_PORT}",
            "--share", SHARE_IN_VM,
        ]  # fmt: skip

        def boot() -> None:
            try:
                self.vm_run = run_in_vm(
                    argv, self.share, env={"PYTHONPATH": str(CHECKOUT)}, log=self.log,
                    network=network, on_start=self._remember_qemu, timeout=self.vm_timeout,
                    memory_mb=VM_MEMORY_MB,
                )  # fmt: skip
            except BaseException as error:
                self.vm_error = error

        self.log("booting the node VM: containerd, image import, kubelet, lab network")
        self._vm_thread = threading.Thread(target=boot, name="node-vm", daemon=True)
        self._vm_thread.start()
        conn = await_call_home(
            listener, self._vm_thread, lambda: self._qemu, self._vm_ended, BOOT_TIMEOUT
        )
        conn.settimeout(None)
        self.guest = Guest(conn)
        self._step(f"VM up, node started {self.guest.hello.get('timings')}", t)

    def _remember_qemu(self, proc: subprocess.Popen[bytes]) -> None:
        self._qemu = proc

    def _vm_ended(self) -> str:
        if self.vm_error is not None:
            return repr(self.vm_error)
        if self.vm_run is not None:
            return f"{self.vm_run.describe()}\n{self.vm_run.console_tail(40)}"
        return "no outcome"

    def _node_ready(self) -> bool:
        if self.guest is not None and not self.guest.call("agent_alive"):
            raise LabError(f"containerd or the kubelet exited:\n{self.log_tail('kubelet')}")
        out = self.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
        if out.returncode != 0:
            return False
        conditions = json.loads(out.stdout)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    # -- use --------------------------------------------------------------------------

    def wait_for(
        self, what: str, probe: Callable[[], Any], timeout: float, every: float = 2.0
    ) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            last = probe()
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(every)

    def _env(self) -> dict[str, str]:
        assert self.api is not None
        home = self.dir / "helm"
        return {
            **os.environ,
            "KUBECONFIG": str(self.api.kubeconfig),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.binaries["kubectl"]), *args], check, timeout, input_text)

    def helm(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.binaries["helm"]), *args], check, timeout)

    def _run(
        self, argv: list[str], check: bool, timeout: float, input_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self._env(), cwd=CHECKOUT,
            timeout=timeout, check=False, input=input_text,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def call(self, op: str, **args: Any) -> Any:
        if self.guest is None:
            raise LabError("the VM is not connected")
        return self.guest.call(op, **args)

    def log_tail(self, name: str, lines: int = 40) -> str:
        for folder in (self.share, self.dir):
            path = folder / f"{name}.log"
            if path.exists():
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return f"(no {name} log)"

    def diagnostics(self) -> str:
        parts = [f"--- {n} ---\n{self.log_tail(n, 25)}" for n in ("kubelet", "containerd")]
        with contextlib.suppress(Exception):
            pods = self.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
            events = self.kubectl("get", "events", "-A", check=False).stdout
            parts += [f"--- pods ---\n{pods}", f"--- events ---\n{events[-4000:]}"]
        with contextlib.suppress(Exception):
            # The apiserver cannot reach the kubelet (no route into the VM): read the files.
            script = "tail -n 30 /var/log/pods/*/*/*.log"
            logs = self.call("run", argv=["sh", "-c", script])
            parts.append(f"--- container logs ---\n{logs['stdout'][-6000:]}")
        return "\n".join(parts)

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        if self._vm_thread is not None:
            self._vm_thread.join(timeout=90)
            if self._vm_thread.is_alive() and self._qemu is not None:
                self._qemu.kill()
                self._vm_thread.join(timeout=10)
        if self._listener is not None:
            self._listener.close()
        for proc in self.processes.values():
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.keep:
            self.log(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
