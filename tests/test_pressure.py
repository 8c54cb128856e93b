"""Pressure: a consumer that stops reading while a writer floods, and many connections held
under load. The server runs as its own process, so its memory is measured alone.

`VERDANT_HEAVY=1` runs the sizes of the issue (1,000 connections held for a minute); the default
sizes keep CI within its budget. Figures (memory per connection, latencies) are printed; run
with `-s` to see them. Performance figures live in the benchmark (`python -m bench`), these
tests only bound what must never happen (unbounded memory, a stalled library, lost data).
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import wrap_client_stream

from verdant_trio.client import Closed, VerdantClient, connect

from .procserver import ServerProcess, server_process
from .replicas import Replica, initialize, set_property

pytestmark = [pytest.mark.trio, pytest.mark.slow]

HEAVY = bool(os.environ.get("VERDANT_HEAVY"))


async def metric(server: ServerProcess, name: str) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(server.url + "/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def stalled_connection(
    nursery: trio.Nursery, server: ServerProcess, library: str, user: str
) -> VerdantClient:
    """Our client on a socket with a tiny receive buffer, reading only when told to.

    trio-websocket stops reading the socket once its message queue (size 1 here) is full, so a
    client that stops calling `receive` stops the TCP stream; the small buffer makes the
    server's writes stall after kilobytes instead of megabytes.
    """
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", server.port))
    ws = await wrap_client_stream(
        nursery, trio.SocketStream(sock), "127.0.0.1", "/verdant",
        subprotocols=["Bearer", server.token(library, user)],
        message_queue_size=1, max_message_size=64 * 1024 * 1024,
    )
    return VerdantClient(ws)


class Listener:
    """A healthy listener: reads everything, acks like a client, records delivery latency."""

    def __init__(self, replica: Replica, sent_at: dict[str, float]) -> None:
        self.replica = replica
        self.sent_at = sent_at
        self.latencies_s: list[float] = []
        self.closed: Closed | None = None
        self.ops_seen = 0

    async def run(self, client: VerdantClient) -> None:
        """Until the connection closes; the test checks `closed` (a cancelled test can close
        the socket under a pending ack, which must not count as the server's doing)."""
        try:
            while True:
                message = await client.receive(timeout_s=3600)
                if message.get("type") == "op-re":
                    self.ops_seen += len(message.get("operations") or [])
                    now = time.perf_counter()
                    for op in message.get("operations") or []:
                        sent = self.sent_at.get(op["timestamp"])
                        if sent is not None:
                            self.latencies_s.append(now - sent)
                await self.replica._handle(client, message, True)
        except Closed as exc:
            self.closed = exc


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


async def flood(
    client: VerdantClient, writer: Replica, oids: list[str], count: int, value: str,
    sent_at: dict[str, float], window: int = 16, healthy: list[Listener] | None = None,
) -> None:
    """`healthy`: listeners the writer never runs more than `window` ops ahead of, so a
    listener that reads is never cut off because this process (not the server) is starved
    of CPU; a listener that stops reading is still left behind."""
    healthy = healthy or []
    start = [listener.ops_seen for listener in healthy]
    for i in range(count):
        while len(writer.pending) >= window:
            await writer.changed.wait()
        while any(h.ops_seen - s < i - window for h, s in zip(healthy, start, strict=True)):
            await trio.sleep(0.002)
        op = set_property(writer, oids[i % len(oids)], f"n{i}-{writer.id}", value + str(i))
        sent_at[op["timestamp"]] = time.perf_counter()
        await client.send(writer.op_message([op]))
    while writer.pending:
        await writer.changed.wait()


async def test_a_stalled_consumer_is_cut_off_and_nobody_else_suffers(tmp_path: Path) -> None:
    """A listener stops reading while a writer floods 8 KB values.

    - its outbound queue (32 messages here) fills and it is closed with 1013, which it sees
      as soon as it reads again; the server's memory grows by far less than the flood;
    - the other listeners get every operation, with a p99 latency close to the one they had
      in the same flood without the stalled listener;
    - reconnecting, it resyncs to exactly the state everyone else has.
    """
    ops = 4000 if HEAVY else 2500
    value = "v" * 8192
    flood_bytes = ops * len(value)
    async with server_process(tmp_path / "server", limits={"outbound_queue_messages": 32}) as server:
        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                library = "pressure"
                writer = Replica("writer", "writer")
                oids = [f"items/doc{k}" for k in range(8)]
                sent_at: dict[str, float] = {}
                listeners: list[Listener] = []
                clients: list[VerdantClient] = []
                for i in range(3):
                    replica = Replica(f"listener{i}", f"user{i}")
                    client = await nursery.start(_open, server, library, replica.user)
                    await replica.sync(client)
                    listener = Listener(replica, sent_at)
                    nursery.start_soon(listener.run, client)
                    listeners.append(listener)
                    clients.append(client)
                writer_client = await nursery.start(_open, server, library, writer.user)
                await writer.sync(writer_client)
                nursery.start_soon(writer.pump, writer_client)
                await writer_writes(writer_client, writer, [initialize(writer, oid) for oid in oids])

                # 1. the same flood without anyone stalled: the latency to compare with
                await flood(writer_client, writer, oids, ops // 5, value, sent_at, healthy=listeners)
                baseline_p99 = max(p99(listener.latencies_s) for listener in listeners)
                for listener in listeners:
                    listener.latencies_s.clear()

                # 2. a listener syncs and stops reading; the writer floods
                stalled_replica = Replica("stalled", "stalled")
                stalled = await stalled_connection(nursery, server, library, stalled_replica.user)
                await stalled_replica.sync(stalled)
                slow_before = await metric(server, "verdant_slow_consumer_disconnects_total")
                rss_before_kb = server.rss_kb()
                peak_kb = rss_before_kb

                async def watch_memory() -> None:
                    nonlocal peak_kb
                    while True:
                        peak_kb = max(peak_kb, server.rss_kb())
                        await trio.sleep(0.02)

                async with trio.open_nursery() as watching:
                    watching.start_soon(watch_memory)
                    await flood(writer_client, writer, oids, ops, value, sent_at, healthy=listeners)
                    watching.cancel_scope.cancel()
                stalled_p99 = max(p99(listener.latencies_s) for listener in listeners)
                assert await metric(server, "verdant_slow_consumer_disconnects_total") == slow_before + 1
                growth_kb = peak_kb - rss_before_kb

                # the others have everything
                expected = writer.properties()
                for listener in listeners:
                    assert listener.closed is None, f"a healthy listener was cut off: {listener.closed}"
                    while not expected <= listener.replica.properties():
                        await listener.replica.changed.wait()
                    assert listener.replica.state == writer.state

                # 3. the stalled client reads again: what was in flight, then 1013
                with pytest.raises(Closed) as closed:
                    while True:
                        message = await stalled.receive(timeout_s=30)
                        await stalled_replica._handle(stalled, message, False)
                assert closed.value.code == 1013

                # 4. it reconnects as the same replica and ends with everyone's data
                again = await nursery.start(_open, server, library, stalled_replica.user)
                await stalled_replica.sync(again)
                assert stalled_replica.state == writer.state
                assert [listener.closed for listener in listeners] == [None] * len(listeners)
                nursery.cancel_scope.cancel()
    print(
        f"stalled consumer: flood {flood_bytes / 2**20:.1f} MiB, server RSS growth "
        f"{growth_kb / 1024:.1f} MiB; listener p99 {baseline_p99 * 1000:.0f} ms alone, "
        f"{stalled_p99 * 1000:.0f} ms beside the stalled one"
    )
    assert growth_kb * 1024 < flood_bytes / 2, (
        f"server memory grew {growth_kb} KiB during a {flood_bytes // 1024} KiB flood"
    )
    assert stalled_p99 <= max(3 * baseline_p99, baseline_p99 + 0.25), (baseline_p99, stalled_p99)


async def writer_writes(client: VerdantClient, writer: Replica, operations: list[dict[str, Any]]) -> None:
    await client.send(writer.op_message(operations))
    while writer.pending:
        await writer.changed.wait()


async def _open(
    server: ServerProcess, library: str, user: str, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Hold a connection open in a nursery task; `task_status` hands the client out."""
    async with connect(server.sync_url, server.token(library, user)) as client:
        task_status.started(client)
        await trio.sleep_forever()


async def test_a_stalled_consumer_that_never_reads_again_is_released(tmp_path: Path) -> None:
    """Closing a slow consumer must free its connection even if the peer never reads again:
    otherwise each stalled peer holds a task, a socket and up to the kernel's send buffer."""
    async with server_process(
        tmp_path / "server",
        limits={"outbound_queue_messages": 8, "heartbeat_timeout_s": 600, "stalled_peer_timeout_s": 2},
    ) as server:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                writer = Replica("writer", "writer")
                writer_client = await nursery.start(_open, server, "released", writer.user)
                await writer.sync(writer_client)
                nursery.start_soon(writer.pump, writer_client)
                stalled_replica = Replica("stalled", "stalled")
                stalled = await stalled_connection(nursery, server, "released", stalled_replica.user)
                await stalled_replica.sync(stalled)
                await writer_writes(writer_client, writer, [initialize(writer, "items/x")])
                await flood(writer_client, writer, ["items/x"], 400, "v" * 8192, {})
                assert await metric(server, "verdant_slow_consumer_disconnects_total") == 1
                # the kernel aborts the stalled socket after stalled_peer_timeout_s (2 s)
                with trio.move_on_after(10):
                    while await metric(server, 'verdant_connections_open{replica_type="realtime"') > 1:
                        await trio.sleep(0.1)
                open_now = await metric(server, 'verdant_connections_open{replica_type="realtime"')
                nursery.cancel_scope.cancel()
        assert open_now == 1, "the stalled connection is still open on the server"


# -- holding load ---------------------------------------------------------------------------

CONNECTIONS = int(os.environ.get("VERDANT_HOLD_CONNECTIONS", 1000 if HEAVY else 200))
HOLD_S = float(os.environ.get("VERDANT_HOLD_SECONDS", 60 if HEAVY else 8))
LIBRARIES = 10


async def test_many_connections_held_under_load_converge(tmp_path: Path) -> None:
    """CONNECTIONS synced websockets over 10 libraries, heartbeating, held while a writer per
    library works; then everyone has the same data as the writer of their library."""
    heartbeat_s = min(15.0, HOLD_S / 3)
    async with server_process(
        tmp_path / "server", limits={"max_connections": CONNECTIONS + 50}
    ) as server:
        with trio.fail_after(120 + HOLD_S * 2):
            async with trio.open_nursery() as nursery:
                rss_before_kb = server.rss_kb()
                replicas: list[tuple[int, Replica]] = []
                limiter = trio.CapacityLimiter(32)

                async def join(i: int) -> None:
                    replica = Replica(f"r{i:05d}", f"u{i}")
                    async with limiter:
                        client = await nursery.start(_open, server, f"hold-{i % LIBRARIES}", replica.user)
                        await replica.sync(client)
                    replicas.append((i % LIBRARIES, replica))
                    nursery.start_soon(replica.pump, client)
                    nursery.start_soon(replica.heartbeats, client, heartbeat_s)

                async with trio.open_nursery() as joining:
                    for i in range(CONNECTIONS):
                        joining.start_soon(join, i)
                idle_kb = (server.rss_kb() - rss_before_kb) / CONNECTIONS

                writers: list[Replica] = []
                async with trio.open_nursery() as working:
                    for lib in range(LIBRARIES):
                        writer = Replica(f"writer{lib}", f"writer{lib}")
                        client = await nursery.start(_open, server, f"hold-{lib}", writer.user)
                        await writer.sync(client)
                        nursery.start_soon(writer.pump, client)
                        writers.append(writer)
                        working.start_soon(_work, client, writer, HOLD_S)
                for lib, writer in enumerate(writers):
                    expected = writer.properties()
                    for replica_lib, replica in replicas:
                        if replica_lib != lib:
                            continue
                        while not expected <= replica.properties():
                            await replica.changed.wait()
                        assert replica.state == writer.state
                open_now = await metric(server, 'verdant_connections_open{replica_type="realtime"')
                # every heartbeat sent so far gets its answer (the last ones may be in flight)
                sent = [(replica, replica.heartbeats_sent) for _, replica in replicas]
                with trio.move_on_after(30):
                    while any(replica.heartbeats_answered < n for replica, n in sent):
                        await trio.sleep(0.05)
                unanswered = [
                    (replica.id, n - replica.heartbeats_answered)
                    for replica, n in sent if replica.heartbeats_answered < n
                ]
                heartbeats = sum(n for _, n in sent)
                errors = [e for _, r in replicas for e in r.errors]
                rss_end_kb = server.rss_kb()
                nursery.cancel_scope.cancel()
    print(
        f"held {CONNECTIONS} connections over {LIBRARIES} libraries for {HOLD_S:.0f} s: "
        f"{idle_kb:.1f} KiB of server memory per idle synced connection, "
        f"RSS {rss_before_kb / 1024:.0f} -> {rss_end_kb / 1024:.0f} MiB, "
        f"{heartbeats} heartbeats answered"
    )
    assert open_now == CONNECTIONS + LIBRARIES
    assert not errors
    assert not unanswered, f"heartbeats never answered: {unanswered[:10]}"
    # the hold lasts at least HOLD_S, three heartbeat intervals: everyone sent some
    assert min(n for _, n in sent) >= 1
    assert idle_kb < 256, "server memory per idle connection"


async def _work(client: VerdantClient, writer: Replica, seconds: float) -> None:
    """A steady writer: a few operations a few times a second, like a busy user."""
    oids = [f"items/{writer.id}-{k}" for k in range(5)]
    await writer_writes(client, writer, [initialize(writer, oid) for oid in oids])
    deadline = trio.current_time() + seconds
    n = 0
    while trio.current_time() < deadline:
        ops = [set_property(writer, oids[(n + k) % 5], f"p{n + k}", n + k) for k in range(3)]
        n += 3
        await client.send(writer.op_message(ops))
        await trio.sleep(0.25)
    while writer.pending:
        await writer.changed.wait()
