"""The benchmark scenarios. Each takes a `Target` and options and returns a dict of figures.

Every figure is taken over a measurement window after a warm-up: wall time, the server's CPU
time (user + system, all threads, from /proc) and the generator's own CPU time, so the report
can say how busy each side was. "Ops per server CPU-second" is the figure that holds on a
shared machine; rates in ops/s move with whatever else runs.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import trio

from .replica import Clock, Endpoint, Replica, latency_summary
from .servers import Target, context_switches, cpu_split, reset_peak, thread_cpu_seconds
from .turns import Turn
from .wire import HandshakeRefused, LeanHttp, WsClosed

T = TypeVar("T")


@dataclass
class Options:
    duration_s: float = 10.0
    warmup_s: float = 2.0
    listeners: int = 50
    window: int = 64
    libraries: int = 100
    library_window: int = 4
    idle_connections: int = 1000
    idle_libraries: int = 10
    idle_hold_s: float = 20.0
    initial_ops: int = 50_000
    initial_value_chars: int = 48
    initial_repeats: int = 3
    http_requesters: int = 8
    http_ops: int = 10
    acks: bool = True
    connect_concurrency: int = 32
    turn: Turn | None = None
    """With `--interleave`: this server's turns to send (see `bench.turns`)."""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def scrape_counters(target: Target) -> dict[str, float]:
    """Our server's Prometheus counters of messages and compaction passes (others: empty)."""
    if target.name != "ours":
        return {}
    try:
        with urllib.request.urlopen(target.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("verdant_messages_received_total", "verdant_messages_sent_total",
                            "verdant_rebases_total", "verdant_operations_stored_total")):
            name, _, value = line.rpartition(" ")
            name = name.replace("verdant_messages_received_total", "in")
            name = name.replace("verdant_messages_sent_total", "out")
            name = name.replace('{type="', ":").replace('"}', "")
            out[name.replace("verdant_", "")] = float(value)
    return out


class Window:
    """Wall, server CPU and generator CPU between `start()` and `stop()`."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.wall_s = 0.0
        self.server_cpu_s: float | None = None
        self.generator_cpu_s = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._cpu0 = self.target.cpu()
        self._gen0 = time.process_time()
        self._counters0 = scrape_counters(self.target)
        self._processes0 = self.target.cpu_by_process()
        if self.target.pid is not None:
            self._threads0 = thread_cpu_seconds(self.target.pid)
            self._split0 = cpu_split(self.target.pid)
            self._switches0 = context_switches(self.target.pid)

    def stop(self) -> None:
        self.wall_s = time.perf_counter() - self._t0
        cpu1 = self.target.cpu()
        if cpu1 is not None and self._cpu0 is not None:
            self.server_cpu_s = cpu1 - self._cpu0
        self.generator_cpu_s = time.process_time() - self._gen0
        counters1 = scrape_counters(self.target)
        self.server_messages_per_s = {
            k: round((v - self._counters0.get(k, 0)) / self.wall_s, 1)
            for k, v in sorted(counters1.items()) if v - self._counters0.get(k, 0)
        }
        processes1 = self.target.cpu_by_process()
        self.by_process = {
            name: round(cpu - self._processes0.get(name, 0.0), 3) for name, cpu in processes1.items()
        }
        """CPU seconds of each process of a cluster (its nodes and HAProxy) in the window."""
        self.threads: dict[str, float] = {}
        self.switches: dict[str, int] = {}
        if self.target.pid is not None:
            threads1 = thread_cpu_seconds(self.target.pid)
            switches1 = context_switches(self.target.pid)
            # worker threads that ended inside the window are missing from /proc: the rest
            # of the process total is theirs
            main = threads1["main"] - self._threads0["main"]
            split1 = cpu_split(self.target.pid)
            self.threads = {"server_user_s": round(split1[0] - self._split0[0], 3),
                            "server_system_s": round(split1[1] - self._split0[1], 3),
                            "main_thread_cpu_s": round(main, 3),
                            "other_threads_cpu_s": round((self.server_cpu_s or 0) - main, 3)}
            self.switches = {k: switches1[k] - self._switches0[k] for k in switches1}

    def figures(self) -> dict[str, Any]:
        return {
            "wall_s": round(self.wall_s, 3),
            "server_cpu_s": None if self.server_cpu_s is None else round(self.server_cpu_s, 3),
            "server_cpu_share": None if self.server_cpu_s is None
            else round(self.server_cpu_s / self.wall_s, 3),
            "generator_cpu_share": round(self.generator_cpu_s / self.wall_s, 3),
            **self.threads,
            "server_context_switches": self.switches or None,
            "server_counters_per_s": self.server_messages_per_s or None,
            "server_cpu_s_by_process": self.by_process or None,
        }

    def per_op(self, count: float) -> dict[str, Any]:
        """Server CPU µs per operation: in all, and for a cluster, HAProxy's, the nodes' (their
        sum) and each process's."""
        if not self.server_cpu_s or not count:
            return {}
        figures: dict[str, Any] = {"server_cpu_us_per_op": round(self.server_cpu_s / count * 1e6, 1)}
        if self.by_process:
            haproxy = self.by_process.get("haproxy", 0.0)
            figures.update({
                "haproxy_cpu_us_per_op": round(haproxy / count * 1e6, 1),
                "nodes_cpu_us_per_op": round((self.server_cpu_s - haproxy) / count * 1e6, 1),
                "cpu_us_per_op_by_process": {
                    name: round(cpu / count * 1e6, 1) for name, cpu in self.by_process.items()
                },
            })
        return figures

    def per_cpu_s(self, count: float) -> float | None:
        if not self.server_cpu_s:
            return None
        return round(count / self.server_cpu_s, 1)


async def gather(functions: Sequence[Callable[[], Awaitable[T]]], concurrency: int) -> list[T]:
    """Run async callables with bounded concurrency; results in order."""
    results: list[Any] = [None] * len(functions)
    limiter = trio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            results[i] = await functions[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(functions)):
            nursery.start_soon(one, i)
    return results


async def open_replica(
    endpoint: Endpoint, library: str, user: str, replica_id: str, *, acks: bool = True,
    type: int = 0,
) -> Replica:
    for attempt in range(20):
        try:
            conn = await endpoint.connect(library, user, type)
            break
        except (OSError, HandshakeRefused):  # a busy server may refuse (503) or reset
            if attempt == 19:
                raise
            await trio.sleep(0.05 * (attempt + 1))
    replica = Replica(conn, replica_id, acks=acks)
    await replica.sync()
    return replica


def op_message(replica: Replica, operations: list[dict[str, Any]]) -> tuple[str, bytes]:
    stamp = replica.clock.now()
    return stamp, orjson.dumps(
        {"type": "op", "replicaId": replica.id, "timestamp": stamp, "operations": operations}
    )


class Writer:
    """Keeps `window` op messages in flight; frees a slot on each `server-ack`."""

    def __init__(
        self, replica: Replica, window: int, sent_at: dict[str, float], turn: Turn | None = None
    ) -> None:
        self.replica = replica
        self.turn = turn
        self.slots = trio.Semaphore(window)
        self.pending: dict[str, float] = {}
        self.sent_at = sent_at
        self.measuring = False
        self.acked = 0
        self.acked_ops = 0
        self.sent_ops = 0
        self.ack_latency_s: list[float] = []
        self._ops_in: dict[str, int] = {}
        self.all_acked = trio.Event()
        self.all_acked.set()
        self.stopping = False
        replica.on_server_ack = self._on_ack

    def _on_ack(self, stamp: str, now: float) -> None:
        # The client reads a server-ack as "synced up to this timestamp" (`updateLastSynced`),
        # so a server may acknowledge several messages with the newest one's timestamp.
        # This replica's timestamps increase, and dicts keep insertion order.
        while self.pending:
            oldest = next(iter(self.pending))
            if oldest > stamp:
                break
            sent = self.pending.pop(oldest)
            self.acked += 1
            self.acked_ops += self._ops_in.pop(oldest, 1)
            if self.measuring:
                self.ack_latency_s.append(now - sent)
            self.slots.release()
        if not self.pending:
            self.all_acked.set()

    async def send(self, operations: list[dict[str, Any]]) -> None:
        await self.slots.acquire()
        stamp, body = op_message(self.replica, operations)
        now = time.perf_counter()
        self.pending[stamp] = now
        self.all_acked = self.all_acked if not self.all_acked.is_set() else trio.Event()
        if len(operations) != 1:
            self._ops_in[stamp] = len(operations)
        if self.measuring:
            for op in operations:
                self.sent_at[op["timestamp"]] = now
        self.sent_ops += len(operations)
        await self.replica.conn.send(body)

    async def flood(self, make_ops: Callable[[int], list[dict[str, Any]]]) -> None:
        """Send until `stop()`. Never cancelled mid-send: a cancelled `send_all` would leave
        half a frame on the socket."""
        k = 0
        while True:
            await self.slots.acquire()
            if self.stopping:
                self.slots.release()
                return
            self.slots.release()
            if self.turn is not None:
                await self.turn.wait()
                if self.stopping:
                    return
            await self.send(make_ops(k))
            k += 1

    def stop(self) -> None:
        self.stopping = True
        self.slots.release()  # wake a flood waiting for a slot


def set_op(clock: Clock, oid: str, value: Any) -> dict[str, Any]:
    return {
        "oid": oid, "timestamp": clock.now(),
        "data": {"op": "set", "name": "n", "value": value},
    }


def initialize_ops(clock: Clock, oids: list[str]) -> list[dict[str, Any]]:
    return [
        {"oid": oid, "timestamp": clock.now(),
         "data": {"op": "initialize", "value": {"n": 0}}}
        for oid in oids
    ]


async def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    """Poll a counter condition (counters are plain ints updated by reader tasks)."""
    with trio.move_on_after(timeout_s):
        while not predicate():  # noqa: ASYNC110 - counters, not events: polling is the point
            await trio.sleep(step_s)
        return True
    return False


# -- fan-out -----------------------------------------------------------------------------------


async def fanout(target: Target, endpoint: Endpoint, opts: Options) -> dict[str, Any]:
    """1 writer keeping `window` ops in flight, `listeners` listeners, one library."""
    library = unique("fanout")
    listeners = await gather(
        [
            (lambda i=i: open_replica(endpoint, library, f"user{i}", f"lst{i:04d}", acks=opts.acks))
            for i in range(opts.listeners)
        ],
        opts.connect_concurrency,
    )
    writer_replica = await open_replica(endpoint, library, "writer", "writer0")
    sent_at: dict[str, float] = {}
    writer = Writer(writer_replica, opts.window, sent_at, opts.turn)
    samples: list[float] = []
    oids = [f"items/o{k}" for k in range(100)]

    def on_operations(operations: list[dict[str, Any]], now: float) -> None:
        for op in operations:
            sent = sent_at.get(op["timestamp"])
            if sent is not None:
                samples.append(now - sent)

    for listener in listeners:
        listener.on_operations = on_operations
    everyone = [*listeners, writer_replica]
    window = Window(target)
    async with trio.open_nursery() as nursery:
        for replica in everyone:
            nursery.start_soon(replica.reader)
            nursery.start_soon(replica.heartbeats)
        await writer.send(initialize_ops(writer_replica.clock, oids))
        with trio.fail_after(60):
            await writer.all_acked.wait()
        if opts.turn is not None:
            await opts.turn.ready()
        async with trio.open_nursery() as floods:
            floods.start_soon(_flood, writer, lambda k: [set_op(writer_replica.clock, oids[k % len(oids)], k)])
            await trio.sleep(opts.warmup_s)
            before = [r.counters.snapshot() for r in listeners]
            acked_before = writer.acked_ops
            writer.measuring = True
            window.start()
            await trio.sleep(opts.duration_s)
            window.stop()
            writer.measuring = False
            acked = writer.acked_ops - acked_before
            after = [r.counters.snapshot() for r in listeners]
            writer.stop()
        # drain: everything sent reaches every listener
        total = writer.sent_ops
        with trio.move_on_after(60):
            await writer.all_acked.wait()
        complete = await wait_until(
            lambda: all(r.counters.ops_received >= total for r in listeners), 60
        )
        missing = sum(max(0, total - r.counters.ops_received) for r in listeners)
        closed = sum(1 for r in everyone if r.closed is not None)
        nursery.cancel_scope.cancel()
    await _close_all(everyone)
    frames = sum(a.frames - b.frames for a, b in zip(after, before, strict=True))
    kinds: dict[str, int] = {}
    for a, b in zip(after, before, strict=True):
        for kind, count in a.by_type.items():
            kinds[kind] = kinds.get(kind, 0) + count - b.by_type.get(kind, 0)
    ops_delivered = sum(a.ops_received - b.ops_received for a, b in zip(after, before, strict=True))
    wall = window.wall_s
    return {
        "scenario": "fanout",
        "listeners": opts.listeners,
        "window": opts.window,
        "acks": opts.acks,
        **window.figures(),
        "acked_ops": acked,
        "acked_ops_per_s": round(acked / wall, 1),
        "ops_per_server_cpu_s": window.per_cpu_s(acked),
        **window.per_op(acked),
        "delivered_msgs_per_s": round(frames / wall, 1),
        "delivered_ops_per_s": round(ops_delivered / wall, 1),
        "frames_per_acked_op_per_listener": round(frames / max(1, acked) / opts.listeners, 3),
        "frames_by_type_per_s": {k: round(v / wall, 1) for k, v in sorted(kinds.items())},
        "latency_writer_to_listener": latency_summary(samples),
        "latency_server_ack": latency_summary(writer.ack_latency_s),
        "all_delivered": complete,
        "missing_deliveries": missing,
        "connections_closed_by_server": closed,
    }


async def _close_all(replicas: Sequence[Replica]) -> None:
    with trio.move_on_after(10) as scope:
        scope.shield = True
        async with trio.open_nursery() as nursery:
            for replica in replicas:
                nursery.start_soon(replica.conn.aclose)


# -- many libraries ----------------------------------------------------------------------------


async def libraries(target: Target, endpoint: Endpoint, opts: Options) -> dict[str, Any]:
    """`libraries` libraries × 2 writers, each writer also the other's listener."""
    prefix = unique("libs")
    pairs: list[tuple[Replica, Replica]] = []
    makers = []
    for lib in range(opts.libraries):
        for side in (0, 1):
            makers.append(
                lambda lib=lib, side=side: open_replica(
                    endpoint, f"{prefix}-{lib}", f"user{side}", f"w{lib:03d}{side}", acks=opts.acks
                )
            )
    replicas = await gather(makers, opts.connect_concurrency)
    pairs = [(replicas[i], replicas[i + 1]) for i in range(0, len(replicas), 2)]
    sent_at: dict[str, float] = {}
    samples: list[float] = []

    def on_operations(operations: list[dict[str, Any]], now: float) -> None:
        for op in operations:
            sent = sent_at.get(op["timestamp"])
            if sent is not None:
                samples.append(now - sent)

    writers = []
    for replica in replicas:
        replica.on_operations = on_operations
        writers.append(Writer(replica, opts.library_window, sent_at, opts.turn))
    window = Window(target)
    async with trio.open_nursery() as nursery:
        for replica in replicas:
            nursery.start_soon(replica.reader)
            nursery.start_soon(replica.heartbeats)
        oid_sets = {w.replica.id: [f"items/{w.replica.id}-{k}" for k in range(10)] for w in writers}
        for w in writers:
            await w.send(initialize_ops(w.replica.clock, oid_sets[w.replica.id]))
        with trio.fail_after(120):
            for w in writers:
                await w.all_acked.wait()
        if opts.turn is not None:
            await opts.turn.ready()
        async with trio.open_nursery() as floods:
            for w in writers:
                oids = oid_sets[w.replica.id]
                floods.start_soon(
                    _flood, w, lambda k, w=w, oids=oids: [set_op(w.replica.clock, oids[k % 10], k)]
                )
            await trio.sleep(opts.warmup_s)
            acked_before = sum(w.acked_ops for w in writers)
            for w in writers:
                w.measuring = True
            window.start()
            await trio.sleep(opts.duration_s)
            window.stop()
            for w in writers:
                w.measuring = False
            acked = sum(w.acked_ops for w in writers) - acked_before
            for w in writers:
                w.stop()
        total_by_id = {w.replica.id: w.sent_ops for w in writers}
        with trio.move_on_after(60):
            for w in writers:
                await w.all_acked.wait()
        complete = await wait_until(
            lambda: all(
                a.counters.ops_received >= total_by_id[b.id]
                and b.counters.ops_received >= total_by_id[a.id]
                for a, b in pairs
            ),
            60,
        )
        closed = sum(1 for r in replicas if r.closed is not None)
        nursery.cancel_scope.cancel()
    await _close_all(replicas)
    ack_latency = [x for w in writers for x in w.ack_latency_s]
    return {
        "scenario": "libraries",
        "libraries": opts.libraries,
        "writers": len(writers),
        "window_per_writer": opts.library_window,
        **window.figures(),
        "acked_ops": acked,
        "acked_ops_per_s": round(acked / window.wall_s, 1),
        "ops_per_server_cpu_s": window.per_cpu_s(acked),
        **window.per_op(acked),
        "latency_writer_to_peer": latency_summary(samples),
        "latency_server_ack": latency_summary(ack_latency),
        "all_delivered": complete,
        "connections_closed_by_server": closed,
    }


async def _flood(writer: Writer, make: Callable[[int], Any]) -> None:
    try:
        await writer.flood(make)
    except WsClosed:
        pass


# -- idle connections --------------------------------------------------------------------------


async def idle(target: Target, endpoint: Endpoint, opts: Options) -> dict[str, Any]:
    """`idle_connections` synced sockets over `idle_libraries` libraries, held with heartbeats."""
    prefix = unique("idle")
    n, libs = opts.idle_connections, opts.idle_libraries
    # one warm connection per library first: libraries open, code paths loaded
    warm = await gather(
        [(lambda lib=lib: open_replica(endpoint, f"{prefix}-{lib}", "warm", f"warm{lib:03d}"))
         for lib in range(libs)],
        opts.connect_concurrency,
    )
    await trio.sleep(1.0)
    memory0 = target.memory()
    window = Window(target)
    window.start()
    replicas = await gather(
        [(lambda i=i: open_replica(endpoint, f"{prefix}-{i % libs}", f"user{i}", f"idle{i:05d}"))
         for i in range(n)],
        opts.connect_concurrency,
    )
    window.stop()
    connect = window.figures()
    async with trio.open_nursery() as nursery:
        for replica in [*warm, *replicas]:
            nursery.start_soon(replica.reader)
            nursery.start_soon(replica.heartbeats)
        await trio.sleep(2.0)
        memory1 = target.memory()
        hold = Window(target)
        hold.start()
        await trio.sleep(opts.idle_hold_s)
        hold.stop()
        memory2 = target.memory()
        closed = sum(1 for r in replicas if r.closed is not None)
        heartbeats = sum(r.counters.by_type.get("heartbeat-response", 0) for r in replicas)
        nursery.cancel_scope.cancel()
    await _close_all([*warm, *replicas])
    rss_delta_kb = memory1.get("VmRSS", 0) - memory0.get("VmRSS", 0)
    return {
        "scenario": "idle",
        "connections": n,
        "libraries": libs,
        "connect": connect,
        "connect_s": connect["wall_s"],
        "cpu_ms_per_connection": None if window.server_cpu_s is None
        else round(window.server_cpu_s * 1000 / n, 3),
        "rss_before_kb": memory0.get("VmRSS"),
        "rss_after_kb": memory1.get("VmRSS"),
        "rss_after_hold_kb": memory2.get("VmRSS"),
        "kb_per_connection": round(rss_delta_kb / n, 2) if memory0 else None,
        "hold": hold.figures(),
        "idle_cpu_ms_per_connection_per_min": None if hold.server_cpu_s is None
        else round(hold.server_cpu_s * 1000 / n / hold.wall_s * 60, 3),
        "heartbeat_responses": heartbeats,
        "connections_closed_by_server": closed,
    }


# -- initial sync ------------------------------------------------------------------------------


async def initial_sync(target: Target, endpoint: Endpoint, opts: Options) -> dict[str, Any]:
    """A library of `initial_ops` operations (history, not compacted), synced by new replicas.

    A replica that synced before the writes and never acknowledged anything since holds the
    global acknowledgement back, so both servers keep every operation in history.
    """
    library = unique("initial")
    holdout = await open_replica(endpoint, library, "holdout", "holdout0")
    await holdout.conn.aclose()
    writer_replica = await open_replica(endpoint, library, "writer", "writer0")
    writer = Writer(writer_replica, 4, {})
    objects = max(1, opts.initial_ops // 50)
    oids = [f"items/doc{k:05d}" for k in range(objects)]
    filler = "x" * opts.initial_value_chars
    populate = Window(target)
    populate.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer_replica.reader)
        remaining = opts.initial_ops
        init = initialize_ops(writer_replica.clock, oids)
        for start in range(0, len(init), 500):
            await writer.send(init[start:start + 500])
        remaining -= len(init)
        k = 0
        while remaining > 0:
            batch = [
                {"oid": oids[(k + j) % objects], "timestamp": writer_replica.clock.now(),
                 "data": {"op": "set", "name": f"f{(k + j) % 7}", "value": f"{filler}{k + j}"}}
                for j in range(min(500, remaining))
            ]
            k += len(batch)
            remaining -= len(batch)
            await writer.send(batch)
        with trio.fail_after(300):
            await writer.all_acked.wait()
        nursery.cancel_scope.cancel()
    populate.stop()
    await writer_replica.conn.aclose()
    await trio.sleep(1.5)  # let the server finish its post-batch work (compaction pass, acks)
    runs: list[dict[str, Any]] = []
    for r in range(opts.initial_repeats):
        memory0 = target.memory()
        peak_reset = reset_peak(target.pid) if target.pid is not None else False
        replica_conn = await endpoint.connect(library, f"reader{r}")
        window = Window(target)
        stamp = Clock(f"reader{r}").now()
        message = orjson.dumps({
            "type": "sync", "replicaId": f"reader{r}", "timestamp": stamp, "operations": [],
            "baselines": [], "schemaVersion": 1, "since": None,
        })
        window.start()
        first_byte_s = None
        await replica_conn.send(message)
        t0 = time.perf_counter()
        with trio.fail_after(300):
            while True:
                payload = await replica_conn.receive()
                if first_byte_s is None:
                    first_byte_s = time.perf_counter() - t0
                if payload.startswith(b'{"type":"sync-resp"') or b'"sync-resp"' in payload[:200]:
                    break
        elapsed = time.perf_counter() - t0
        window.stop()
        memory1 = target.memory()
        response = orjson.loads(payload)
        await replica_conn.aclose()
        runs.append({
            "time_ms": round(elapsed * 1000, 1),
            "bytes": len(payload),
            "operations": len(response.get("operations") or []),
            "baselines": len(response.get("baselines") or []),
            "server_cpu_s": window.server_cpu_s,
            "rss_before_kb": memory0.get("VmRSS"),
            "peak_rss_kb": memory1.get("VmHWM") if peak_reset else None,
        })
        await trio.sleep(1.0)
    times = sorted(r["time_ms"] for r in runs)
    peaks = [r["peak_rss_kb"] for r in runs if r["peak_rss_kb"] is not None]
    return {
        "scenario": "initial",
        "operations_written": opts.initial_ops,
        "populate": {**populate.figures(), "ops_per_s": round(opts.initial_ops / populate.wall_s, 1)},
        "runs": runs,
        "time_ms_median": times[len(times) // 2],
        "time_ms_min": times[0],
        "bytes": runs[0]["bytes"],
        "operations_in_response": runs[0]["operations"],
        "server_cpu_s_median": sorted(r["server_cpu_s"] or 0 for r in runs)[len(runs) // 2]
        if target.pid or target.pids else None,
        "peak_rss_mb": round(max(peaks) / 1024, 1) if peaks else None,
        "peak_rss_over_before_mb": round(
            max(r["peak_rss_kb"] - r["rss_before_kb"] for r in runs if r["peak_rss_kb"]) / 1024, 1
        ) if peaks else None,
    }


# -- HTTP push ---------------------------------------------------------------------------------


async def http_push(target: Target, endpoint: Endpoint, opts: Options) -> dict[str, Any]:
    """`http_requesters` concurrent push clients, each POSTing `http_ops` operations a request."""
    library = unique("http")
    latencies: list[float] = []
    counts = {"requests": 0, "errors": 0}
    measuring = {"on": False}
    window = Window(target)

    async def requester(i: int, ready: trio.Event) -> None:
        replica_id = f"push{i:03d}"
        clock = Clock(replica_id)
        token = endpoint.token(library, f"pusher{i}", type=1)
        http = LeanHttp(target.url)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        path = target.sync_path
        oids = [f"items/{replica_id}-{k}" for k in range(10)]

        async def post(messages: list[dict[str, Any]]) -> None:
            start = time.perf_counter()
            status, body = await http.request("POST", path, orjson.dumps({"messages": messages}), headers)
            if status != 200:
                counts["errors"] += 1
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            if measuring["on"]:
                latencies.append(time.perf_counter() - start)
                counts["requests"] += 1

        await post([{
            "type": "sync", "replicaId": replica_id, "timestamp": clock.now(),
            "operations": [], "baselines": [], "schemaVersion": 1, "since": None,
        }])
        await post([{
            "type": "op", "replicaId": replica_id, "timestamp": clock.now(),
            "operations": initialize_ops(clock, oids),
        }])
        ready.set()
        k = 0
        try:
            while True:
                ops = [set_op(clock, oids[(k + j) % 10], k + j) for j in range(opts.http_ops)]
                k += opts.http_ops
                if opts.turn is not None:
                    await opts.turn.wait()
                await post([{
                    "type": "op", "replicaId": replica_id, "timestamp": clock.now(),
                    "operations": ops,
                }])
        finally:
            with trio.CancelScope(shield=True):
                await http.aclose()

    async with trio.open_nursery() as nursery:
        readies = []
        for i in range(opts.http_requesters):
            ready = trio.Event()
            readies.append(ready)
            nursery.start_soon(requester, i, ready)
        with trio.fail_after(60):
            for ready in readies:
                await ready.wait()
        if opts.turn is not None:
            await opts.turn.ready()
        await trio.sleep(opts.warmup_s)
        measuring["on"] = True
        window.start()
        await trio.sleep(opts.duration_s)
        window.stop()
        measuring["on"] = False
        nursery.cancel_scope.cancel()
    ops = counts["requests"] * opts.http_ops
    return {
        "scenario": "http",
        "requesters": opts.http_requesters,
        "ops_per_request": opts.http_ops,
        **window.figures(),
        "requests": counts["requests"],
        "requests_per_s": round(counts["requests"] / window.wall_s, 1),
        "ops_per_s": round(ops / window.wall_s, 1),
        "ops_per_server_cpu_s": window.per_cpu_s(ops),
        **window.per_op(ops),
        "errors": counts["errors"],
        "latency_request": latency_summary(latencies),
    }


async def fanout_noack(target: Target, endpoint: Endpoint, opts: Options) -> dict[str, Any]:
    """Fan-out with listeners that never ack `op-re` (not what clients do; the mode in which
    the Node server's fan-out figures of the issue were taken, see "Benchmarks" in the README)."""
    result = await fanout(target, endpoint, dataclasses.replace(opts, acks=False))
    result["scenario"] = "fanout-noack"
    return result


INTERLEAVED: frozenset[str] = frozenset({"fanout", "fanout-noack", "libraries", "http"})
"""The scenarios `--interleave` can run: those whose load is clients sending in a loop."""

SCENARIOS: dict[str, Callable[[Target, Endpoint, Options], Awaitable[dict[str, Any]]]] = {
    "fanout": fanout,
    "fanout-noack": fanout_noack,
    "libraries": libraries,
    "idle": idle,
    "initial": initial_sync,
    "http": http_push,
}
