"""Prometheus metrics: kernel counters per virtual service and real server, and the agent's own.

Kernel counters are exported from the table the last reconcile read (64-bit STATS64), with
the Kubernetes names of each service, by a custom collector — no per-scrape netlink dump.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ipvs_agent.model import ObservedService, ObservedTable, ServiceKey

SERVICE_LABELS = ["namespace", "virtualserver", "protocol", "address", "port", "fwmark"]
DEST_LABELS = [*SERVICE_LABELS, "real_server"]


def _service_labels(key: ServiceKey, owner: str) -> list[str]:
    namespace, _, name = owner.partition("/")
    proto = {6: "TCP", 17: "UDP", 132: "SCTP"}.get(key.protocol, "")
    return [
        namespace,
        name,
        proto,
        key.address if not key.fwmark else "",
        str(key.port),
        str(key.fwmark) if key.fwmark else "",
    ]


_SERVICE_COUNTERS = (
    ("connections", "Connections scheduled by the virtual service."),
    ("packets_in", "Packets received by the virtual service."),
    ("packets_out", "Packets sent by the virtual service (NAT only)."),
    ("bytes_in", "Bytes received by the virtual service."),
    ("bytes_out", "Bytes sent by the virtual service (NAT only)."),
)
_DEST_COUNTERS = (
    ("connections", "Connections sent to the real server."),
    ("packets_in", "Packets forwarded to the real server."),
    ("packets_out", "Packets from the real server (NAT only)."),
    ("bytes_in", "Bytes forwarded to the real server."),
    ("bytes_out", "Bytes from the real server (NAT only)."),
)
_DEST_GAUGES = (
    ("active_connections", "Established connections."),
    ("inactive_connections", "Other connections (and all UDP)."),
    ("weight", "Scheduling weight (0 = draining)."),
)
#: Every family of the table as the text format names it: (name, type, help).
TABLE_FAMILIES: tuple[tuple[str, str, str], ...] = (
    *((f"ipvs_virtual_service_{n}_total", "counter", doc) for n, doc in _SERVICE_COUNTERS),
    *((f"ipvs_real_server_{n}_total", "counter", doc) for n, doc in _DEST_COUNTERS),
    *((f"ipvs_real_server_{n}", "gauge", doc) for n, doc in _DEST_GAUGES),
)


def _number(value: float) -> str:
    """A sample value as prometheus_client writes it (Go's float format)."""
    return str(floatToGoString(value))  # type: ignore[no-untyped-call]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _service_lines(key: ServiceKey, owner: str, observed: ObservedService) -> tuple[str, ...]:
    """One service's lines of each family in TABLE_FAMILIES (labels sorted, as
    prometheus_client writes them)."""
    namespace, name, proto, address, port, fwmark = map(_escape, _service_labels(key, owner))
    head = f'{{address="{address}",fwmark="{fwmark}",namespace="{namespace}",port="{port}",'
    head += f'protocol="{proto}"'
    service = f'{head},virtualserver="{name}"}} '
    s = observed.stats
    out = [
        f"ipvs_virtual_service_{n}_total{service}{_number(v)}\n"
        for n, v in zip(
            ("connections", "packets_in", "packets_out", "bytes_in", "bytes_out"),
            (s.connections, s.packets_in, s.packets_out, s.bytes_in, s.bytes_out),
            strict=True,
        )
    ]
    per_dest: list[list[str]] = [[] for _ in range(len(_DEST_COUNTERS) + len(_DEST_GAUGES))]
    for dkey, od in observed.dests.items():
        labels = f'{head},real_server="{_escape(str(dkey))}",virtualserver="{name}"}} '
        d = od.stats
        values = (
            d.connections,
            d.packets_in,
            d.packets_out,
            d.bytes_in,
            d.bytes_out,
            d.active_connections,
            d.inactive_connections,
            od.dest.weight,
        )
        for i, ((n, _), value) in enumerate(
            zip((*_DEST_COUNTERS, *_DEST_GAUGES), values, strict=True)
        ):
            suffix = "_total" if i < len(_DEST_COUNTERS) else ""
            per_dest[i].append(f"ipvs_real_server_{n}{suffix}{labels}{_number(value)}\n")
    return (*out, *("".join(lines) for lines in per_dest))


class TableCollector(Collector):
    """Exports the owned part of the last observed table.

    At 2000 services x 10 real servers that is about 180 000 samples, which prometheus_client
    took 4.7 s to write on a server core (holding the GIL the reconcile loop needs), on every
    scrape. So the agent serves :meth:`render` instead: the text of each service is kept
    while the dump hands back the same object for it (an unchanged service, see
    kernel.ipvs), and the whole text while the table is the same. :meth:`collect` stays for
    registries and tests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table: ObservedTable = {}
        self._owners: Mapping[ServiceKey, str] = {}
        self._render_lock = threading.Lock()  # a scrape never holds up update()
        self._services: dict[ServiceKey, tuple[ObservedService, str, tuple[str, ...]]] = {}
        self._rendered: tuple[ObservedTable, Mapping[ServiceKey, str], bytes] | None = None

    def update(self, table: ObservedTable, owners: Mapping[ServiceKey, str]) -> None:
        with self._lock:
            self._table, self._owners = table, owners

    def render(self) -> bytes:
        """The text exposition of :meth:`collect`'s families, byte for byte."""
        with self._lock:
            table, owners = self._table, self._owners
        with self._render_lock:
            done = self._rendered
            if done is not None and done[0] is table and done[1] is owners:
                return done[2]
            chunks: list[list[str]] = [[] for _ in TABLE_FAMILIES]
            kept: dict[ServiceKey, tuple[ObservedService, str, tuple[str, ...]]] = {}
            for key, observed in table.items():
                owner = owners.get(key)
                if owner is None:
                    continue  # not ours: other programs' services are not our business
                hit = self._services.get(key)
                if hit is not None and hit[0] is observed and hit[1] == owner:
                    lines = hit[2]
                else:
                    lines = _service_lines(key, owner, observed)
                kept[key] = (observed, owner, lines)
                for chunk, text in zip(chunks, lines, strict=True):
                    chunk.append(text)
            out: list[str] = []
            for (name, kind, doc), chunk in zip(TABLE_FAMILIES, chunks, strict=True):
                out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
                out += chunk
            body = "".join(out).encode()
            self._services, self._rendered = kept, (table, owners, body)
            return body

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self._lock:
            table, owners = self._table, self._owners
        svc = {
            name: CounterMetricFamily(f"ipvs_virtual_service_{name}", doc, labels=SERVICE_LABELS)
            for name, doc in _SERVICE_COUNTERS
        }
        rs = {
            name: CounterMetricFamily(f"ipvs_real_server_{name}", doc, labels=DEST_LABELS)
            for name, doc in _DEST_COUNTERS
        }
        gauges = {
            name: GaugeMetricFamily(f"ipvs_real_server_{name}", doc, labels=DEST_LABELS)
            for name, doc in _DEST_GAUGES
        }
        for key, observed in table.items():
            owner = owners.get(key)
            if owner is None:
                continue  # not ours: other programs' services are not our business
            labels = _service_labels(key, owner)
            s = observed.stats
            for name, value in (
                ("connections", s.connections),
                ("packets_in", s.packets_in),
                ("packets_out", s.packets_out),
                ("bytes_in", s.bytes_in),
                ("bytes_out", s.bytes_out),
            ):
                svc[name].add_metric(labels, value)
            for dkey, od in observed.dests.items():
                dl = [*labels, str(dkey)]
                ds = od.stats
                for name, value in (
                    ("connections", ds.connections),
                    ("packets_in", ds.packets_in),
                    ("packets_out", ds.packets_out),
                    ("bytes_in", ds.bytes_in),
                    ("bytes_out", ds.bytes_out),
                ):
                    rs[name].add_metric(dl, value)
                gauges["active_connections"].add_metric(dl, ds.active_connections)
                gauges["inactive_connections"].add_metric(dl, ds.inactive_connections)
                gauges["weight"].add_metric(dl, od.dest.weight)
        yield from svc.values()
        yield from rs.values()
        yield from gauges.values()


class SpeakerCollector(Collector):
    """Layer-2 announcement counters, read from the speaker and its responder at scrape time."""

    def __init__(self, speaker: Any) -> None:
        self.speaker = speaker

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        responder = self.speaker.responder
        for name, doc, value in (
            (
                "ipvs_agent_l2_elections",
                "Elections that changed which addresses this node answers for.",
                self.speaker.elections,
            ),
            (
                "ipvs_agent_l2_replies",
                "ARP replies and neighbour advertisements sent in answer.",
                getattr(responder, "replies", 0),
            ),
            (
                "ipvs_agent_l2_announcements",
                "Gratuitous ARPs and unsolicited neighbour advertisements sent.",
                getattr(responder, "announcements", 0),
            ),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        members = GaugeMetricFamily(
            "ipvs_agent_l2_members", "Agents with a fresh Lease, as this node sees them."
        )
        members.add_metric([], len(self.speaker.members))
        yield members
        claims = CounterMetricFamily(
            "ipvs_agent_l2_claims",
            "Frames of other hosts claiming an address this node answers for (a takeover "
            "seen, or an address conflict on the LAN).",
        )
        claims.add_metric([], sum(getattr(responder, "claims", dict)().values()))
        yield claims
        blind = GaugeMetricFamily(
            "ipvs_agent_l2_blind",
            "1 while this node cannot see its own Lease renewed (it keeps its addresses).",
        )
        blind.add_metric([], 1.0 if self.speaker.blind else 0.0)
        yield blind


class BGPCollector(Collector):
    """BGP speaker state and counters, read from the speaker at scrape time."""

    def __init__(self, speaker: Any) -> None:
        self.speaker = speaker

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "ipvs_agent_bgp_session_up",
            "1 while the BGP session with the peer is established.",
            labels=["peer"],
        )
        for peer, state in sorted(self.speaker.session_states().items()):
            up.add_metric([peer], 1.0 if str(state) == "Established" else 0.0)
        yield up
        prefixes = GaugeMetricFamily(
            "ipvs_agent_bgp_announced_prefixes",
            "Virtual addresses this node announces over BGP (to at least one peer).",
        )
        prefixes.add_metric([], len(self.speaker.status()["announced"]))
        yield prefixes
        counters = self.speaker.counters
        updates = CounterMetricFamily(
            "ipvs_agent_bgp_updates",
            "Routes announced and withdrawn (per peer, as ExaBGP acknowledged them).",
            labels=["kind"],
        )
        updates.add_metric(["announce"], counters.announcements)
        updates.add_metric(["withdraw"], counters.withdrawals)
        yield updates
        for name, doc, value in (
            (
                "ipvs_agent_bgp_session_changes",
                "Changes of BGP session state (connected, established, down).",
                counters.session_changes,
            ),
            (
                "ipvs_agent_bgp_errors",
                "Route commands ExaBGP refused.",
                counters.errors,
            ),
            (
                "ipvs_agent_bgp_speaker_starts",
                "Times ExaBGP was started (once, then on every change of sessions or exit).",
                counters.restarts,
            ),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


class MirrorCollector(Collector):
    """What the agent's watches saw and let pass: events of objects no pass here uses."""

    def __init__(self, mirrors: Any) -> None:
        self.mirrors = mirrors

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "ipvs_agent_unused_events",
            "Watch events kept without waking a pass: EndpointSlices of Services that no "
            "VirtualServer on this node uses.",
            labels=["resource"],
        )
        for m in self.mirrors:
            if getattr(m, "interest", None) is not None:
                family.add_metric([m.name], getattr(m, "unused_events", 0))
        yield family


class AgentMetrics:
    """The agent's own metrics, in a registry of their own (no process-global state); the
    kernel table's families apart, in :attr:`table` (see :meth:`exposition`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.table = TableCollector()
        self.reconcile_seconds = Histogram(
            "ipvs_agent_reconcile_duration_seconds",
            "Time of one reconcile pass.",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.change_seconds = Histogram(
            "ipvs_agent_change_to_kernel_seconds",
            "From the watch event of a change (the first, for a burst) to the end of the pass "
            "that wrote it to the kernel, by the kind of that pass.",
            ["kind"],
            registry=self.registry,
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
        )
        self.passes = Counter(
            "ipvs_agent_passes",
            "Reconcile passes by kind: full (every object, the whole kernel table) or change "
            "(only the real servers of Services whose endpoints changed).",
            ["kind"],
            registry=self.registry,
        )
        self.audits = Counter(
            "ipvs_agent_audits",
            "Drift audits (the whole kernel table and the host's tables read beside the loop) "
            "by how they ended: clean, drift (a full pass repairs it), overtaken (a full pass "
            "ran meanwhile) or failed (the reading failed; a full pass runs).",
            ["result"],
            registry=self.registry,
        )
        self.audit_seconds = Gauge(
            "ipvs_agent_audit_seconds",
            "Time the last drift audit took (reading and judging).",
            registry=self.registry,
        )
        self.netlink_errors = Counter(
            "ipvs_agent_netlink_errors", "Kernel operations that failed.", registry=self.registry
        )
        self.operations = Counter(
            "ipvs_agent_kernel_operations",
            "Kernel operations applied.",
            ["kind"],
            registry=self.registry,
        )
        self.drift_repairs = Counter(
            "ipvs_agent_drift_repairs",
            "Operations applied by a periodic resync with no cluster change (drift repaired).",
            registry=self.registry,
        )
        self.host_repairs = Counter(
            "ipvs_agent_host_repairs",
            "Host state someone else changed or removed that the agent put back: its nftables "
            "tables (a flushed ruleset) or its virtual addresses.",
            ["what"],
            registry=self.registry,
        )
        self.l2_announced = Gauge(
            "ipvs_agent_l2_announced_addresses",
            "Virtual addresses this node answers for on layer 2 (ARP, neighbour discovery).",
            registry=self.registry,
        )
        self.programmed = Gauge(
            "ipvs_agent_virtual_servers",
            "VirtualServers on this node by state.",
            ["state"],
            registry=self.registry,
        )

    def watch_mirrors(self, mirrors: Any) -> None:
        """Export the mirrors' skipped events too."""
        self.registry.register(MirrorCollector(mirrors))

    def watch_speaker(self, speaker: Any) -> None:
        """Export the layer-2 speaker's counters too."""
        self.registry.register(SpeakerCollector(speaker))

    def watch_bgp(self, speaker: Any) -> None:
        """Export the BGP speaker's sessions and counters too."""
        self.registry.register(BGPCollector(speaker))

    def exposition(self) -> bytes:
        """The /metrics page: the registry's families, then the kernel table's."""
        return generate_latest(self.registry) + self.table.render()
