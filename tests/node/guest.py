"""The node test bed's node, inside the IPVS VM: containerd and a kubelet, plus the lab network.

Run by tests/node/bed.py as the VM's command (``python -m tests.node.guest``). The host wrote
everything into the VM share's ``node/`` folder: containerd's configuration, the CNI network,
the kubelet's configuration and kubeconfig, and ``images.txt`` (OCI archives on the host,
seen through the VM's read-only share of the host's root). This program

1. mounts what a node has and the VM lacks: cgroup v2, and tmpfs for containerd's and the
   kubelet's state (the overlay snapshotter cannot work on the VM's overlay root);
2. starts containerd (Debian's, with runc and the CNI plugins), imports the images into its
   ``k8s.io`` namespace, and starts the kubelet (built from the Go module proxy) against the
   control plane on the host, through the restricted NIC's forward;
3. builds the lab's network (tests/e2e/guest.py: real servers rs1..rs3, clients c1, c2) and
   answers the host's requests (traffic, commands) like the lab's guest, until ``shutdown``.

The agent is not started here: the chart's DaemonSet runs it, in a pod, through the kubelet.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.guest import Node, _connect_home, serve
from tests.image.runner import ensure_cgroup2

CONNECT_TIMEOUT = 60.0
STATE_DIRS = ("/var/lib/containerd", "/var/lib/kubelet", "/run/containerd")


class KubeletNode(Node):
    def __init__(self, share: Path) -> None:
        super().__init__(share)
        self.config = share / "node"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.share / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def start_node(self) -> dict[str, float]:
        timings: dict[str, float] = {}
        began = time.monotonic()
        ensure_cgroup2()
        for folder in STATE_DIRS:
            Path(folder).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", folder], check=True)
        for name, target in (
            ("containerd.toml", "/etc/containerd/config.toml"),
            ("cni.conflist", "/etc/cni/net.d/10-ipvs-bed.conflist"),
        ):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.config / name, target)
        # The kubelet's cgroups need these controllers delegated from the root.
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
        Path("/sys/fs/cgroup/cgroup.subtree_control").write_text(
            " ".join(f"+{c}" for c in controllers)
        )
        self._spawn("containerd", ["containerd", "--config", "/etc/containerd/config.toml"])
        deadline = time.monotonic() + 180
        while subprocess.run(["ctr", "version"], capture_output=True, check=False).returncode:
            if self.processes["containerd"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("containerd did not come up (see containerd.log)")
            time.sleep(0.5)
        timings["containerd"] = time.monotonic() - began
        for archive in (self.config / "images.txt").read_text().split():
            proc = subprocess.run(
                ["ctr", "-n", "k8s.io", "images", "import", archive],
                capture_output=True, text=True, timeout=900, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"ctr import {archive}: {proc.stderr}")
        timings["images"] = time.monotonic() - began
        kubelet = (self.config / "kubelet-binary").read_text().strip()
        self._spawn(
            "kubelet",
            [
                kubelet,
                f"--config={self.config / 'kubelet.yaml'}",
                f"--kubeconfig={self.config / 'kubelet.kubeconfig'}",
                *(self.config / "kubelet-args").read_text().split(),
            ],
        )
        timings["kubelet"] = time.monotonic() - began
        return timings

    def agent_alive(self) -> bool:
        """Here: the node's own programs (the agent is a pod the host watches)."""
        return all(proc.poll() is None for proc in self.processes.values())

    def close(self) -> None:
        super().close()
        for name in ("kubelet", "containerd"):
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                if proc.poll() is None:
                    proc.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", required=True, help="ADDRESS:PORT of the host controller")
    parser.add_argument("--share", required=True)
    args = parser.parse_args(argv)
    address, port = args.control.rsplit(":", 1)
    node = KubeletNode(Path(args.share))
    os.environ["CONTAINERD_ADDRESS"] = "/run/containerd/containerd.sock"
    try:
        timings = node.start_node()
        started = time.monotonic()
        node.build()
        hello = {
            "kernel": platform.release(),
            "build_seconds": round(time.monotonic() - started, 1),
            "timings": {k: round(v, 1) for k, v in timings.items()},
        }
        with contextlib.closing(_connect_home(address, int(port), CONNECT_TIMEOUT)) as conn:
            conn.settimeout(None)
            serve(node.handlers(), conn, hello)
    finally:
        node.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
