"""The agent's start-up: from ``ipvs-agent run`` to its first API request (issue 13 §2).

Under TCG emulation the imports once took minutes: the kubernetes client's models alone took
about 86 s before the first API call. This bench runs the real command in the IPVS test VM,
against a stand-in API server on loopback that only notes when the first request arrives
(and answers 503, so nothing follows), and reports:

- the time from starting the process to that first request, each of ``--rounds`` runs;
- in the same boot, the time of a bare ``python -c pass`` (the interpreter's own start-up),
  as the ratio's base: absolute times under TCG mean little;
- where the start-up goes: one more run with ``PYTHONPROFILEIMPORTTIME=1``, the imports' own
  time summed by top-level package and for each of the project's modules (that run is slower
  for the profiling itself);
- whether any of the kubernetes client's models was imported (the agent reads every object as
  a plain dict, so none should be).

Command (results in docs/benchmarks.md)::

    .venv/bin/python -m tests.vm.qemu --timeout 900 -- python bench/bench_startup.py

With ``PYTHONPATH`` set, the agent runs from that tree first (another version's code, exported
where the VM sees it, for a comparison in the same boot).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))

from bench.bench_kernel import machine  # noqa: E402
from tests.apiserver.cluster import write_kubeconfig  # noqa: E402


class FirstRequest:
    """A stand-in API server on loopback: notes when the first request comes, answers 503."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.at = 0.0
        self.paths: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                if not owner.arrived.is_set():
                    owner.at = time.monotonic()
                    owner.arrived.set()
                owner.paths.append(f"{self.command} {self.path}")
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def agent_command(state: Path) -> list[str]:
    return [
        sys.executable, "-m", "ipvs_agent", "run", "--node-name", "bench",
        "--interface", "ipvsbench0", "--state-dir", str(state), "--metrics-port", "0",
    ]  # fmt: skip


def until_first_request(
    work: Path, timeout: float, extra_env: dict[str, str] | None = None
) -> tuple[float, list[str], str]:
    """Start the agent; seconds until its first API request, the requests seen, its stderr."""
    server = FirstRequest()
    config = work / "kubeconfig"
    write_kubeconfig(config, f"http://127.0.0.1:{server.port}", {"token": "bench"})
    state = Path(tempfile.mkdtemp(prefix="state-", dir=work))
    env = {k: v for k, v in os.environ.items() if k not in ("POD_NAMESPACE", "NODE_NAME")}
    path = [p for p in (os.environ.get("PYTHONPATH"), str(CHECKOUT)) if p]  # another tree first
    env.update(
        {"KUBECONFIG": str(config), "PYTHONPATH": os.pathsep.join(path), **(extra_env or {})}
    )
    stderr = work / "stderr"
    try:
        with stderr.open("wb") as sink:
            started = time.monotonic()
            proc = subprocess.Popen(agent_command(state), env=env, stderr=sink, cwd=CHECKOUT)
            try:
                deadline = started + timeout
                while not server.arrived.wait(0.05):  # or the agent exits, or time is up
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(
                            f"no API request (exit {proc.poll()}):\n{stderr.read_text()}"
                        )
                elapsed = server.at - started
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        return elapsed, list(server.paths), stderr.read_text()
    finally:
        server.close()


def bare_python() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.monotonic() - started


#: The project's own packages, listed module by module in the profile.
OWN = ("ipvs_agent", "ipvs_api")


def import_profile(stderr: str) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """Seconds of the imports' own time by top-level package (``-X importtime`` lines), the
    same for each of the project's own modules, and the kubernetes client models imported."""
    own: dict[str, float] = {}
    modules: dict[str, float] = {}
    models = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        try:
            self_us = int(line.split(":", 1)[1].split("|")[0])
        except ValueError:
            continue  # the header line
        name = line.rsplit("|", 1)[1].strip()
        top = name.split(".")[0]
        own[top] = own.get(top, 0.0) + self_us / 1e6
        if top in OWN:
            modules[name] = modules.get(name, 0.0) + self_us / 1e6
        if name.startswith("kubernetes.client.models."):
            models.append(name)
    return _by_time(own), _by_time(modules), models


def _by_time(seconds: dict[str, float]) -> dict[str, float]:
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="per start-up")
    parser.add_argument("--deadline", type=float, default=840.0, help="for the whole bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    def out_of_time(signum: int, frame: object) -> None:
        raise SystemExit(f"bench_startup.py: --deadline {args.deadline:.0f}s passed")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(int(args.deadline))
    result: dict[str, Any] = {"machine": machine(), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        for _ in range(args.rounds):
            python = bare_python()
            agent, paths, _ = until_first_request(work, args.timeout)
            result["rounds"].append({"python_s": python, "first_request_s": agent})
            print(f"python -c pass {python:.2f} s; ipvs-agent run to its first API request "
                  f"{agent:.2f} s ({agent / python:.1f} x); first request: {paths[0]}",
                  flush=True)  # fmt: skip
        profiled, _, stderr = until_first_request(
            work, args.timeout, {"PYTHONPROFILEIMPORTTIME": "1"}
        )
    own, modules, models = import_profile(stderr)
    result.update(
        profiled_first_request_s=profiled,
        imports_own_s=own,
        project_modules_s=modules,
        imports_total_s=sum(own.values()),
        client_models_imported=models,
    )
    print(f"profiled run: {profiled:.2f} s to the first request, of it imports "
          f"{result['imports_total_s']:.2f} s:")  # fmt: skip
    for package, seconds in list(own.items())[:12]:
        print(f"  {package:<28} {seconds:6.2f} s")
    print(f"  of them the project's own modules, {sum(modules.values()):.2f} s:")
    for module, seconds in list(modules.items())[:12]:
        print(f"    {module:<40} {seconds:6.2f} s")
    print(f"kubernetes client models imported: {len(models)} {models[:5]}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
