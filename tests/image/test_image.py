"""The image as built from the Dockerfile (tests/image/build.sh): what it carries and how.

Read from the exported OCI archive, its unpacked root filesystem and its SBOM — the artifacts
the later steps (tests/image/test_programs.py, tests/node) run.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tomllib
from pathlib import Path

from tests.apiserver.cluster import REPO_ROOT
from tests.chart.test_image import installed_packages
from tests.image.lock import LOCK
from tests.image.oci import Image

#: Measured 2026-12: 70 MiB compressed, 293 MB unpacked (the kubernetes client alone 126 MB).
MAX_COMPRESSED = 96 * 2**20
MAX_UNPACKED = 340 * 10**6
SITE = "opt/ipvs/lib/python3.11/site-packages"
#: What must never reach the image: installers, compilers, the build machine's settings.
FORBIDDEN_PACKAGES = {"python3-pip", "python3-venv", "python3-setuptools", "gcc", "gcc-12",
                      "build-essential", "curl", "wget", "ca-certificates"}  # fmt: skip


def project_version() -> str:
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        version: str = tomllib.load(handle)["project"]["version"]
    return version


def dpkg_status(text: str) -> dict[str, dict[str, str]]:
    """Installed packages of a dpkg status file: name -> fields."""
    packages: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Status", "").endswith(" installed"):
            packages[fields["Package"]] = fields
    return packages


def depends(fields: dict[str, str]) -> set[str]:
    """Names a package depends on (every alternative, without versions or architectures)."""
    names: set[str] = set()
    for key in ("Depends", "Pre-Depends"):
        for alternative in re.split(r"[,|]", fields.get(key, "")):
            name = alternative.strip().split(" ")[0].split(":")[0]
            if name:
                names.add(name)
    return names


def base_status(image: Image) -> str:
    """/var/lib/dpkg/status of the base image: its layer is the manifest's first."""
    first = image.manifest()["layers"][0]["digest"].split(":", 1)[1]
    with tarfile.open(image.archive) as archive:
        layer = archive.extractfile(f"blobs/sha256/{first}")
        assert layer is not None
        with tarfile.open(fileobj=layer, mode="r|gz") as base:
            for member in base:
                if member.name.lstrip("./") == "var/lib/dpkg/status":
                    data = base.extractfile(member)
                    assert data is not None
                    return data.read().decode()
    raise AssertionError("the base layer has no dpkg status")


def test_config_runs_the_operator_as_65532(image: Image) -> None:
    config = image.config()["config"]
    assert config["User"] == "65532:65532"
    assert config["Cmd"] == ["ipvs-operator"]
    assert not config.get("Entrypoint")
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].split(":")[0] == "/opt/ipvs/bin"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    base = image.manifest()["annotations"]["org.opencontainers.image.base.name"]
    assert base == "docker.io/library/debian:bookworm-slim"


def test_size(image: Image, rootfs: Path) -> None:
    compressed = sum(layer["size"] for layer in image.manifest()["layers"])
    unpacked = sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(rootfs) for f in files)
    assert compressed <= MAX_COMPRESSED, f"{compressed / 2**20:.0f} MiB compressed"
    assert unpacked <= MAX_UNPACKED, f"{unpacked / 1e6:.0f} MB unpacked"


def test_debian_packages_are_the_base_and_what_the_dockerfile_asks_for(
    image: Image, rootfs: Path
) -> None:
    """Besides the base's: the pinned packages at their versions, and what they depend on."""
    installed = dpkg_status((rootfs / "var/lib/dpkg/status").read_text())
    base = dpkg_status(base_status(image))
    wanted = installed_packages()
    for name, version in wanted.items():
        assert installed[name]["Version"] == version, name
    closure: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name in closure or name not in installed:
            continue
        closure.add(name)
        todo += depends(installed[name])
    added = set(installed) - set(base)
    assert added <= closure, f"packages nothing asked for: {sorted(added - closure)}"
    assert not (set(installed) & FORBIDDEN_PACKAGES)
    assert set(base) <= set(installed)  # nothing of the base was removed


def test_python_packages_are_the_lock_without_the_installers(rootfs: Path) -> None:
    found = {}
    for meta in (rootfs / SITE).glob("*.dist-info/METADATA"):
        fields = dict(
            line.split(": ", 1) for line in meta.read_text().splitlines()[:3] if ": " in line
        )
        found[fields["Name"].lower().replace("_", "-")] = fields["Version"]
    locked = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split(" ")[0].split("==")
            locked[name.lower().replace("_", "-")] = version
    del locked["setuptools"]  # the build backend, removed after the build
    assert found == {**locked, "ipvs-operator": project_version()}
    assert not (rootfs / "opt/ipvs/bin/pip").exists()


def test_programs_are_on_the_path(image: Image, rootfs: Path) -> None:
    env = dict(item.split("=", 1) for item in image.config()["config"]["Env"])
    path = env["PATH"].split(":")

    def which(program: str) -> Path | None:
        for folder in path:
            candidate: Path = rootfs / folder.lstrip("/") / program
            if candidate.is_file() or candidate.is_symlink():
                return candidate
        return None

    for program in ("ipvs-operator", "ipvs-agent", "python", "nft", "ip", "modprobe", "sh"):
        assert which(program) is not None, program
    shebang = (rootfs / "opt/ipvs/bin/ipvs-agent").read_text().splitlines()[0]
    assert shebang == "#!/opt/ipvs/bin/python3"


def test_bytecode_is_compiled_for_a_read_only_root(rootfs: Path) -> None:
    """Nothing needs writing at run time: every module of ours has its .pyc."""
    for package in ("ipvs_api", "ipvs_operator", "ipvs_agent"):
        for source in (rootfs / SITE / package).rglob("*.py"):
            compiled = source.parent / "__pycache__" / f"{source.stem}.cpython-311.pyc"
            assert compiled.is_file(), compiled


def test_nothing_of_the_build_machine_is_left(rootfs: Path) -> None:
    assert not (rootfs / "etc/pip.conf").exists()
    assert not (rootfs / "src").exists()
    assert sorted(p.name for p in (rootfs / "root").iterdir()) == [".bashrc", ".profile"]
    assert not list((rootfs / "var/lib/apt/lists").glob("*_Packages*"))


def test_sbom_lists_every_package_with_its_version(image: Image, rootfs: Path) -> None:
    sbom = json.loads(image.sbom.read_text())
    assert sbom["spdxVersion"] == "SPDX-2.3"
    packages = {}
    for package in sbom["packages"]:
        for ref in package.get("externalRefs", []):
            if ref["referenceType"] == "purl":
                kind = ref["referenceLocator"].split("/", 1)[0]
                packages[(kind, package["name"].lower())] = package.get("versionInfo")
    installed = dpkg_status((rootfs / "var/lib/dpkg/status").read_text())
    for name, fields in installed.items():
        assert packages.get(("pkg:deb", name)) == fields["Version"], name
    assert packages[("pkg:pypi", "ipvs-operator")] == project_version()
    assert packages[("pkg:pypi", "kopf")]
    assert packages[("pkg:pypi", "kubernetes")]
