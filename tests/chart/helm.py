"""The helm binary and the chart, for tests/chart: rendering, running and reading results.

helm comes from tests/apiserver/build.sh (built from the Go module proxy and cached), never
from $PATH, so every machine tests with the same version. Its cache, config and data
directories are a throwaway folder, so tests never touch the user's helm setup.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.apiserver.cluster import REPO_ROOT

CHART = REPO_ROOT / "charts" / "ipvs-operator"
VALUES = Path(__file__).resolve().parent / "values"
RELEASE = "ipvs"
Manifest = dict[str, Any]


class HelmError(AssertionError):
    """helm exited non-zero; the message has its command line and output."""


class Helm:
    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }
        self.env.pop("KUBECONFIG", None)

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.binary), *map(str, args)]
        proc = subprocess.run(
            argv, capture_output=True, text=True, env=self.env, timeout=300, check=False
        )
        if check and proc.returncode != 0:
            raise HelmError(
                f"{' '.join(argv)} exited {proc.returncode}\n"
                f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
            )
        return proc

    def template(
        self,
        *values: str,
        namespace: str = "ipvs-system",
        sets: Iterable[str] = (),
        include_crds: bool = False,
    ) -> list[Manifest]:
        """``helm template`` with values files from tests/chart/values and --set pairs."""
        args: list[str | Path] = ["template", RELEASE, CHART, "--namespace", namespace]
        args += value_args(values, sets)
        if include_crds:
            args.append("--include-crds")
        return documents(self.run(*args).stdout)


def value_args(values: Iterable[str], sets: Iterable[str] = ()) -> list[str | Path]:
    args: list[str | Path] = []
    for name in values:
        args += ["--values", VALUES / name]
    for pair in sets:
        args += ["--set", pair]
    return args


def documents(text: str) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The one object of ``kind`` (and ``name``) among ``docs``."""
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: Iterable[Manifest]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def container(pod_spec: Mapping[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    matches = [c for c in pod_spec.get(key, []) if c["name"] == name]
    assert len(matches) == 1, f"{key}: no single {name}"
    result: dict[str, Any] = matches[0]
    return result


def template_script(container_name: str, *, template: str = "agent-daemonset.yaml") -> list[str]:
    """The ``command`` of a container in a template, read without helm (for tests in the VM).

    Only for commands written literally (``- interpreter``, ``- flag``, ``- |`` script): no
    template directive may appear in them, which this checks.
    """
    lines = (CHART / "templates" / template).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"- name: {container_name}")
    at = next(i for i in range(start, len(lines)) if lines[i].strip() == "command:")
    command: list[str] = []
    i = at + 1
    while i < len(lines) and lines[i].lstrip().startswith("- "):
        item = lines[i].strip()[2:]
        if item != "|":
            command.append(item)
            i += 1
            continue
        indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" " * indent)):
            body.append(lines[i][indent:])
            i += 1
        command.append("\n".join(body).rstrip("\n") + "\n")
    assert command and not any("{{" in part for part in command), command
    return command
