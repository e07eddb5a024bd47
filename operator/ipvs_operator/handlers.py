"""kopf registrations, kept thin: indexes keep the state, event handlers mark keys dirty.

Every handler is ``async`` (kopf would run sync ones in a thread pool) and does no more than
hand the object to :class:`ipvs_operator.controller.Controller`. With only index and event
handlers kopf writes nothing to the watched objects — no finalizers, no progress annotations —
so the operator never touches a user's VirtualServer or Service spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import kopf

from ipvs_api import constants
from ipvs_operator import kube, views
from ipvs_operator.controller import Controller, Settings
from ipvs_operator.events import EventPoster

VIRTUAL_SERVERS = (constants.GROUP, constants.VERSION, constants.VIRTUAL_SERVERS)
ADDRESS_POOLS = (constants.GROUP, constants.VERSION, constants.ADDRESS_POOLS)
BGP_PEERS = (constants.GROUP, constants.VERSION, constants.BGP_PEERS)
IPVS_NODES = (constants.GROUP, constants.VERSION, constants.IPVS_NODES)
IPVS_NODE_REPORTS = (constants.GROUP, constants.VERSION, constants.IPVS_NODE_REPORTS)
SERVICES = ("v1", "services")
NAMESPACES = ("v1", "namespaces")
NODES = ("v1", "nodes")
ENDPOINT_SLICES = ("discovery.k8s.io", "v1", "endpointslices")


class App:
    """What the handlers share: the controller, built once kopf's indexes exist."""

    def __init__(
        self,
        settings: Settings,
        client: kube.Kube,
        poster: EventPoster,
        time_left: Callable[[], float],
        stopped: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self._stopped = stopped
        self.kube = client
        self.poster = poster
        #: Seconds this replica may still act as the leader (bounds every write).
        self.time_left = time_left
        self._controller: Controller | None = None

    @property
    def controller(self) -> Controller:
        assert self._controller is not None, "started by the startup handler"
        return self._controller

    def start(self, indices: Mapping[str, Any]) -> None:
        self._controller = Controller(
            self.settings, views.IndexViews(indices), self.kube, self.poster, self.time_left
        )
        self._controller.start()

    async def stop(self) -> None:
        if self._controller is not None:
            await self._controller.stop()
        # kopf waits for every task it did not start to end; one waits for the stop flag.
        self._stopped()


def _indexes(
    read_report: views.ReportReader,
) -> list[tuple[tuple[str, ...], str, Callable[[Mapping[str, Any]], Any]]]:
    """Each resource's one index and its entry function; the report objects' entries are
    read by ``read_report``, which the event handlers share, so each is parsed once."""
    return [
        (VIRTUAL_SERVERS, views.VIRTUAL_SERVERS, views.virtual_server_entries),
        (SERVICES, views.SERVICES, views.service_entry),
        (ADDRESS_POOLS, views.POOLS, views.pool_entry),
        (NAMESPACES, views.NAMESPACES, views.namespace_entry),
        (ENDPOINT_SLICES, views.SLICES, views.slice_entry),
        (IPVS_NODES, views.NODE_REPORTS, partial(views.ipvs_node_entries, read=read_report)),
        (
            IPVS_NODE_REPORTS,
            views.REPORT_SLICES,
            partial(views.report_slice_entries, read=read_report),
        ),
        (NODES, views.NODES, views.node_entry),
        (BGP_PEERS, views.PEERS, views.peer_entry),
    ]


def _deleted(event: Mapping[str, Any]) -> bool:
    return event.get("type") == "DELETED"


def make_registry(app: App, read_report: views.ReportReader | None = None) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator (no module-level global state); its
    report objects are read by ``read_report`` (a new one by default)."""
    registry = kopf.OperatorRegistry()
    if read_report is None:  # (not `or`: an empty reader is falsy)
        read_report = views.ReportReader()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kube.login()

    @kopf.on.startup(registry=registry)
    async def startup(**kwargs: Any) -> None:
        app.start({name: kwargs[name] for name in views.ALL})

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await app.stop()

    for resource, index_id, entry in _indexes(read_report):
        _register_index(registry, resource, index_id, entry)

    @kopf.on.event(*VIRTUAL_SERVERS, registry=registry)
    async def virtual_server(
        namespace: str | None, name: str, labels: Mapping[str, str], **_: Any
    ) -> None:
        app.controller.virtual_server_changed(namespace or "", name, labels)

    @kopf.on.event(*SERVICES, registry=registry)
    async def service(namespace: str | None, name: str, **_: Any) -> None:
        app.controller.service_changed(namespace or "", name)

    @kopf.on.event(*ADDRESS_POOLS, registry=registry)
    async def address_pool(
        name: str, meta: Mapping[str, Any], event: Mapping[str, Any], **_: Any
    ) -> None:
        generation = None if _deleted(event) else int(meta.get("generation") or 0)
        app.controller.pool_changed(name, generation)

    @kopf.on.event(*NAMESPACES, registry=registry)
    async def namespace(name: str, labels: Mapping[str, str], **_: Any) -> None:
        app.controller.namespace_changed(name, labels)

    @kopf.on.event(*ENDPOINT_SLICES, registry=registry)
    async def endpoint_slice(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        service_name = labels.get("kubernetes.io/service-name")
        if service_name:
            app.controller.slices_changed(namespace or "", service_name)

    @kopf.on.event(*IPVS_NODES, registry=registry)
    async def ipvs_node(
        name: str, body: Mapping[str, Any], event: Mapping[str, Any], **_: Any
    ) -> None:
        listed = {} if _deleted(event) else read_report.take(body)  # a deletion lists nothing
        app.controller.report_changed(name, name, listed, gone=_deleted(event))
        await app.controller.sessions_changed(
            name,
            (body.get("status") or {}).get("bgp"),
            listing=event.get("type") is None,  # kopf's initial listing
            gone=_deleted(event),
        )

    @kopf.on.event(*IPVS_NODE_REPORTS, registry=registry)
    async def ipvs_node_report(
        name: str, body: Mapping[str, Any], event: Mapping[str, Any], **_: Any
    ) -> None:
        listed = {} if _deleted(event) else read_report.take(body)  # a deletion lists nothing
        app.controller.report_changed(
            views.report_node(body), name, listed, gone=_deleted(event), part=True
        )

    @kopf.on.event(*NODES, registry=registry)
    async def node(
        name: str, labels: Mapping[str, str], event: Mapping[str, Any], **_: Any
    ) -> None:
        app.controller.node_changed(name, None if _deleted(event) else labels)

    return registry


def _register_index(
    registry: kopf.OperatorRegistry,
    resource: tuple[str, ...],
    index_id: str,
    entry: Callable[[Mapping[str, Any]], Any],
) -> None:
    @kopf.index(*resource, id=index_id, registry=registry)
    async def index(body: Mapping[str, Any], **_: Any) -> Any:
        return entry(body)
