"""The image installs exactly the programs the agent and the chart's commands run.

Found in the source, not listed by hand: every ``run([...])`` call in the agent whose first
element is a literal or a ``self.<attribute>`` whose constructor default names a program, and
the chart's container commands. A new program in the agent without its Debian package in the
Dockerfile fails here (and so does a package nothing uses any more).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.apiserver.cluster import REPO_ROOT
from tests.chart.helm import template_script

AGENT = REPO_ROOT / "node-agent" / "ipvs_agent"
DOCKERFILE = REPO_ROOT / "Dockerfile"
#: program -> Debian package that provides it in the image (sh comes with the base; python and
#: the agent's own program, the image's pip install, are the venv's, on Debian's python3).
PACKAGES = {
    "nft": "nftables",
    "ip": "iproute2",
    "modprobe": "kmod",
    "python": "python3",
    "ipvs-agent": "python3",
}
BASE = {"sh"}


def programs_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    defaults: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            pairs = list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
            positional = args.posonlyargs + args.args
            pairs += list(
                zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True)
            )
            for arg, default in pairs:
                if isinstance(default, ast.Constant) and isinstance(default.value, str):
                    defaults[arg.arg] = default.value
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = (
            node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        )
        first = node.args[0]
        if name != "run" or not isinstance(first, ast.List) or not first.elts:
            continue
        program = first.elts[0]
        if isinstance(program, ast.Constant) and isinstance(program.value, str):
            found.add(program.value)
        elif isinstance(program, ast.Attribute) and program.attr in defaults:
            found.add(defaults[program.attr])
    return found


def installed_packages() -> dict[str, str]:
    """The Debian packages the final stage installs (after the last FROM), with their pins."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    final = re.split(r"^FROM ", text, flags=re.MULTILINE)[-1]
    packages: dict[str, str] = {}
    for line in final.splitlines():
        if "apt-get install" in line:
            for name, version in re.findall(r"\s([a-z0-9][a-z0-9.+-]*)=(\S+)", line):
                packages[name] = version
    return packages


def test_agent_programs_are_found() -> None:
    found = set().union(*(programs_in(p) for p in AGENT.rglob("*.py")))
    assert "nft" in found  # the scan works: the ownership table is written with nft


def test_image_installs_exactly_what_is_run() -> None:
    programs = set().union(*(programs_in(p) for p in AGENT.rglob("*.py")))
    for container in ("agent", "load-modules"):
        command = template_script(container)
        programs.add(command[0])
        if len(command) > 2:  # an inline script: the programs it calls
            programs |= set(re.findall(r"^\s*(\w+) ", command[2], re.MULTILINE)) & set(PACKAGES)
    unknown = programs - BASE - set(PACKAGES)
    assert unknown == set(), f"programs with no package in the image: {unknown}"
    needed = {PACKAGES[p] for p in programs if p in PACKAGES}
    assert set(installed_packages()) == needed


def test_packages_are_pinned_and_the_operator_is_not_root() -> None:
    assert all(installed_packages().values())
    text = DOCKERFILE.read_text()
    # The base is Debian's slim image of a given date, pinned by digest; every stage builds on it.
    froms = re.findall(r"^FROM (.*)$", text, re.MULTILINE)
    assert re.fullmatch(r"debian:bookworm-\d{8}-slim@sha256:[0-9a-f]{64} AS base", froms[0])
    assert froms[1:] == ["base AS build", "base"]
    assert re.findall(r"^USER (\S+)", text, re.MULTILINE)[-1] == "65532:65532"
