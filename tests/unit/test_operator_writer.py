"""The operator's writes: fenced by the Lease, conditional on what was read, remembered."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import kopf
import pytest
from aiohttp import web

from ipvs_operator import kube
from ipvs_operator.controller import Controller, Settings
from ipvs_operator.events import EventPoster
from ipvs_operator.leader import LeaderElector, LeaseSettings
from ipvs_operator.workqueue import VS
from ipvs_operator.writer import WRITE_FLOOR, NotLeading, Writer, status_patch

KEY = (VS, "shop", "web")
PATH = kube.vs_path("shop", "web", status=True)


class FakeKube:
    """Records each request with its timeout; answers with a new resourceVersion."""

    timeout = 30.0

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any, float | None]] = []
        self.version = 10
        self.conflict = False

    async def request(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None, **_: Any
    ) -> dict[str, Any]:
        self.calls.append((method, path, body, timeout))
        if self.conflict:
            raise kube.ApiError(409, "Conflict", "the object has been modified")
        self.version += 1
        return {"metadata": {"resourceVersion": str(self.version)}}


def writer(api: FakeKube, left: float) -> Writer:
    return Writer(api, EventPoster(api, "t"), lambda: left)  # type: ignore[arg-type]


def body(version: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": version},
        "status": status or {},
    }


def test_every_write_is_bounded_by_the_leadership_left() -> None:
    async def scenario() -> None:
        api = FakeKube()
        w = writer(api, 4.0)
        await w.patch_status(KEY, body("5"), PATH, {"status": {"a": 1}}, {"a": 1})
        await w.request("POST", kube.vs_path("shop"), {"kind": "VirtualServer"})
        await w.post(body("5"), "Normal", "Ready", "serving")
        assert [c[3] for c in api.calls] == [4.0, 4.0, 4.0]
        await writer(api, 1e9).request("DELETE", kube.vs_path("shop", "web"))
        assert api.calls[-1][3] == 30.0  # never longer than the client's own limit
        sent = len(api.calls)
        late = writer(api, WRITE_FLOOR - 0.01)
        for write in (
            late.patch_status(KEY, body("5"), PATH, {"status": {}}, {}),
            late.request("POST", kube.vs_path("shop"), {}),
            late.post(body("5"), "Normal", "Ready", "serving"),
        ):
            with pytest.raises(NotLeading):
                await write
        assert len(api.calls) == sent  # nothing was sent

    asyncio.run(scenario())


def test_status_patches_are_conditional_on_the_version_read() -> None:
    async def scenario() -> None:
        api = FakeKube()
        w = writer(api, 10)
        await w.patch_status(KEY, body("5"), PATH, {"status": {"a": 1}}, {"a": 1})
        assert api.calls[-1][2] == {"status": {"a": 1}, "metadata": {"resourceVersion": "5"}}
        # The index still shows version 5: our status, and the next patch builds on ours (11).
        assert w.current(KEY, body("5")) == {"a": 1}
        await w.patch_status(KEY, body("5"), PATH, {"status": {"a": 2}}, {"a": 2})
        assert api.calls[-1][2]["metadata"] == {"resourceVersion": "11"}
        assert w.current(KEY, body("11", {"a": 1})) == {"a": 2}  # the first write seen only
        # Once the index shows a version past them, it is the truth again.
        assert w.current(KEY, body("12", {"a": 2})) == {"a": 2}
        assert w.current(KEY, body("13", {"a": 3})) == {"a": 3}
        await w.patch_status(KEY, body("13", {"a": 3}), PATH, {"status": {"a": 4}}, {"a": 4})
        assert api.calls[-1][2]["metadata"] == {"resourceVersion": "13"}

    asyncio.run(scenario())


def test_a_conflict_raises_and_forgets_what_was_written() -> None:
    async def scenario() -> None:
        api = FakeKube()
        w = writer(api, 10)
        await w.patch_status(KEY, body("5"), PATH, {"status": {"a": 1}}, {"a": 1})
        api.conflict = True
        with pytest.raises(kube.ApiError) as info:
            await w.patch_status(KEY, body("5"), PATH, {"status": {"a": 2}}, {"a": 2})
        assert info.value.status == 409
        assert w.current(KEY, body("5", {"x": 0})) == {"x": 0}  # the retry starts from the index

    asyncio.run(scenario())


class SlowApiServer:
    """A stand-in for kube-apiserver that holds status patches for ``delay`` seconds.

    The real API server cannot be made to answer slowly on demand; everything else here is the
    operator's own code (its client, the elector, the writer). Like kube-apiserver, it drops a
    request whose client went away; one that outlives its client's patience would be applied.
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lease: dict[str, Any] | None = None
        self.patches: list[float] = []
        self.abandoned: list[float] = []
        self.applied: list[float] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def handle(self, request: web.Request) -> web.Response:
        if "/leases" in request.path:
            if request.method == "GET":
                if self.lease is None:
                    return web.json_response({"reason": "NotFound"}, status=404)
                return web.json_response(self.lease)
            self.lease = {**await request.json()}
            self.lease["metadata"]["resourceVersion"] = "1"
            return web.json_response(self.lease, status=201)
        self.patches.append(time.monotonic())
        until = time.monotonic() + self.delay
        while time.monotonic() < until:
            if request.transport is None or request.transport.is_closing():
                self.abandoned.append(time.monotonic())
                return web.json_response({}, status=499)
            await asyncio.sleep(0.01)
        self.applied.append(time.monotonic())
        return web.json_response({"metadata": {"resourceVersion": "2"}})


def test_a_leader_whose_lease_runs_out_mid_write_does_not_write_after_it() -> None:
    """The API server stalls a status patch past the leader's renew deadline.

    A fake server (:class:`SlowApiServer`) stands in for kube-apiserver only because the real
    one cannot be made to answer slowly on demand.
    """

    async def scenario() -> None:
        server = SlowApiServer(delay=5.0)
        await server.start()
        client = kube.Kube(lambda: kopf.ConnectionInfo(server=server.url))
        settings = LeaseSettings("ns", "ipvs-operator", "me", duration=3, renew_deadline=1.0)
        elector = LeaderElector(client, settings)
        try:
            assert await elector.try_acquire_or_renew()
            deadline = time.monotonic() + elector.time_left()
            w = Writer(client, EventPoster(client, "me"), elector.time_left)
            with pytest.raises(TimeoutError):
                await w.patch_status(KEY, body("5"), PATH, {"status": {"a": 1}}, {"a": 1})
            # The client gave up when leadership ran out, and the server dropped the write.
            assert time.monotonic() <= deadline + 0.2
            assert len(server.patches) == 1
            while not server.abandoned:
                assert time.monotonic() < deadline + 2, "the server never saw the client go"
                await asyncio.sleep(0.01)
            assert server.abandoned[0] <= deadline + 0.2
            # Not renewed since: no further write is even sent.
            with pytest.raises(NotLeading):
                await w.post(body("5"), "Normal", "Ready", "serving")
            with pytest.raises(NotLeading):
                await w.patch_status(KEY, body("5"), PATH, {"status": {"a": 1}}, {"a": 1})
            assert len(server.patches) == 1 and server.applied == []
        finally:
            await client.close()
            await server.runner.cleanup()

    asyncio.run(scenario())


class OneVirtualServer:
    """Views with one VirtualServer and nothing else (no pools, agents or Services)."""

    def __init__(self) -> None:
        self.body = {
            "apiVersion": "ipvs.io/v1alpha1",
            "kind": "VirtualServer",
            "metadata": {
                "name": "web",
                "namespace": "shop",
                "uid": "u1",
                "generation": 1,
                "resourceVersion": "5",
            },
            "spec": {"ports": [{"port": 80}], "backends": {"static": [{"address": "192.0.2.1"}]}},
        }

    def virtual_server(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.body

    def virtual_servers(self) -> list[dict[str, Any]]:
        return [self.body]

    def virtual_server_keys(self) -> list[tuple[str, str]]:
        return [("shop", "web")]

    def pools(self) -> list[dict[str, Any]]:
        return []

    def namespace_labels(self, name: str) -> dict[str, str]:
        return {}

    def reports(self, namespace: str, name: str) -> dict[str, Any]:
        return {}

    def agents(self) -> list[str]:
        return []

    def endpoints(self, namespace: str, service: str) -> list[Any]:
        return []

    def node_labels(self, name: str) -> dict[str, str] | None:
        return None


def test_a_key_refused_for_want_of_lease_time_is_reconciled_after_a_renewal() -> None:
    """A slow renewal must not lose work: the key comes back once the Lease is renewed."""

    async def scenario() -> None:
        api, left, asked = FakeKube(), [0.1], [0]

        def time_left() -> float:
            asked[0] += 1
            return left[0]

        controller = Controller(
            Settings(workers=1),
            OneVirtualServer(),  # type: ignore[arg-type]
            api,  # type: ignore[arg-type]
            EventPoster(api, "t"),  # type: ignore[arg-type]
            time_left,
        )
        controller.start()
        try:
            controller.queue.add(KEY)
            deadline = time.monotonic() + 5
            while not asked[0]:  # the write was refused for want of Lease time
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert api.calls == []
            left[0] = 10.0  # renewed
            while not any(c[0] == "PATCH" for c in api.calls):
                assert time.monotonic() < deadline, "the key was dropped"
                await asyncio.sleep(0.01)
        finally:
            await controller.stop()

    asyncio.run(scenario())


def test_a_status_patch_removes_fields_at_every_depth_and_replaces_lists() -> None:
    """A merge patch merges objects key by key: a field gone from an object that stays
    (``realServers.unhealthy`` once every real server is back) must be nulled inside it."""
    old = {
        "address": "192.0.2.1",
        "announcement": {"mode": "Layer2", "nodes": ["a"]},
        "realServers": {"ready": 1, "total": 2, "down": 1, "unhealthy": [{"address": "x"}]},
        "conditions": [{"type": "Ready"}, {"type": "Programmed"}],
    }
    new = {
        "address": "192.0.2.1",
        "realServers": {"ready": 2, "total": 2},
        "conditions": [{"type": "Ready"}],
    }
    assert status_patch(old, new) == {
        "status": {
            "announcement": None,
            "address": "192.0.2.1",
            "realServers": {"down": None, "unhealthy": None, "ready": 2, "total": 2},
            "conditions": [{"type": "Ready"}],
        }
    }
