"""One container run with runc from a bundle (config.json from tests/image/oci.py).

Used on the host (the operator from the image) and inside the IPVS VM (the agent from the
image, by tests/e2e/guest.py). runc keeps its state under a folder of the caller's, so
concurrent test runs never see each other's containers. Everything waits with a deadline.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

# Spec annotation: hostPath directories (type DirectoryOrCreate) to create before the run.
CREATE_ANNOTATION = "ipvs-lab.test/create-directories"


class ContainerError(AssertionError):
    """runc failed; the message has its output and the container's log tail."""


def ensure_cgroup2() -> None:
    """Mount the unified cgroup hierarchy if nothing is mounted there (the IPVS VM)."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists() or Path("/sys/fs/cgroup/memory").exists():
        return
    subprocess.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=True)


def create_host_directories(bundle: Path) -> None:
    """Create the bundle's DirectoryOrCreate hostPaths, as the kubelet does before a start."""
    spec = json.loads((bundle / "config.json").read_text())
    for path in json.loads(spec.get("annotations", {}).get(CREATE_ANNOTATION, "[]")):
        Path(path).mkdir(mode=0o755, parents=True, exist_ok=True)


class Container:
    def __init__(self, name: str, bundle: Path, state_root: Path, log: Path) -> None:
        self.name = name
        self.bundle = bundle
        self.state_root = state_root
        self.log = log

    def _runc(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runc", "--root", str(self.state_root), *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def write_spec(self, spec: dict[str, Any]) -> None:
        self.bundle.mkdir(parents=True, exist_ok=True)
        (self.bundle / "config.json").write_text(json.dumps(spec, indent=1))

    def start(self) -> None:
        """``runc run --detach``: the container's stdout and stderr go to the log file."""
        self.state_root.mkdir(parents=True, exist_ok=True)
        create_host_directories(self.bundle)
        with self.log.open("ab") as out:
            proc = subprocess.run(
                ["runc", "--root", str(self.state_root), "run", "--detach",
                 "--bundle", str(self.bundle), self.name],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=120, check=False,
            )  # fmt: skip
        if proc.returncode != 0:
            raise ContainerError(f"runc run {self.name} exited {proc.returncode}:\n{self.tail()}")

    def state(self) -> dict[str, Any]:
        """runc's state (``status``: running, stopped...), or {} once deleted."""
        proc = self._runc("state", self.name)
        if proc.returncode != 0:
            return {}
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def running(self) -> bool:
        return self.state().get("status") == "running"

    @property
    def pid(self) -> int:
        return int(self.state()["pid"])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; then delete."""
        if not self.state():
            return
        self._runc("kill", self.name, "TERM")
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.running():
            self._runc("kill", self.name, "KILL")
            deadline = time.monotonic() + 10
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.2)
        self._runc("delete", "--force", self.name)

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def process_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (Uid, Gid, CapEff, CapBnd, NoNewPrivs, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def root_mount_options(pid: int) -> list[str]:
    """Mount options of the process's root filesystem (from its mountinfo)."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        parts = line.split()
        if parts[4] == "/":
            return parts[5].split(",")
    raise AssertionError(f"no root mount in /proc/{pid}/mountinfo")


def capability_names(mask: str) -> set[str]:
    """Names of the capabilities set in a /proc status mask (only the ones that matter here)."""
    numbers = {0: "CHOWN", 1: "DAC_OVERRIDE", 2: "DAC_READ_SEARCH", 3: "FOWNER", 4: "FSETID",
               5: "KILL", 6: "SETGID", 7: "SETUID", 8: "SETPCAP", 10: "NET_BIND_SERVICE",
               12: "NET_ADMIN", 13: "NET_RAW", 16: "SYS_MODULE", 18: "SYS_CHROOT",
               21: "SYS_ADMIN", 27: "MKNOD", 29: "AUDIT_WRITE", 31: "SETFCAP"}  # fmt: skip
    value = int(mask, 16)
    names = {name for bit, name in numbers.items() if value >> bit & 1}
    other = value & ~sum(1 << bit for bit in numbers)
    if other:
        names.add(f"other:{other:#x}")
    return names
