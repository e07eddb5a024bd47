"""The image as CI builds it (tests/image/build.sh), unpacked, and run the way a kubelet would.

``build_image()`` runs the cached build and returns what it made: the OCI archive, the SBOM
and the image's id and digest. ``unpack()`` turns the archive into a root filesystem with
umoci (Debian's package), cached by digest under ``$IPVS_TEST_CACHE/image/rootfs``, outside
/tmp so that the IPVS VM sees it through its read-only share of the host's root.

``runtime_spec()`` writes the OCI runtime configuration (runc's ``config.json``) that
containerd's CRI plugin would make for one container of a pod spec rendered from the chart:
command and args, environment (fieldRefs resolved, the ``KUBERNETES_SERVICE_*`` variables the
kubelet adds, ``$(VAR)`` in env values, command and args expanded as the kubelet does), user,
capabilities (every default one dropped, the chart's added), no_new_privs, a read-only root, the
runtime's masked and read-only /proc paths, the host network when the pod asks for it, and the
pod's volumes (hostPath, emptyDir, the ServiceAccount token). Not reproduced: the RuntimeDefault
seccomp profile (containerd's own, built into it) and cgroup limits; the node test (tests/node)
runs the chart's pods under the real containerd and kubelet.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.apiserver.cluster import REPO_ROOT
from tests.image.runner import CREATE_ANNOTATION

BUILD = REPO_ROOT / "tests" / "image" / "build.sh"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
KEEP_ROOTFS = 2
#: Capabilities a container gets from containerd unless the pod drops them (runtime default).
DEFAULT_CAPS = [
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
]  # fmt: skip
#: containerd's masked and read-only paths for an unprivileged container.
MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]  # fmt: skip
READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


class ImageError(AssertionError):
    """The image could not be built or unpacked; the message says why."""


@dataclass(frozen=True)
class Image:
    name: str
    id: str
    digest: str
    archive: Path
    sbom: Path
    seconds: dict[str, int]

    def config(self) -> dict[str, Any]:
        """The image configuration (OCI), read from the archive."""
        layout = read_layout(self.archive)
        return layout["config"]  # type: ignore[no-any-return]

    def manifest(self) -> dict[str, Any]:
        return read_layout(self.archive)["manifest"]  # type: ignore[no-any-return]


def cache_root() -> Path:
    root = os.environ.get("IPVS_TEST_CACHE") or str(Path.home() / ".cache" / "ipvs-operator")
    return Path(root).expanduser().resolve() / "image"


def build_image() -> Image:
    """Run tests/image/build.sh (cached: a warm run checks its inputs only)."""
    proc = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise ImageError(f"tests/image/build.sh exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    info = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    return Image(
        name=info["name"],
        id=info["id"],
        digest=info["digest"],
        archive=Path(info["archive"]),
        sbom=Path(info["sbom"]),
        seconds=info["seconds"],
    )


def read_layout(archive: Path) -> dict[str, Any]:
    """index, manifest and config of the one image in an OCI archive."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> Any:
            member = tar.extractfile(f"blobs/sha256/{digest.split(':', 1)[1]}")
            assert member is not None
            return json.load(member)

        index_file = tar.extractfile("index.json")
        assert index_file is not None
        index = json.load(index_file)
        (entry,) = index["manifests"]
        manifest = blob(entry["digest"])
        config = blob(manifest["config"]["digest"])
    return {"index": index, "manifest": manifest, "config": config}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def unpack(image: Image) -> Path:
    """The image's root filesystem (umoci unpack of the archive), cached by digest."""
    base = cache_root() / "rootfs"
    target = base / image.digest.split(":", 1)[1][:16]
    with _locked(base / "lock"):
        if (target / ".ready").is_file():
            return target / "rootfs"
        if shutil.which("umoci") is None:
            raise ImageError("umoci not found (apt-get install umoci; tests/setup.sh does)")
        shutil.rmtree(target, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            layout = Path(tmp) / "layout"
            layout.mkdir()
            with tarfile.open(image.archive) as tar:
                tar.extractall(layout, filter="tar")
            # umoci names images by tag alone; the archive's ref has a registry and a colon.
            index = json.loads((layout / "index.json").read_text())
            index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] = "image"
            (layout / "index.json").write_text(json.dumps(index))
            proc = subprocess.run(
                ["umoci", "unpack", "--image", f"{layout}:image", str(target)],
                capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                raise ImageError(f"umoci unpack failed:\n{proc.stderr[-3000:]}")
        (target / ".ready").write_text(image.digest + "\n")
        stale = sorted(
            (p for p in base.iterdir() if p.is_dir() and p != target),
            key=lambda p: p.stat().st_mtime,
        )
        for old in stale[: max(0, len(stale) - KEEP_ROOTFS + 1)]:
            shutil.rmtree(old, ignore_errors=True)
    return target / "rootfs"


# -- the runtime configuration a kubelet + containerd would give a container --------------


@dataclass
class PodContext:
    """What the kubelet knows about a pod beyond its spec."""

    name: str
    namespace: str
    node_name: str
    host_ip: str
    pod_ip: str
    #: KUBERNETES_SERVICE_HOST/PORT: how the pod reaches the API server.
    api_host: str
    api_port: int
    #: volume name -> host folder for emptyDir and projected (token) volumes.
    volume_dirs: Mapping[str, Path]


def _field_ref(path: str, pod: PodContext) -> str:
    values = {
        "metadata.name": pod.name,
        "metadata.namespace": pod.namespace,
        "spec.nodeName": pod.node_name,
        "status.hostIP": pod.host_ip,
        "status.podIP": pod.pod_ip,
    }
    if path not in values:
        raise ImageError(f"fieldRef {path} is not supported by this test runtime")
    return values[path]


def kubelet_env(container: Mapping[str, Any], pod: PodContext) -> dict[str, str]:
    """The variables the kubelet sets: its service variables, then the container's own in order,
    each value's ``$(VAR)`` expanded against those before it. Command and args expand against
    these alone; the image's ENV is the runtime's, unknown to the kubelet."""
    env = {
        "KUBERNETES_SERVICE_HOST": pod.api_host,
        "KUBERNETES_SERVICE_PORT": str(pod.api_port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(pod.api_port),
    }
    for item in container.get("env", []):
        if "valueFrom" in item:
            env[item["name"]] = _field_ref(item["valueFrom"]["fieldRef"]["fieldPath"], pod)
        else:
            env[item["name"]] = expand(str(item.get("value", "")), env)
    return env


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion of command and args (``$$`` escapes; unknown stay)."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _REFERENCE.sub(one, text)


def _mounts(
    pod_spec: Mapping[str, Any], container: Mapping[str, Any], pod: PodContext
) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            source = Path(volume["hostPath"]["path"])
        elif "emptyDir" in volume:
            source = pod.volume_dirs[mount["name"]]
        else:
            raise ImageError(f"volume {mount['name']}: only hostPath and emptyDir are supported")
        options = ["rbind", "ro" if mount.get("readOnly") else "rw"]
        if mount.get("mountPropagation") == "HostToContainer":
            options.append("rslave")
        else:
            options.append("rprivate")
        mounts.append({"destination": mount["mountPath"], "type": "bind",
                       "source": str(source), "options": options})  # fmt: skip
    # The kubelet's own: the ServiceAccount token (projected, read-only) and /etc/hosts etc.
    token = pod.volume_dirs.get("kube-api-access")
    if token is not None and pod_spec.get("automountServiceAccountToken", True):
        mounts.append({"destination": SERVICE_ACCOUNT_DIR, "type": "bind",
                       "source": str(token), "options": ["rbind", "ro", "rprivate"]})  # fmt: skip
    return mounts


def runtime_spec(
    *,
    rootfs: Path,
    image_config: Mapping[str, Any],
    pod_spec: Mapping[str, Any],
    container_name: str,
    pod: PodContext,
    init: bool = False,
) -> dict[str, Any]:
    """runc's config.json for one container of ``pod_spec`` (see the module doc)."""
    key = "initContainers" if init else "containers"
    (container,) = [c for c in pod_spec.get(key, []) if c["name"] == container_name]
    config = image_config.get("config", {})
    entrypoint = container.get("command") or config.get("Entrypoint") or []
    args = (
        container.get("args")
        if "args" in container
        else ([] if "command" in container else config.get("Cmd") or [])
    )
    security = {**pod_spec.get("securityContext", {}), **container.get("securityContext", {})}
    if security.get("privileged"):
        raise ImageError("privileged containers are not reproduced here")
    user = config.get("User", "0:0") or "0:0"
    uid, _, gid = user.partition(":")
    uid = str(security.get("runAsUser", uid))
    gid = str(security.get("runAsGroup", gid if "runAsUser" not in security else uid))
    if not uid.isdigit() or not gid.isdigit():
        raise ImageError(f"user {user!r}: numeric uid:gid needed")
    caps = security.get("capabilities", {})
    dropped = set(caps.get("drop", []))
    granted = set() if "ALL" in dropped else set(DEFAULT_CAPS) - dropped
    granted |= set(caps.get("add", []))
    cap_list = sorted(f"CAP_{c}" for c in granted)
    namespaces = [{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}]
    if not pod_spec.get("hostNetwork"):
        namespaces += [{"type": "network"}, {"type": "uts"}]
    if security.get("runAsNonRoot") and uid == "0":
        raise ImageError("runAsNonRoot with uid 0: the kubelet would refuse to start it")
    # The image's ENV, then the kubelet's variables (they win).
    kubelet = kubelet_env(container, pod)
    env = dict(item.split("=", 1) for item in config.get("Env", []))
    env.update(kubelet)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": int(uid), "gid": int(gid)},
            "args": [expand(arg, kubelet) for arg in [*entrypoint, *args]],
            "env": [f"{key}={value}" for key, value in env.items()],
            "cwd": container.get("workingDir") or config.get("WorkingDir") or "/",
            "capabilities": {
                "bounding": cap_list,
                "effective": cap_list,
                "permitted": cap_list,
            },
            "noNewPrivileges": security.get("allowPrivilegeEscalation") is False,
        },
        "root": {"path": str(rootfs), "readonly": bool(security.get("readOnlyRootFilesystem"))},
        "mounts": _mounts(pod_spec, container, pod),
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": MASKED,
            "readonlyPaths": READ_ONLY,
            "cgroupsPath": f"/ipvs-test/{pod.namespace}-{pod.name}-{container_name}",
        },
    }
    if not pod_spec.get("hostNetwork"):
        spec["hostname"] = pod.name
    created = _directories_to_create(pod_spec, container)
    if created:
        spec["annotations"] = {CREATE_ANNOTATION: json.dumps(created)}
    return spec


def _directories_to_create(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    """The hostPath directories of type DirectoryOrCreate the container mounts.

    The kubelet creates them on the node before it starts the container; runc does not, so the
    runner in the guest reads this list (from the spec's annotations) and does the kubelet's part.
    """
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    paths = []
    for mount in container.get("volumeMounts", []):
        host_path = volumes[mount["name"]].get("hostPath", {})
        if host_path.get("type") == "DirectoryOrCreate":
            paths.append(host_path["path"])
    return paths
