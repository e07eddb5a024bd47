"""The two programs of the one distribution, as users run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from ipvs_api import schema
from tests.apiserver.cluster import write_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_agent_never_imports_kopf() -> None:
    code = (
        "import sys, ipvs_agent.__main__\n"
        "bad = sorted(m for m in sys.modules if m == 'kopf' or m.startswith('kopf.'))\n"
        "assert not bad, bad\n"
    )
    result = run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr


def test_console_scripts_report_their_version() -> None:
    for name in ("ipvs-agent", "ipvs-operator"):
        result = run(str(BIN / name), "--version")
        assert result.returncode == 0 and "0.1.0" in result.stdout, result


def test_operator_prints_the_crds_it_serves() -> None:
    result = run(str(BIN / "ipvs-operator"), "crds")
    assert result.returncode == 0, result.stderr
    printed = list(yaml.safe_load_all(result.stdout))
    files = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))]
    assert printed == files == [doc for _, doc in schema.crd_documents()]


def test_agent_validates_manifests_offline(tmp_path: Path) -> None:
    examples = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    ok = run(str(BIN / "ipvs-agent"), "validate", "-f", *examples)
    assert ok.returncode == 0, ok.stderr
    assert "VirtualServer/api-dr: valid" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: ipvs.io/v1alpha1\nkind: VirtualServer\nmetadata: {name: x}\n"
        "spec:\n  ports: [{port: 80, targetPort: 8080}]\n  forwarding: {method: DR}\n"
        "  backends: {static: [{address: 198.51.100.1}]}\n"
    )
    result = run(str(BIN / "ipvs-agent"), "validate", "-f", str(bad))
    assert result.returncode == 1
    assert "VirtualServer/x: invalid" in result.stderr
    assert "spec.ports: DR and TUN cannot remap ports" in result.stderr


def test_image_installs_this_version() -> None:
    """The image installs the checkout itself, tagged with the chart's appVersion, which is this
    version (tests/image/test_image.py reads the version installed in the built image)."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert (
        "pip install --no-cache-dir --no-deps --no-build-isolation /src"
        in (ROOT / "Dockerfile").read_text()
    )
    chart = (ROOT / "charts" / "ipvs-operator" / "Chart.yaml").read_text()
    assert f'appVersion: "{version}"' in chart


def test_agent_errors_are_one_line_and_an_exit_code(tmp_path: Path) -> None:
    """On this host, whose kernel has no IPVS at all (CONFIG_IP_VS unset: the reason the
    kernel tests run in a VM), ``plan`` must say so in one line, not a traceback."""
    assert not Path("/proc/net/ip_vs").exists(), "this test needs a host without IPVS"
    no_ipvs = run(str(BIN / "ipvs-agent"), "plan", "-f", str(ROOT / "examples" / "dr-static.yaml"))
    assert no_ipvs.returncode == 1
    assert no_ipvs.stderr.count("\n") == 1 and "Traceback" not in no_ipvs.stderr, no_ipvs.stderr
    assert no_ipvs.stderr.startswith("ipvs-agent plan: ") and "IPVS" in no_ipvs.stderr
    for argv in (
        ("apply", "-f", str(tmp_path / "missing.yaml")),
        ("status", "-f", str(tmp_path / "missing.yaml")),
        ("cleanup", "--state-dir", str(tmp_path)),
    ):
        result = run(str(BIN / "ipvs-agent"), *argv)
        assert result.returncode == 1, result
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    unusable = tmp_path / "bad.yaml"
    unusable.write_text("kind: [unclosed\n")
    result = run(str(BIN / "ipvs-agent"), "validate", "-f", str(unusable))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr


def test_the_agent_run_without_bgp_imports_none_of_its_bgp_modules(tmp_path: Path) -> None:
    """Start-up under emulation is mostly imports (bench_startup.py): ``ipvs-agent run``
    imports what it runs, and the BGP modules not with ``--no-bgp`` (the chart's
    ``agent.bgp.enabled: false``). Here the run is stopped where it opens the kernel, after
    its API client, its speakers and their imports."""
    write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1", {})
    code = (  # where the run opens the kernel, it says what it imported and exits
        "import os, sys\n"
        "import ipvs_agent.kernel.ipvs\n"
        "from ipvs_agent.__main__ import main\n"
        "def stop(*_, **__):\n"
        "    print(sorted(m for m in sys.modules if m.startswith('ipvs_agent.announce.bgp')))\n"
        "    sys.stdout.flush()\n"
        "    os._exit(0)\n"
        "ipvs_agent.kernel.ipvs.IPVSKernel = stop\n"
        "main(['run', '--no-bgp', '--node-name', 'n', '--state-dir', sys.argv[1]])\n"
    )
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")}
    for name in ("KUBERNETES_SERVICE_HOST", "POD_NAMESPACE"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", (result.stdout, result.stderr)
