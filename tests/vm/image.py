"""Build (once) and cache the kernel and initramfs that the IPVS test VM boots.

The host kernel has no IPVS, so kernel tests boot Debian's stock kernel under qemu.
Everything here is cached under ``${IPVS_TEST_CACHE:-~/.cache/ipvs-operator}/vm``:

    vm/
      lock                              flock(2) held while building
      kernels/<kver>/                   ``dpkg -x`` of linux-image-<kver>, depmod'ed
      kernels/<kver>/.ready             written last: the tree is complete
      initramfs/<kver>-<key>.cpio       busybox + early modules + init; key = content hash
      logs/console-*.log                console logs of recent VM runs (see qemu.py)

A second run finds both files and downloads or rebuilds nothing. Run
``python -m tests.vm.image`` to prefetch (e.g. in CI before the tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

Log = Callable[[str], None]

# Modules the initramfs loads before it can reach the host root over 9p. Their
# dependency closure, in load order, comes from modprobe --show-depends.
EARLY_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

# Debian packages the test bed needs on the host (reported in error messages).
HOST_PACKAGES = "qemu-system-x86 busybox-static kmod"

BUSYBOX = Path("/bin/busybox")
KEEP_INITRAMFS = 4

# The kernel's module autoloader (/proc/sys/kernel/modprobe) runs in the
# initramfs root, not in the test chroot: this helper hops into the chroot and
# runs the host's kmod there, which sees the module tree bound at /lib/modules.
MODPROBE_HELPER = """#!/bin/busybox sh
exec /bin/busybox chroot /newroot /sbin/modprobe "$@"
"""

# PID 1 of the VM. Parameters come from the kernel command line (ipvsvm_*).
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "ipvs-vm: $*"; }
die() {
    echo "IPVS-VM-ERROR: $*"
    echo "IPVS-VM-EXIT=255"
    sync
    poweroff -f
    sleep 5
}
param() {
    for word in $(cat /proc/cmdline); do
        case "$word" in "$1="*) echo "${word#*=}" ;; esac
    done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

KVER=$(param ipvsvm_kver)
MODTREE=$(param ipvsvm_modtree)
RUN=$(param ipvsvm_run)
[ -n "$KVER" ] && [ -n "$MODTREE" ] && [ -n "$RUN" ] || die "missing ipvsvm_* parameters"

for mod in $(cat /early-modules); do
    insmod "/$mod" || die "insmod $mod failed"
done

OPTS=trans=virtio,version=9p2000.L,msize=262144
mkdir -p /ro /rw /newroot
mount -t 9p -o "$OPTS,ro,cache=loose" hostroot /ro || die "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || die "cannot mount the overlay"

# Host paths the run needs (checkout, venv) that sit under /tmp, /run or /dev
# would vanish under the fresh mounts below: pin them first, restore them after.
KEEP=$(param ipvsvm_keep | tr ',' ' ')
n=0
for path in $KEEP; do
    mkdir -p "/keep/$n" && mount --bind "/newroot$path" "/keep/$n" || die "cannot pin $path"
    n=$((n + 1))
done

mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
n=0
for path in $KEEP; do
    mkdir -p "/newroot$path" && mount --bind "/keep/$n" "/newroot$path" \
        || die "cannot restore $path"
    n=$((n + 1))
done
mkdir -p "/newroot/lib/modules/$KVER" /newroot/run/ipvs-vm
mount --bind "/ro$MODTREE" "/newroot/lib/modules/$KVER" || die "cannot bind $MODTREE"
mount -t 9p -o "$OPTS,cache=none" ipvsout /newroot/run/ipvs-vm \
    || die "cannot mount the results share"

echo /modprobe-chroot > /proc/sys/kernel/modprobe
# As the chart's init container does on a node (agent.modules): these schedulers' modules
# must be in before first use, which can deadlock the kernel (PRELOAD_SCHEDULERS in
# node-agent/ipvs_agent/kernel/__init__.py). ip_vs comes with them; other schedulers,
# tunnels and nftables still load on first use.
/modprobe-chroot -a ip_vs_lblc ip_vs_lblcr || die "cannot load ip_vs_lblc and ip_vs_lblcr"
ip link set lo up

say "running /run/ipvs-vm/$RUN"
chroot /newroot /bin/sh "/run/ipvs-vm/$RUN" < /dev/null
rc=$?
echo "$rc" > /newroot/run/ipvs-vm/exit-status
sync
echo "IPVS-VM-EXIT=$rc"
poweroff -f
sleep 5
"""


class VMBuildError(RuntimeError):
    """The VM image cannot be prepared; the message says what is missing."""


@dataclass(frozen=True)
class VMImage:
    """Everything qemu needs to boot the test VM."""

    kernel_version: str
    kernel: Path  # bzImage
    initramfs: Path  # uncompressed newc cpio
    modules: Path  # host path of lib/modules/<kver>, bound into the VM


def stderr_log(message: str) -> None:
    """Default progress sink: a prefixed line on stderr."""
    print(f"ipvs-vm: {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The VM cache folder (created); honours IPVS_TEST_CACHE."""
    root = os.environ.get("IPVS_TEST_CACHE") or str(Path.home() / ".cache" / "ipvs-operator")
    path = Path(root).expanduser().resolve() / "vm"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """Serialise builds between concurrent test runs sharing one cache."""
    with open(cache / "lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: list[str], cwd: Path | None = None) -> str:
    """Run a host tool; turn failures into VMBuildError with its output."""
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        raise VMBuildError(f"{argv[0]} not found on the host (apt-get install {HOST_PACKAGES})")
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VMBuildError(
            f"{' '.join(argv)} failed with exit code {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc.stdout


def _image_package_from_apt() -> str | None:
    """Name of the package linux-image-amd64 depends on, from the local apt lists."""
    if shutil.which("apt-cache") is None:
        return None
    proc = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Depends:\s*(linux-image-\S+-amd64)\b", proc.stdout)
    return match.group(1) if match else None


def _ready_kernels(cache: Path) -> list[str]:
    """Kernel versions whose extracted tree is complete, newest first."""
    root = cache / "kernels"
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if (p / ".ready").is_file()]
    return sorted(found, reverse=True)


def _resolve_kernel_version(cache: Path, log: Log) -> str:
    """Pick the kernel: IPVS_VM_KERNEL, else Debian's current linux-image-amd64.

    Falls back to a cached kernel when apt cannot name one (offline, no lists).
    """
    pinned = os.environ.get("IPVS_VM_KERNEL")
    if pinned:
        return pinned.removeprefix("linux-image-")
    package = _image_package_from_apt()
    if package is None:
        cached = _ready_kernels(cache)
        if cached:
            log(f"apt names no linux-image-amd64 dependency; using cached kernel {cached[0]}")
            return cached[0]
        if shutil.which("apt-get") is not None and os.geteuid() == 0:
            log("apt knows no linux-image-amd64: running apt-get update")
            _run(["apt-get", "update", "-qq"])
            package = _image_package_from_apt()
    if package is None:
        raise VMBuildError(
            "cannot determine the Debian kernel package: `apt-cache depends linux-image-amd64` "
            "names none (run apt-get update, or set IPVS_VM_KERNEL=<kernel version>)"
        )
    return package.removeprefix("linux-image-")


def _fetch_kernel(cache: Path, kver: str, log: Log) -> Path:
    """Download, extract and depmod linux-image-<kver> unless already cached."""
    tree = cache / "kernels" / kver
    if (tree / ".ready").is_file():
        return tree
    package = f"linux-image-{kver}"
    (cache / "kernels").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=cache) as tmp:
        work = Path(tmp)
        log(f"downloading {package} with apt-get download")
        started = time.monotonic()
        _run(["apt-get", "download", "-q", package], cwd=work)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            raise VMBuildError(f"apt-get download {package} produced no .deb in {work}")
        log(f"downloaded {debs[0].name} in {time.monotonic() - started:.1f}s; extracting")
        staging = work / "tree"
        _run(["dpkg", "-x", str(debs[0]), str(staging)])
        depmod = shutil.which("depmod") or "/usr/sbin/depmod"
        log(f"running depmod for {kver}")
        _run([depmod, "-b", str(staging), kver])
        if not (staging / "boot" / f"vmlinuz-{kver}").is_file():
            raise VMBuildError(f"{debs[0].name} has no boot/vmlinuz-{kver}")
        (staging / ".ready").write_text(debs[0].name + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        staging.rename(tree)
    log(f"kernel {kver} cached in {tree}")
    return tree


def _early_module_paths(tree: Path, kver: str) -> list[Path]:
    """Dependency closure of EARLY_MODULES in load order, without repeats."""
    modprobe = shutil.which("modprobe") or "/usr/sbin/modprobe"
    out = _run([modprobe, "-d", str(tree), "-S", kver, "-a", "--show-depends", *EARLY_MODULES])
    paths: list[Path] = []
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "insmod":
            path = Path(words[1])
            if path not in paths:
                paths.append(path)
    if not paths:
        raise VMBuildError(f"modprobe --show-depends listed no modules:\n{out}")
    return paths


class _Cpio:
    """Minimal writer for the newc cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._chunks.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._chunks.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, 0o100755 if executable else 0o100644, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._chunks)


def _build_initramfs(cache: Path, tree: Path, kver: str, log: Log) -> Path:
    """Write the initramfs, named by a hash of everything that goes into it."""
    if not BUSYBOX.is_file():
        raise VMBuildError(f"{BUSYBOX} not found (apt-get install busybox-static)")
    modules = _early_module_paths(tree, kver)
    names = [f"early/{index:02d}-{path.name}" for index, path in enumerate(modules)]
    listing = "".join(name + "\n" for name in names)
    key = hashlib.sha256()
    for part in (INIT_SCRIPT, MODPROBE_HELPER, kver, listing):
        key.update(part.encode() + b"\0")
    busybox = BUSYBOX.read_bytes()
    key.update(hashlib.sha256(busybox).digest())
    contents = [path.read_bytes() for path in modules]
    for content in contents:
        key.update(hashlib.sha256(content).digest())
    target = cache / "initramfs" / f"{kver}-{key.hexdigest()[:16]}.cpio"
    if target.is_file():
        return target
    log(f"building initramfs {target.name} ({len(modules)} early modules)")
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "early", "newroot", "ro", "rw", "keep"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3)
    archive.file("bin/busybox", busybox, executable=True)
    archive.file("init", INIT_SCRIPT.encode(), executable=True)
    archive.file("modprobe-chroot", MODPROBE_HELPER.encode(), executable=True)
    archive.file("early-modules", listing.encode())
    for name, content in zip(names, contents, strict=True):
        archive.file(name, content)
    target.parent.mkdir(exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(archive.finish())
    partial.rename(target)
    # Keep a few recent variants: checkouts with other init scripts may share the cache.
    variants = sorted(target.parent.glob("*.cpio"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in variants[KEEP_INITRAMFS:]:
        stale.unlink(missing_ok=True)
    return target


def ensure_image(log: Log = stderr_log) -> VMImage:
    """Return a bootable image, downloading and building only what is not cached."""
    cache = cache_dir()
    with _locked(cache):
        kver = _resolve_kernel_version(cache, log)
        tree = _fetch_kernel(cache, kver, log)
        initramfs = _build_initramfs(cache, tree, kver, log)
    return VMImage(
        kernel_version=kver,
        kernel=tree / "boot" / f"vmlinuz-{kver}",
        initramfs=initramfs,
        modules=tree / "lib" / "modules" / kver,
    )


def main() -> int:
    """Prefetch the image and print where it is."""
    try:
        image = ensure_image()
    except VMBuildError as error:
        print(f"ipvs-vm: {error}", file=sys.stderr)
        return 1
    print(f"kernel    {image.kernel}\ninitramfs {image.initramfs}\nmodules   {image.modules}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
