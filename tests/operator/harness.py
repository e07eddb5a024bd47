"""Running the operator against the API-server test bed: processes, clients, polling.

The operator runs as a subprocess (``python -m ipvs_operator run``), exactly as in a pod, so a
test can SIGTERM or SIGKILL it and start another; it authenticates as the ``ipvs-operator``
ServiceAccount bound by ``rbac/operator.yaml``, so every functional test also proves that the
RBAC rules are enough.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.apiserver.cluster import REPO_ROOT, LocalApiServer, write_kubeconfig

T = TypeVar("T")

GROUP, VERSION = "ipvs.io", "v1alpha1"
OPERATOR_NAMESPACE = "ipvs-system"
OPERATOR_SA = "ipvs-operator"
AGENT_SA = "ipvs-agent"
LEASE = "ipvs-operator"
#: Short Lease timings so failover tests take seconds (production: 15/10/2).
LEASE_ARGS = ("--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "0.5")


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.1,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
            last = f"HTTP {exc.status}"
        if last:
            found: T = last
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"
            )
        time.sleep(interval)


def apply_manifests(api: Any, path: Path) -> None:
    """Create-or-replace the RBAC manifests (ServiceAccounts, roles and bindings)."""
    core: Any = client.CoreV1Api(api)
    rbac: Any = client.RbacAuthorizationV1Api(api)
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        kind, meta = doc["kind"], doc["metadata"]
        ns = meta.get("namespace")
        create, replace = {
            "ServiceAccount": (
                lambda d, ns=ns: core.create_namespaced_service_account(ns, d),
                None,
            ),
            "ClusterRole": (rbac.create_cluster_role, rbac.replace_cluster_role),
            "ClusterRoleBinding": (
                rbac.create_cluster_role_binding,
                rbac.replace_cluster_role_binding,
            ),
            "Role": (
                lambda d, ns=ns: rbac.create_namespaced_role(ns, d),
                lambda n, d, ns=ns: rbac.replace_namespaced_role(n, ns, d),
            ),
            "RoleBinding": (
                lambda d, ns=ns: rbac.create_namespaced_role_binding(ns, d),
                lambda n, d, ns=ns: rbac.replace_namespaced_role_binding(n, ns, d),
            ),
        }[kind]
        try:
            create(doc)
        except ApiException as exc:
            if exc.status != 409:
                raise
            if replace is not None:
                replace(meta["name"], doc)


def service_account_kubeconfig(
    bed: LocalApiServer, namespace: str, name: str, path: Path, server: str | None = None
) -> Path:
    """A kubeconfig that authenticates as a ServiceAccount (a TokenRequest token).

    ``server`` replaces the bed's own URL (a client that reaches it through a forward).
    """
    with bed.api_client() as api:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3 * 3600)
        )
        response: Any = client.CoreV1Api(api).create_namespaced_service_account_token(
            name, namespace, request
        )
    token = response.status.token
    ca = (bed.kubeconfig.parent / "pki" / "ca.crt").read_bytes()
    return write_kubeconfig(
        path, server or bed.url, {"token": token}, ca=ca, user=name, namespace=namespace
    )


class Operator:
    """One ``ipvs-operator run`` process with its log in a file."""

    def __init__(
        self, kubeconfig: Path, log: Path, identity: str, args: Sequence[str] = ()
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.identity = identity
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONUNBUFFERED": "1",
            # Python's stacks on SIGABRT into the log: stop() sends it to an operator that hangs.
            "PYTHONFAULTHANDLER": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
        cmd = [
            sys.executable,
            "-m",
            "ipvs_operator",
            "run",
            "--lease-namespace",
            OPERATOR_NAMESPACE,
            "--identity",
            self.identity,
            "--health-port",
            "0",
            *LEASE_ARGS,
            *self.args,
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; returns the exit status. One that hangs gets SIGABRT, which makes
        it write every thread's stack into its log (faulthandler; a hang after "kopf has
        stopped" was seen once in CI), then SIGKILL if it is still there."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(10.0)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Recorder:
    """Every change to the objects one list call returns, from a resourceVersion on.

    A watch that resumes from the last version it saw, so no write is missed; ``stop`` ends it
    within one short server-side timeout.
    """

    def __init__(self, lister: Callable[..., Any], *args: Any) -> None:
        self._lister = lister
        self._args = args
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        listed = lister(*args)
        self._version = _version_of(listed)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                stream = watch.Watch().stream(
                    self._lister,
                    *self._args,
                    resource_version=self._version,
                    timeout_seconds=1,
                    allow_watch_bookmarks=False,
                )
                for event in stream:
                    obj = event["object"]
                    if not isinstance(obj, dict):
                        obj = obj.to_dict()
                        obj["metadata"]["resourceVersion"] = obj["metadata"]["resource_version"]
                    self.seen.append((event["type"], obj))
                    self._version = obj["metadata"]["resourceVersion"]
        except BaseException as exc:  # reported by stop(), never swallowed
            self.error = exc

    def stop(self) -> list[tuple[str, dict[str, Any]]]:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the watch did not stop"
        if self.error is not None:
            raise self.error
        return self.seen

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _version_of(listed: Any) -> str:
    if isinstance(listed, dict):
        return str(listed["metadata"]["resourceVersion"])
    return str(listed.metadata.resource_version)


def lease_holder(api: Any) -> str:
    try:
        lease: Any = client.CoordinationV1Api(api).read_namespaced_lease(LEASE, OPERATOR_NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return ""
        raise
    return str(lease.spec.holder_identity or "")


@contextmanager
def running(operator: Operator) -> Iterator[Operator]:
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


# -- object helpers ---------------------------------------------------------------------


# The typed client wants model objects; these tests pass plain dicts (which it accepts), so
# the API objects are handed out untyped.


def custom(api: Any) -> Any:
    return client.CustomObjectsApi(api)


def apps(api: Any) -> Any:
    return client.AppsV1Api(api)


def core(api: Any) -> Any:
    return client.CoreV1Api(api)


def discovery(api: Any) -> Any:
    return client.DiscoveryV1Api(api)


def authorization(api: Any) -> Any:
    return client.AuthorizationV1Api(api)


def get_vs(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = custom(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, "virtualservers", name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found


def list_vs(api: Any, namespace: str) -> list[dict[str, Any]]:
    listed = custom(api).list_namespaced_custom_object(GROUP, VERSION, namespace, "virtualservers")
    items: list[dict[str, Any]] = listed["items"]
    return items


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or ():
        if cond.get("type") == type_:
            found: dict[str, Any] = cond
            return found
    return {}


def ingress(api: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    svc = client.CoreV1Api(api).read_namespaced_service_status(name, namespace)
    lb = svc.status.load_balancer if svc.status else None
    return [{"ip": i.ip, "ipMode": i.ip_mode} for i in ((lb.ingress if lb else None) or [])]


def events(
    api: Any, namespace: str, *, name: str | None = None, kind: str | None = None
) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about objects in ``namespace`` (by name, kind)."""
    listed: Any = client.CoreV1Api(api).list_namespaced_event(namespace)
    return [
        (e.type, e.reason, e.message)
        for e in listed.items
        if (name is None or e.involved_object.name == name)
        and (kind is None or e.involved_object.kind == kind)
    ]


def service(
    name: str,
    *,
    ports: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    lb_class: str | None = "ipvs.io/lb",
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "type": "LoadBalancer",
            "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}],
            "selector": {"app": name},
            **spec,
        },
    }
    if lb_class is not None:
        body["spec"]["loadBalancerClass"] = lb_class
    return body


def virtual_server(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualServer",
        "metadata": {"name": name},
        "spec": {
            "ports": [{"port": 80}],
            "backends": {"static": [{"address": "198.51.100.10"}]},
            **spec,
        },
    }


def address_pool(name: str, addresses: list[str] | None, **spec: Any) -> dict[str, Any]:
    """An AddressPool; ``addresses`` None for a pool of firewall marks only."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AddressPool",
        "metadata": {"name": name},
        "spec": {**({} if addresses is None else {"addresses": addresses}), **spec},
    }
