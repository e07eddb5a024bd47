"""A small asynchronous Kubernetes REST client for the operator's own writes.

kopf watches; this client writes (statuses, VirtualServers, Events, the Lease). It runs on
kopf's event loop with aiohttp, which kopf already brings, and takes its credentials from the
same login kopf uses (:func:`kopf.login_via_client`: in-cluster service account, else
kubeconfig), so there is one notion of "who the operator is". A 401 triggers one fresh login,
which picks up a rotated service-account token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

import aiohttp
import kopf

from ipvs_api import constants

log = logging.getLogger(__name__)

MERGE_PATCH: Final = "application/merge-patch+json"
JSON: Final = "application/json"


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


Login = Callable[[], kopf.ConnectionInfo]


def vs_path(namespace: str, name: str | None = None, *, status: bool = False) -> str:
    base = f"/apis/{constants.GROUP}/{constants.VERSION}/namespaces/{namespace}/virtualservers"
    path = base if name is None else f"{base}/{name}"
    return f"{path}/status" if status else path


def pool_status_path(name: str) -> str:
    return f"/apis/{constants.GROUP}/{constants.VERSION}/addresspools/{name}/status"


def service_status_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/services/{name}/status"


def events_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/events"


def lease_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return base if name is None else f"{base}/{name}"


class Kube:
    """JSON over HTTPS to one API server, with at most ``limit`` requests in flight."""

    def __init__(self, login: Login, *, limit: int = 16, timeout: float = 30.0) -> None:
        self._login = login
        self._limit = limit
        #: The longest any request may take (seconds).
        self.timeout = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        #: The namespace the credentials came with (in-cluster: the pod's).
        self.default_namespace: str | None = None

    def _connect(self) -> aiohttp.ClientSession:
        info = self._login()
        self._server = info.server.rstrip("/")
        self.default_namespace = info.default_namespace
        context: ssl.SSLContext = info.as_ssl_context()
        headers = {**info.as_http_headers(), "User-Agent": f"{constants.MANAGED_BY}"}
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit, ssl=context),
            headers=headers,
            timeout=self._timeout,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = JSON,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send one request and return the decoded answer; raises :class:`ApiError`.

        ``timeout`` (seconds) bounds the whole request, retry after a fresh login included;
        :class:`TimeoutError` when it runs out.
        """
        async with asyncio.timeout(timeout):
            return await self._request(method, path, body, content_type, params)

    async def _request(
        self,
        method: str,
        path: str,
        body: Any,
        content_type: str,
        params: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        for attempt in (1, 2):
            if self._session is None:
                self._session = self._connect()
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type, "Accept": JSON}
            async with self._session.request(
                method, self._server + path, data=data, headers=headers, params=params
            ) as response:
                text = await response.text()
                if response.status == 401 and attempt == 1:
                    log.info("credentials rejected; logging in again")
                    await self.close()
                    continue
                if response.status >= 300:
                    raise _error(response.status, text)
                return json.loads(text) if text else {}
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> AsyncIterator[dict[str, Any]]:
        """The JSON lines of a watch at ``path``; ends when the server ends it. A read that
        waits longer than ``read_timeout`` raises (a silent connection)."""
        if self._session is None:
            self._session = self._connect()
        timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout)
        async with self._session.get(
            self._server + path, params=params, headers={"Accept": JSON}, timeout=timeout
        ) as response:
            if response.status >= 300:
                raise _error(response.status, await response.text())
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at ``path``, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise


def _error(status: int, text: str) -> ApiError:
    try:
        doc = json.loads(text)
    except ValueError:
        return ApiError(status, "", text[:500])
    if not isinstance(doc, dict):
        return ApiError(status, "", text[:500])
    return ApiError(status, str(doc.get("reason") or ""), str(doc.get("message") or text[:500]))


def login() -> kopf.ConnectionInfo:
    """Credentials as kopf finds them: in-cluster service account, else the kubeconfig."""
    info = kopf.login_via_client(logger=log, settings=kopf.OperatorSettings())
    if info is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig")
    return info
