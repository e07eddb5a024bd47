"""A real kube-apiserver backed by a real etcd, on loopback, for tests.

Contract tests need the API server's own behaviour (CRD schema validation and defaulting,
RBAC, status subresources, resourceVersion conflicts, watches), which no mock reproduces.
This module runs the two real processes with throwaway certificates and temporary storage.
It has no pytest dependency so the same class serves the pytest fixtures
(tests/apiserver/fixtures.py), the manual CLI (``python -m tests.apiserver.cluster``) and
anything else that wants a disposable control plane.

Only etcd and kube-apiserver run: there is no controller-manager, scheduler or kubelet, so
nothing creates ``default`` service accounts, finishes namespace deletion, garbage-collects
owned objects or runs pods. See docs/testing.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
BUILD_SCRIPT = HERE / "build.sh"
GO_MOD = HERE / "go" / "go.mod"

#: Service CIDR handed to the apiserver; it only allocates ClusterIPs from it (no traffic).
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"

T = TypeVar("T")


class TestBedError(RuntimeError):
    """The test bed could not be built or started; the message says why and what to do."""

    __test__ = False  # not a pytest test class, despite the name


# --------------------------------------------------------------------------------------
# Building / locating binaries


def kubernetes_version() -> str:
    """The Kubernetes release the wrapper module pins, e.g. ``v1.35.4`` (from go/go.mod)."""
    pattern = r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v1\.\S+)"
    match = re.search(pattern, GO_MOD.read_text(), re.MULTILINE)
    if match is None:
        raise TestBedError(f"cannot find the k8s.io/kubernetes version in {GO_MOD}")
    return match.group(1)


def build_binaries(target: str = "apiserver", *, echo: IO[str] | None = None) -> dict[str, Path]:
    """Run build.sh (a no-op when its cache is warm) and return ``{name: path}``.

    build.sh's progress goes to ``echo`` (stderr by default) line by line, since a cold
    kube-apiserver build takes minutes and silence would look like a hang.
    """
    out = sys.stderr if echo is None else echo
    proc = subprocess.Popen(
        ["bash", str(BUILD_SCRIPT), target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    tail: deque[str] = deque(maxlen=40)

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.rstrip("\n"))
            out.write(line)
            out.flush()

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    rc = proc.wait()
    pump_thread.join()
    if rc != 0:
        raise TestBedError(f"{BUILD_SCRIPT} {target} failed (exit {rc}):\n" + "\n".join(tail))
    binaries: dict[str, Path] = {}
    for line in stdout.splitlines():
        name, sep, path = line.partition("\t")
        if sep:
            binaries[name] = Path(path)
    return binaries


# --------------------------------------------------------------------------------------
# Certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    """P-256 keys: generated in microseconds, accepted by kube-apiserver everywhere we use them."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    # Back-dated an hour against clock skew; a year is plenty for a throwaway CLI session.
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=365)
    )


@dataclass(frozen=True)
class _KeyPair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _make_ca(common_name: str) -> _KeyPair:
    key = _new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _KeyPair(key, _validity(builder).sign(key, hashes.SHA256()))


def _make_leaf(
    ca: _KeyPair,
    common_name: str,
    *,
    organizations: Sequence[str] = (),
    server: bool = False,
    extra_sans: Sequence[str] = (),
) -> _KeyPair:
    key = _new_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organizations))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if server:
        sans: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            *(x509.IPAddress(ipaddress.ip_address(address)) for address in extra_sans),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _KeyPair(key, _validity(builder).sign(ca.key, hashes.SHA256()))


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def write_kubeconfig(
    path: Path,
    server: str,
    credentials: dict[str, str],
    *,
    ca: bytes | None = None,
    user: str = "user",
    namespace: str | None = None,
) -> Path:
    """A kubeconfig of one cluster, one user and one context (mode 0600: it holds a secret).

    ``credentials`` is the kubeconfig's ``user`` entry (a token, a client certificate's data);
    ``ca`` the PEM of the CA that signed the server's certificate.
    """
    cluster: dict[str, str] = {"server": server}
    if ca is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
    context = {"cluster": "bed", "user": user}
    if namespace is not None:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bed", "cluster": cluster}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": "bed", "context": context}],
        "current-context": "bed",
    }
    return _write(path, yaml.safe_dump(config).encode(), private=True)


# --------------------------------------------------------------------------------------
# Processes


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports, all held open together so they cannot repeat."""
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]


_PR_SET_PDEATHSIG = 1
_libc: Any = None


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGKILL the child when the test process dies.

    Without it a pytest killed by SIGKILL (CI timeout, OOM) would leave etcd and
    kube-apiserver running forever. SIGKILL, not SIGTERM: both die at once, and a
    kube-apiserver shutting down gracefully hangs retrying an etcd that is already gone.
    Tied to the thread that starts the server, so start it from a thread that outlives it
    (the main thread, in pytest and the CLI).
    """
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _load_libc() -> None:
    global _libc
    if _libc is None and sys.platform == "linux":
        with contextlib.suppress(OSError):
            _libc = ctypes.CDLL(None, use_errno=True)


_OWNER_FILE = "owner.pid"


def _remove_orphaned_etcd_dirs(base: Path) -> None:
    """Remove etcd data dirs left by test processes that were killed before stop().

    They sit on tmpfs (RAM) with a 64 MB preallocated WAL each, so leaks add up on a
    long-lived machine. A dir is orphaned when the pid in its owner file is gone.
    """
    for candidate in base.glob("ipvs-etcd-*"):
        try:
            pid = int((candidate / _OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or just being created
        if not _process_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (a killed parent not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Format: "pid (comm) state ..."; comm may contain spaces or parentheses.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open(errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError as e:
        return f"<cannot read {path}: {e}>"


def _poll(
    what: str,
    check: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.1,
    alive: Callable[[], None] = lambda: None,
) -> T:
    """Call ``check`` until it returns non-None or ``timeout`` passes (then raise).

    ``alive`` runs each round first and raises if a process we wait on has died, so a
    crash is reported at once instead of after the whole deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        alive()
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise TestBedError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _status_message(error: Exception) -> str:
    """The human part of an API error (its Status message), not the whole JSON body."""
    body = getattr(error, "body", None)
    try:
        message = json.loads(body)["message"] if body else None
    except (ValueError, KeyError, TypeError):
        message = None
    return str(message or body or error)


def _etcd_supports(etcd: Path, flag: str) -> bool:
    """Whether this etcd knows ``flag`` (3.4.23 has no --unsafe-no-fsync; 3.5 does)."""
    help_text = subprocess.run([str(etcd), "--help"], capture_output=True, text=True, check=False)
    return flag in help_text.stdout + help_text.stderr


class LocalApiServer:
    """etcd + kube-apiserver on 127.0.0.1 with a throwaway PKI, started by ``start()``.

    Everything lives in one temporary directory (certificates, kubeconfig, logs) plus an
    etcd data directory on tmpfs when /dev/shm exists (etcd fsyncs a lot and 3.4 cannot
    turn that off). ``stop()`` removes both unless ``keep_dir`` (or IPVS_TEST_KEEP=1).
    """

    def __init__(
        self,
        *,
        apiserver_binary: Path | None = None,
        etcd_binary: Path | None = None,
        startup_timeout: float = 90.0,
        keep_dir: bool | None = None,
        extra_apiserver_args: Sequence[str] = (),
        extra_sans: Sequence[str] = (),
    ) -> None:
        """``extra_sans``: more IP addresses for the serving certificate, for clients that
        reach the loopback server through a forward (the lab's VM: tests/e2e/bed.py)."""
        self.extra_sans = list(extra_sans)
        self._apiserver_binary = apiserver_binary
        self._etcd_binary = etcd_binary
        self.startup_timeout = startup_timeout
        self.keep_dir = os.environ.get("IPVS_TEST_KEEP") == "1" if keep_dir is None else keep_dir
        self.extra_apiserver_args = list(extra_apiserver_args)
        self.dir: Path | None = None
        self._etcd_data: Path | None = None
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._log_files: list[IO[bytes]] = []
        self.port = 0
        self.etcd_url = ""
        #: Seconds from start() until /readyz answered ok.
        self.startup_seconds = 0.0
        self._client_ca: _KeyPair | None = None

    # -- public properties -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The secure endpoint, e.g. ``https://127.0.0.1:40123``."""
        self._require_started()
        return f"https://127.0.0.1:{self.port}"

    @property
    def kubeconfig(self) -> Path:
        """An admin (system:masters) kubeconfig with certificates embedded."""
        return self._path("kubeconfig")

    @property
    def apiserver_log(self) -> Path:
        return self._path("kube-apiserver.log")

    @property
    def etcd_log(self) -> Path:
        return self._path("etcd.log")

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> LocalApiServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start etcd then kube-apiserver and return once /readyz is ok.

        On failure both processes are stopped and TestBedError carries their log tails.
        """
        if self.dir is not None:
            raise TestBedError("LocalApiServer already started")
        began = time.monotonic()
        if self._apiserver_binary is None or self._etcd_binary is None:
            binaries = build_binaries("apiserver")
            self._apiserver_binary = self._apiserver_binary or binaries["kube-apiserver"]
            self._etcd_binary = self._etcd_binary or binaries["etcd"]
        self.dir = Path(tempfile.mkdtemp(prefix="ipvs-apiserver-"))
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._wait_ready()
        except BaseException as e:
            message = self._failure_report(str(e))
            self.stop(force_keep=True)
            if isinstance(e, TestBedError | OSError | subprocess.SubprocessError):
                raise TestBedError(message) from e
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self, *, force_keep: bool = False) -> None:
        """Stop kube-apiserver then etcd (SIGTERM, then SIGKILL) and remove the temp dirs.

        Idempotent. The directory is kept after a failed start so its logs can be read.
        """
        for proc in (self._apiserver, self._etcd):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._apiserver = self._etcd = None
        for f in self._log_files:
            f.close()
        self._log_files.clear()
        if self._etcd_data is not None:
            shutil.rmtree(self._etcd_data, ignore_errors=True)
            self._etcd_data = None
        if self.dir is not None:
            if not (self.keep_dir or force_keep):
                shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def stop_apiserver(self) -> None:
        """Stop only kube-apiserver (an API outage); etcd and the PKI stay for a restart."""
        proc = self._apiserver
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._apiserver = None

    def start_apiserver(self) -> None:
        """Start kube-apiserver again on the same port, etcd and certificates; wait for ready."""
        self._require_started()
        if self._apiserver is not None and self._apiserver.poll() is None:
            raise TestBedError("kube-apiserver is already running")
        self._start_apiserver()
        self._wait_ready()

    # -- clients -------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` authenticated as the admin (system:masters).

        Built from an explicit Configuration so it never touches the kubernetes package's
        global default configuration (kopf and other code may rely on that).
        """
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self._path("pki/ca.crt"))
        config.cert_file = str(self._path("pki/admin.crt"))
        config.key_file = str(self._path("pki/admin.key"))
        return client.ApiClient(config)

    def client_for_service_account(
        self,
        namespace: str,
        name: str,
        *,
        create: bool = True,
        expiration_seconds: int = 3600,
    ) -> Any:
        """An ApiClient that acts as ServiceAccount ``namespace/name`` (for RBAC tests).

        The token comes from the TokenRequest API, as a projected pod token would, so the
        request is authenticated as ``system:serviceaccount:<ns>:<name>`` and authorised by
        RBAC alone. With ``create`` the ServiceAccount is created if missing (no
        controller-manager runs here to do it).
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with self.api_client() as admin:
            core = client.CoreV1Api(admin)
            if create:
                try:
                    core.create_namespaced_service_account(
                        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
                    )
                except ApiException as e:
                    if e.status != 409:
                        raise
            request = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
            )
            response = core.create_namespaced_service_account_token(name, namespace, request)
        token: str | None = response.status.token if response.status else None
        if not token:
            raise TestBedError(f"TokenRequest for {namespace}/{name} returned no token")
        config = client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self._path("pki/ca.crt"))
        config.api_key = {"authorization": token}
        config.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(config)

    # -- CRDs ----------------------------------------------------------------------------

    def install_crds(self, paths: Iterable[Path | str], *, timeout: float = 30.0) -> list[str]:
        """Create or update every CRD in the YAML files and wait until each is Established.

        Returns the CRD names. Updating (not failing) on 409 lets a session re-apply the
        repo's CRDs after editing them; Established is what makes the new types servable.
        """
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        # The client accepts plain dicts as bodies; its type hints want model objects.
        documents: list[tuple[Path, Any]] = []
        for path in map(Path, paths):
            with open(path) as f:
                for doc in yaml.safe_load_all(f):
                    if doc is None:
                        continue
                    if doc.get("kind") != "CustomResourceDefinition":
                        kind = doc.get("kind")
                        raise TestBedError(f"{path}: not a CustomResourceDefinition: {kind}")
                    documents.append((path, doc))
        names: list[str] = []
        with self.api_client() as admin:
            api = client.ApiextensionsV1Api(admin)
            for path, doc in documents:
                name = doc["metadata"]["name"]
                try:
                    api.create_custom_resource_definition(doc)
                except ApiException as e:
                    if e.status != 409:
                        raise TestBedError(
                            f"the API server rejected CRD {name} from {path}:\n{_status_message(e)}"
                        ) from e
                    current = api.read_custom_resource_definition(name)
                    assert current.metadata is not None
                    update: Any = {
                        **doc,
                        "metadata": {
                            **doc["metadata"],
                            "resourceVersion": current.metadata.resource_version,
                        },
                    }
                    try:
                        api.replace_custom_resource_definition(name, update)
                    except ApiException as e:
                        raise TestBedError(
                            f"the API server rejected the update of CRD {name} from {path}:\n"
                            f"{_status_message(e)}"
                        ) from e
                names.append(name)

            def established(name: str) -> bool | None:
                crd = api.read_custom_resource_definition(name)
                conditions = (crd.status.conditions if crd.status else None) or []
                ok = any(c.type == "Established" and c.status == "True" for c in conditions)
                return True if ok else None

            for name in names:
                _poll(
                    f"CRD {name} to be Established",
                    partial(established, name),
                    timeout=timeout,
                    interval=0.05,
                )
        return names

    # -- internals -----------------------------------------------------------------------

    def _require_started(self) -> None:
        if self.dir is None or self.port == 0:
            raise TestBedError("LocalApiServer is not started")

    def _path(self, relative: str) -> Path:
        self._require_started()
        assert self.dir is not None
        return self.dir / relative

    def _write_pki(self) -> None:
        assert self.dir is not None
        pki = self.dir / "pki"
        pki.mkdir()
        ca = _make_ca("ipvs-testbed-ca")
        client_ca = _make_ca("ipvs-testbed-client-ca")
        serving = _make_leaf(ca, "kube-apiserver", server=True, extra_sans=self.extra_sans)
        admin = _make_leaf(client_ca, "admin", organizations=["system:masters"])
        self._client_ca = client_ca
        sa_key = _new_key()
        _write(pki / "ca.crt", _cert_pem(ca.cert))
        _write(pki / "client-ca.crt", _cert_pem(client_ca.cert))
        _write(pki / "apiserver.crt", _cert_pem(serving.cert))
        _write(pki / "apiserver.key", _key_pem(serving.key), private=True)
        _write(pki / "admin.crt", _cert_pem(admin.cert))
        _write(pki / "admin.key", _key_pem(admin.key), private=True)
        _write(pki / "sa.key", _key_pem(sa_key), private=True)
        _write(
            pki / "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        _load_libc()
        log_file = log.open("wb")
        self._log_files.append(log_file)
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Own process group: a Ctrl-C in the CLI's terminal reaches only Python, which
            # then stops apiserver before etcd instead of both dying at once.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def _start_etcd(self) -> None:
        assert self.dir is not None and self._etcd_binary is not None
        client_port, peer_port, self.port = _free_ports(3)
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.dir
        _remove_orphaned_etcd_dirs(base)
        self._etcd_data = Path(tempfile.mkdtemp(prefix="ipvs-etcd-", dir=base))
        (self._etcd_data / _OWNER_FILE).write_text(str(os.getpid()))
        self.etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        args = [
            str(self._etcd_binary),
            "--name=testbed",
            f"--data-dir={self._etcd_data}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=testbed={peer_url}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if _etcd_supports(self._etcd_binary, "--unsafe-no-fsync"):
            args.append("--unsafe-no-fsync")
        self._etcd = self._spawn(args, self.dir / "etcd.log")

    def _start_apiserver(self) -> None:
        assert self.dir is not None and self._apiserver_binary is not None
        pki = self.dir / "pki"
        args = [
            str(self._apiserver_binary),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'client-ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            "--authorization-mode=RBAC",
            f"--service-account-issuer=https://127.0.0.1:{self.port}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            # A single loopback apiserver has nothing to publish in the `kubernetes`
            # Service's Endpoints (validation rejects loopback addresses there anyway).
            "--endpoint-reconciler-type=none",
            # --cert-dir is unused with explicit files, but keep its default off $PWD.
            f"--cert-dir={pki}",
            "--profiling=false",
            "--v=1",
            *self.extra_apiserver_args,
        ]
        # An extra --authorization-mode replaces the default (the flag is a list: repeating it
        # would name RBAC twice, which the server refuses).
        if any(a.startswith("--authorization-mode=") for a in self.extra_apiserver_args):
            args.remove("--authorization-mode=RBAC")
        self._apiserver = self._spawn(args, self.dir / "kube-apiserver.log")
        self._write_kubeconfig()

    def client_kubeconfig(
        self, path: Path, user: str, groups: Sequence[str] = (), server: str | None = None
    ) -> Path:
        """A kubeconfig for ``user`` (in ``groups``) with a client certificate of the bed's CA.

        For the control-plane components and the kubelet of the node bed (tests/node), which
        authenticate as system:kube-controller-manager, system:node:NAME and so on.
        ``server`` replaces the bed's URL (a client that reaches it through a forward).
        """
        assert self.dir is not None and self._client_ca is not None
        leaf = _make_leaf(self._client_ca, user, organizations=groups)
        credentials = {
            "client-certificate-data": base64.b64encode(_cert_pem(leaf.cert)).decode(),
            "client-key-data": base64.b64encode(_key_pem(leaf.key)).decode(),
        }
        ca = (self.dir / "pki" / "ca.crt").read_bytes()
        return write_kubeconfig(path, server or self.url, credentials, ca=ca, user=user)

    def _write_kubeconfig(self) -> None:
        assert self.dir is not None
        pki = self.dir / "pki"

        def b64(name: str) -> str:
            return base64.b64encode((pki / name).read_bytes()).decode()

        credentials = {
            "client-certificate-data": b64("admin.crt"),
            "client-key-data": b64("admin.key"),
        }
        write_kubeconfig(
            self.dir / "kubeconfig", f"https://127.0.0.1:{self.port}", credentials,
            ca=(pki / "ca.crt").read_bytes(), user="admin",
        )  # fmt: skip

    def _check_alive(self) -> None:
        for what, proc in (("etcd", self._etcd), ("kube-apiserver", self._apiserver)):
            if proc is not None and proc.poll() is not None:
                raise TestBedError(f"{what} exited with status {proc.returncode} during startup")

    def _wait_ready(self) -> None:
        assert self.dir is not None
        deadline = time.monotonic() + self.startup_timeout
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def etcd_healthy() -> bool | None:
            try:
                with no_proxy.open(f"{self.etcd_url}/health", timeout=2) as r:
                    return True if json.load(r).get("health") == "true" else None
            except (OSError, ValueError):
                return None

        _poll(
            "etcd /health",
            etcd_healthy,
            timeout=deadline - time.monotonic(),
            alive=self._check_alive,
        )

        pki = self.dir / "pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        last: list[str] = ["no answer yet"]

        def apiserver_ready() -> bool | None:
            try:
                with opener.open(f"https://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                    return True if r.status == 200 else None
            except urllib.error.HTTPError as e:
                # 500 lists the checks that still fail: keep it for the timeout message.
                last[0] = e.read().decode(errors="replace")
                return None
            except OSError as e:
                last[0] = str(e)
                return None

        try:
            _poll(
                "kube-apiserver /readyz",
                apiserver_ready,
                timeout=max(deadline - time.monotonic(), 0.0),
                alive=self._check_alive,
            )
        except TestBedError as e:
            raise TestBedError(f"{e}\nlast /readyz answer:\n{last[0]}") from None

    def _failure_report(self, reason: str) -> str:
        if self.dir is None:
            return reason
        parts = [f"API-server test bed failed to start: {reason}", f"(files kept in {self.dir})"]
        for name in ("etcd.log", "kube-apiserver.log"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- last lines of {path} ---\n{_tail(path)}")
        return "\n".join(parts)


# --------------------------------------------------------------------------------------
# CLI


def _default_crds() -> list[Path]:
    return sorted((REPO_ROOT / "crds").glob("*.yaml"))


def main(argv: Sequence[str] | None = None) -> int:
    """Start a bed, print how to reach it, and keep it up until Ctrl-C / SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.apiserver.cluster",
        description="Run the API-server test bed (kube-apiserver + etcd) until interrupted.",
    )
    parser.add_argument(
        "--crds",
        nargs="*",
        type=Path,
        default=None,
        help="CRD files to install (default: the repo's crds/*.yaml)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) on exit")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = LocalApiServer(keep_dir=args.keep or None)
    try:
        server.start()
    except TestBedError as e:
        print(e, file=sys.stderr)
        return 1
    try:
        crds = _default_crds() if args.crds is None else args.crds
        if crds:
            installed = server.install_crds(crds)
            print(f"installed CRDs: {', '.join(installed)}", file=sys.stderr)
        print(
            f"kube-apiserver {kubernetes_version()} ready in {server.startup_seconds:.1f}s "
            f"at {server.url}",
            file=sys.stderr,
        )
        print(f"logs: {server.apiserver_log} {server.etcd_log}", file=sys.stderr)
        print(f"export KUBECONFIG={server.kubeconfig}", file=sys.stderr)
        print(server.kubeconfig, flush=True)
        print("Ctrl-C to stop.", file=sys.stderr)
        stop.wait()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
