"""Prometheus metrics: the core's `Observer` calls as series, plus HTTP request latency.

Each `PrometheusObserver` has its own registry (not the process-global one), so several servers
in one process (tests, an app embedding two cores) never collide. Label values are bounded sets
(transport, replica type name, message type, route template, status): no library, user or
replica id ever becomes a label, both for cardinality and because ids are user data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder
from quart import Quart, Response, g, request

from ..engine.budget import MemoryBudget
from ..storage.shard import sqlite_memory_bytes
from ..sync.protocol import ReplicaType
from .cluster.node import ClusterNode
from .version import package_version

access_log = logging.getLogger("verdant_trio.access")

REQUEST_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
REBASE_BUCKETS_S: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def replica_type_name(value: int) -> str:
    try:
        return ReplicaType(value).name.lower()
    except ValueError:
        return str(value)


class TypeCounts:
    """A counter by message type, kept as plain ints and exposed as a labelled counter.

    It is bumped for every frame in and every delivery out, always on the event loop; a
    prometheus-client child takes a lock and validates on every `inc` (measurable per
    heartbeat on an idle server). A scrape reads a copy of the dict, which is atomic.
    """

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.counts: dict[str, int] = {}
        registry.register(self)

    def add(self, kind: str, amount: int) -> None:
        counts = self.counts
        counts[kind] = counts.get(kind, 0) + amount

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=["type"])

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["type"])
        for kind, value in sorted(dict(self.counts).items()):
            family.add_metric([kind], value)
        yield family


class PrometheusObserver:
    """Implements `observe.Observer`; `render()` gives the exposition text."""

    def track_cluster(self, node: ClusterNode) -> None:
        """A cluster node's identity and the slots it serves (no library id in any label)."""
        r = self.registry
        Gauge(
            "verdant_cluster_node_info", "This node's name in the cluster's placement table",
            ["node"], registry=r,
        ).labels(node.node_id).set(1)
        Gauge(
            "verdant_cluster_slots_owned",
            "Slots this node serves now (the table's, less those fenced for a move)",
            registry=r,
        ).set_function(lambda: node.slots_owned)
        Gauge(
            "verdant_cluster_placement_version", "Version of the placement table in force",
            registry=r,
        ).set_function(lambda: node.placement.version)
        Gauge(
            "verdant_cluster_libraries_released",
            "Libraries released (closed here) since start because their slot left this node",
            registry=r,
        ).set_function(lambda: node.libraries_released)

    def track_memory_budget(self, budget: MemoryBudget) -> None:
        """The large-message budget's gauges read the running core's budget."""
        self.message_memory_reserved.set_function(lambda: budget.used_bytes)
        self.message_memory_waiting.set_function(lambda: budget.waiting)

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            Gauge(
                "verdant_sqlite_memory_bytes",
                "Memory SQLite holds in this process (page caches of open libraries, "
                "statements): the part of the RSS that is cached data",
                registry=r,
            ).set_function(sqlite_memory_bytes)
        Gauge("verdant_build_info", "verdant-trio version", ["version"], registry=r).labels(
            package_version()
        ).set(1)
        self.connections_open = Gauge(
            "verdant_connections_open",
            "Open sync connections",
            ["transport", "replica_type"],
            registry=r,
        )
        self.connections_total = Counter(
            "verdant_connections",
            "Sync connections opened",
            ["transport", "replica_type"],
            registry=r,
        )
        self.message_memory_reserved = Gauge(
            "verdant_message_memory_reserved_bytes",
            "Memory reserved by large inbound messages being received or handled "
            "([limits] message_memory_bytes is the most)",
            registry=r,
        )
        self.message_memory_waiting = Gauge(
            "verdant_message_memory_waiting",
            "Connections whose large message waits for memory",
            registry=r,
        )
        self.libraries_active = Gauge(
            "verdant_libraries_active",
            "Libraries with an open shard and a running task",
            registry=r,
        )
        self.messages_in = TypeCounts(
            "verdant_messages_received",
            "Client messages received, by type (invalid: refused before parsing completed)",
            registry=r,
        )
        self.messages_out = TypeCounts(
            "verdant_messages_sent",
            "Server messages handed to peers, by type (one per recipient)",
            registry=r,
        )
        self.stored_operations = Counter(
            "verdant_operations_stored", "Operations committed to storage", registry=r
        )
        self.recovered_operations = Counter(
            "verdant_operations_recovered",
            "Operations a library restored from a replica lacked, brought back by replicas "
            "re-sending their history (also counted as stored)",
            registry=r,
        )
        self.resynced_replicas = Counter(
            "verdant_replicas_resynced",
            "Replicas that re-sent their history to a library restored from a replica",
            registry=r,
        )
        self.rebases = Counter(
            "verdant_rebases", "Compaction passes that folded operations into baselines", registry=r
        )
        self.rebased_operations = Counter(
            "verdant_rebased_operations", "Operations folded into baselines", registry=r
        )
        self.rebase_duration = Histogram(
            "verdant_rebase_duration_seconds",
            "Duration of compaction passes that folded operations",
            buckets=REBASE_BUCKETS_S,
            registry=r,
        )
        self.slow_consumers = Counter(
            "verdant_slow_consumer_disconnects",
            "Connections closed because their outbound queue was full",
            registry=r,
        )
        self.upload_bytes = Counter(
            "verdant_upload_bytes", "Bytes of uploaded files stored", registry=r
        )
        self.uploads = Counter("verdant_uploads", "Uploaded files stored", registry=r)
        self.refusals = Counter(
            "verdant_cluster_refusals",
            "Requests for a library this node does not own, refused with 503 (cluster mode)",
            ["transport"],
            registry=r,
        )
        self.request_duration = Histogram(
            "verdant_http_request_duration_seconds",
            "HTTP requests handled by the Quart app, until the response starts",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS_S,
            registry=r,
        )

    # -- observe.Observer -------------------------------------------------------------------

    def connection_opened(self, transport: str, replica_type: int) -> None:
        labels = (transport, replica_type_name(replica_type))
        self.connections_open.labels(*labels).inc()
        self.connections_total.labels(*labels).inc()

    def connection_closed(self, transport: str, replica_type: int) -> None:
        self.connections_open.labels(transport, replica_type_name(replica_type)).dec()

    def message_in(self, kind: str) -> None:
        self.messages_in.add(kind, 1)

    def message_out(self, kind: str, recipients: int) -> None:
        if recipients:
            self.messages_out.add(kind, recipients)

    def operations_stored(self, count: int) -> None:
        self.stored_operations.inc(count)

    def operations_recovered(self, count: int) -> None:
        self.recovered_operations.inc(count)

    def replicas_resynced(self, count: int) -> None:
        self.resynced_replicas.inc(count)

    def rebase(self, duration_s: float, operations: int) -> None:
        self.rebases.inc()
        self.rebased_operations.inc(operations)
        self.rebase_duration.observe(duration_s)

    def slow_consumer(self) -> None:
        self.slow_consumers.inc()

    def library_opened(self) -> None:
        self.libraries_active.inc()

    def library_closed(self) -> None:
        self.libraries_active.dec()

    def upload(self, size_bytes: int) -> None:
        self.uploads.inc()
        self.upload_bytes.inc(size_bytes)

    def refused(self, transport: str) -> None:
        self.refusals.labels(transport).inc()

    # -- HTTP -------------------------------------------------------------------------------

    def request_done(self, method: str, route: str, status: int, duration_s: float) -> None:
        self.request_duration.labels(method, route, str(status)).observe(duration_s)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for (text 0.0.4 or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class RequestHooks:
    """Quart before/after-request hooks: latency histogram and the optional access log.

    Latency runs until Quart hands the response over (a streamed file keeps streaming after).
    The sync websocket and streamed uploads are served below Quart and counted by the core.
    """

    def __init__(self, observer: PrometheusObserver | None, *, access_log: bool = False) -> None:
        self.observer = observer
        self.access_log = access_log

    def install(self, app: Quart) -> None:
        app.before_request(self._before)
        app.after_request(self._after)

    async def _before(self) -> None:
        g.verdant_request_started = time.perf_counter()

    async def _after(self, response: Response) -> Response:
        started = getattr(g, "verdant_request_started", None)
        if started is None:
            return response  # answered by an earlier before-request hook (CORS preflight)
        duration_s = time.perf_counter() - started
        rule = request.url_rule
        route = rule.rule if rule is not None else "unmatched"
        if self.observer is not None:
            self.observer.request_done(request.method, route, response.status_code, duration_s)
        if self.access_log:
            # the path only: a query string may carry a token
            access_log.info(
                "request method=%s path=%s status=%d duration_ms=%.1f",
                request.method, request.path, response.status_code, duration_s * 1000,
            )
        return response
