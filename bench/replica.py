"""A protocol-level replica for the load generator: clock, connection, reader loop, counters.

It behaves like a Verdant client on the wire where it matters for the server's work: it syncs
first, acks a `sync-resp` nonce, acks every `op-re` with the timestamp of its last operation
(`PersistenceMetadata.insertRemoteOperations` → `ack`), and sends `heartbeat` every 15 s. It
keeps no local store.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import orjson
import trio

from verdant_trio.client import format_timestamp
from verdant_trio.sync.tokens import TokenProvider

from .wire import LeanSocket, WsClosed

HEARTBEAT_INTERVAL_S: Final = 15.0
_TYPE_PREFIX: Final = b'{"type":"'


class Clock:
    """Verdant's hybrid logical clock format (see `verdant_trio.client.timestamp`), per replica."""

    def __init__(self, node: str) -> None:
        self.node = node.rjust(7, "0")[-7:]
        self._time = 0
        self._counter = 0

    def now(self) -> str:
        ms = int(time.time() * 1000)
        if ms > self._time:
            self._time, self._counter = ms, 0
        else:
            self._counter += 1
        return format_timestamp(1, self._time, self._counter, self.node)


def message_type(payload: bytes) -> str:
    """The `type` of a server message without parsing it (both servers put `type` first)."""
    if payload.startswith(_TYPE_PREFIX):
        end = payload.find(b'"', 9)
        if end > 0:
            return payload[9:end].decode()
    value = orjson.loads(payload)
    return str(value.get("type")) if isinstance(value, dict) else "?"


class Conn(Protocol):
    close_code: int | None

    async def send(self, data: str | bytes) -> None: ...

    async def receive(self) -> bytes: ...

    async def aclose(self, code: int = 1000) -> None: ...


class TrioWebsocketConn:
    """`trio_websocket` behind the generator's interface (`--client trio-websocket`)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, nursery: trio.Nursery, url: str, token: str) -> TrioWebsocketConn:
        from trio_websocket import connect_websocket_url

        ws_url = url.replace("http://", "ws://", 1)
        ws = await connect_websocket_url(
            nursery, ws_url, subprotocols=["Bearer", token],
            max_message_size=200 * 1024 * 1024, message_queue_size=4096,
        )
        return cls(ws)

    async def send(self, data: str | bytes) -> None:
        from trio_websocket import ConnectionClosed

        text = data.decode() if isinstance(data, bytes) else data
        try:
            await self.ws.send_message(text)
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
            raise WsClosed(self.close_code) from None

    async def receive(self) -> bytes:
        from trio_websocket import ConnectionClosed

        try:
            message = await self.ws.get_message()
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason else None
            raise WsClosed(self.close_code) from None
        return message.encode() if isinstance(message, str) else message

    async def aclose(self, code: int = 1000) -> None:
        await self.ws.aclose(code)


@dataclass
class Endpoint:
    """Where and how replicas connect."""

    sync_url: str
    secret: str
    client: str = "lean"
    nursery: trio.Nursery | None = None
    """Needed by trio-websocket connections."""

    def token(self, library: str, user: str, type: int = 0) -> str:
        return TokenProvider(self.secret).get_token(
            library, user, self.sync_url, type=type, expires_in="1d"
        )

    async def connect(self, library: str, user: str, type: int = 0) -> Conn:
        token = self.token(library, user, type)
        if self.client == "trio-websocket":
            assert self.nursery is not None
            return await TrioWebsocketConn.connect(self.nursery, self.sync_url, token)
        return await LeanSocket.connect(self.sync_url, token)


@dataclass
class Counters:
    frames: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    ops_received: int = 0
    acks_sent: int = 0

    def snapshot(self) -> Counters:
        return Counters(self.frames, dict(self.by_type), self.ops_received, self.acks_sent)


class Replica:
    """One replica on one connection. Run `reader()` in a task once synced."""

    def __init__(self, conn: Conn, replica_id: str, *, acks: bool = True) -> None:
        self.conn = conn
        self.id = replica_id
        self.clock = Clock(replica_id[-7:])
        self.acks = acks
        self.counters = Counters()
        self.on_server_ack: Callable[[str, float], None] | None = None
        self.on_operations: Callable[[list[dict[str, Any]], float], None] | None = None
        self.received_timestamps: set[str] | None = None
        """When a set: every received operation's timestamp is added (convergence checks)."""
        self.closed: WsClosed | None = None
        self.last_sync: dict[str, Any] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.conn.send(orjson.dumps(message))

    async def sync(self, *, since: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
        """Send `sync`, return the `sync-resp` (other messages before it are counted only)."""
        stamp = self.clock.now()
        await self.send({
            "type": "sync", "replicaId": self.id, "timestamp": stamp, "operations": [],
            "baselines": [], "schemaVersion": 1, "since": since,
        })
        with trio.fail_after(timeout_s):
            while True:
                payload = await self.conn.receive()
                kind = message_type(payload)
                self._count(kind)
                if kind == "sync-resp":
                    response: dict[str, Any] = orjson.loads(payload)
                    if self.received_timestamps is not None:
                        self.received_timestamps.update(o["timestamp"] for o in response["operations"])
                    nonce = response.get("ackThisNonce")
                    if nonce:
                        await self.send({
                            "type": "ack", "replicaId": self.id, "timestamp": self.clock.now(),
                            "nonce": nonce,
                        })
                    self.last_sync = response
                    return response
                if kind in ("need-since", "forbidden", "error"):
                    raise RuntimeError(f"sync refused: {payload[:300]!r}")

    def _count(self, kind: str) -> None:
        c = self.counters
        c.frames += 1
        c.by_type[kind] = c.by_type.get(kind, 0) + 1

    async def reader(self) -> None:
        """Dispatch server messages until the connection closes."""
        conn = self.conn
        try:
            while True:
                payload = await conn.receive()
                now = time.perf_counter()
                kind = message_type(payload)
                self._count(kind)
                if kind == "op-re":
                    message = orjson.loads(payload)
                    operations = message.get("operations") or []
                    self.counters.ops_received += len(operations)
                    if self.on_operations is not None:
                        self.on_operations(operations, now)
                    if self.received_timestamps is not None:
                        self.received_timestamps.update(o["timestamp"] for o in operations)
                    if self.acks and operations:
                        self.counters.acks_sent += 1
                        await conn.send(
                            b'{"type":"ack","replicaId":"' + self.id.encode()
                            + b'","timestamp":"' + operations[-1]["timestamp"].encode() + b'"}'
                        )
                elif kind == "server-ack" and self.on_server_ack is not None:
                    self.on_server_ack(orjson.loads(payload)["timestamp"], now)
        except WsClosed as closed:
            self.closed = closed

    async def heartbeats(self, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        """Like the client: a heartbeat every interval (first one at a random offset)."""
        await trio.sleep(random.uniform(0, interval_s))
        while True:
            try:
                await self.conn.send(b'{"type":"heartbeat"}')
            except WsClosed:
                return
            await trio.sleep(interval_s)


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def latency_summary(samples_s: list[float]) -> dict[str, float | int | None]:
    values = sorted(samples_s)

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 2)

    return {
        "samples": len(values),
        "p50_ms": ms(percentile(values, 0.50)),
        "p90_ms": ms(percentile(values, 0.90)),
        "p99_ms": ms(percentile(values, 0.99)),
        "max_ms": ms(values[-1] if values else None),
    }
