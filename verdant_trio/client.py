"""A small Verdant protocol client on trio-websocket: for protocol tests, tools and load generation.

It speaks the wire protocol directly (no local store): connect with a token, send messages,
receive parsed server messages. `wait_for` keeps messages it skips, so a test can wait for one
reply without losing the broadcasts that arrived first.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from .sync.protocol import ReplicaType

__all__ = ["Closed", "ReplicaType", "VerdantClient", "connect", "timestamp"]

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_clock = {"time": 0, "counter": 0}


def _base36(value: int, width: int) -> str:
    digits = ""
    while value:
        value, rem = divmod(value, 36)
        digits = _BASE36[rem] + digits
    return digits.rjust(width, "0")


def format_timestamp(version: int, time_ms: int, counter: int, node: str) -> str:
    """Verdant's hybrid-logical-clock format (the client's own, so real clients can read it):
    schema version, wall-clock milliseconds and a counter in base 36, then a 7-character node."""
    return _base36(version, 4) + _base36(time_ms, 9) + _base36(counter, 4) + node


def timestamp(version: int = 1, node: str = "pytrio0") -> str:
    """A timestamp of this process's clock; successive calls always sort later."""
    now = int(time.time() * 1000)
    if now > _clock["time"]:
        _clock["time"], _clock["counter"] = now, 0
    else:
        _clock["counter"] += 1
    return format_timestamp(version, _clock["time"], _clock["counter"], node.rjust(7, "0")[:7])


class Closed(Exception):
    """The server closed the connection; `code` and `reason` say why."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        super().__init__(f"connection closed: {code} {reason or ''}".strip())
        self.code = code
        self.reason = reason


def _closed(exc: ConnectionClosed) -> Closed:
    reason = exc.reason
    return Closed(reason.code if reason else None, reason.reason if reason else None)


class VerdantClient:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._pending: deque[dict[str, Any]] = deque()

    @property
    def subprotocol(self) -> str | None:
        return self.ws.subprotocol

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_raw(orjson.dumps(message).decode())

    async def send_raw(self, data: str | bytes) -> None:
        try:
            await self.ws.send_message(data)
        except ConnectionClosed as exc:
            raise _closed(exc) from None

    async def receive(self, timeout_s: float = 10.0) -> dict[str, Any]:
        if self._pending:
            return self._pending.popleft()
        return await self._read(timeout_s)

    async def _read(self, timeout_s: float) -> dict[str, Any]:
        with trio.fail_after(timeout_s):
            try:
                raw = await self.ws.get_message()
            except ConnectionClosed as exc:
                raise _closed(exc) from None
        message = orjson.loads(raw)
        assert isinstance(message, dict)
        return message

    async def wait_for(
        self,
        match: str | Callable[[dict[str, Any]], bool],
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:
        """The first message of a type (or matching a predicate); others are kept for later."""
        predicate = (lambda m: m.get("type") == match) if isinstance(match, str) else match
        for i, message in enumerate(self._pending):
            if predicate(message):
                del self._pending[i]
                return message
        deadline = trio.current_time() + timeout_s
        while True:
            message = await self._read(max(0.0, deadline - trio.current_time()))
            if predicate(message):
                return message
            self._pending.append(message)

    def drain(self) -> list[dict[str, Any]]:
        """Messages received and skipped so far."""
        items = list(self._pending)
        self._pending.clear()
        return items

    async def receive_all(self, quiet_s: float = 0.2) -> list[dict[str, Any]]:
        """Everything that arrives until the connection is quiet for `quiet_s`."""
        items = self.drain()
        while True:
            with trio.move_on_after(quiet_s):
                items.append(await self._read(quiet_s + 1))
                continue
            return items

    async def wait_closed(self, timeout_s: float = 10.0) -> int | None:
        """Read (and drop) messages until the server closes the socket; its close code."""
        with trio.fail_after(timeout_s):
            while True:
                try:
                    await self._read(timeout_s)
                except Closed as closed:
                    return closed.code

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.aclose(code, reason)

    @property
    def close_code(self) -> int | None:
        closed = self.ws.closed
        return closed.code if closed else None

    # -- message helpers --------------------------------------------------------------------

    async def sync(
        self,
        replica_id: str,
        *,
        operations: list[dict[str, Any]] | None = None,
        baselines: list[dict[str, Any]] | None = None,
        since: str | None = None,
        resync_all: bool | None = None,
        ts: str | None = None,
    ) -> dict[str, Any]:
        """Send `sync` and return the `sync-resp` (or `need-since`/`forbidden`)."""
        await self.send(sync_message(
            replica_id, operations=operations, baselines=baselines, since=since,
            resync_all=resync_all, ts=ts,
        ))
        return await self.wait_for(
            lambda m: m.get("type") in ("sync-resp", "need-since", "forbidden", "error")
        )

    async def op(
        self, replica_id: str, operations: list[dict[str, Any]], ts: str | None = None
    ) -> str:
        stamp = ts or timestamp()
        await self.send(
            {"type": "op", "replicaId": replica_id, "timestamp": stamp, "operations": operations}
        )
        return stamp


def sync_message(
    replica_id: str,
    *,
    operations: list[dict[str, Any]] | None = None,
    baselines: list[dict[str, Any]] | None = None,
    since: str | None = None,
    resync_all: bool | None = None,
    ts: str | None = None,
) -> dict[str, Any]:
    """A `sync` message as the client sends it (schema version 1)."""
    message: dict[str, Any] = {
        "type": "sync",
        "replicaId": replica_id,
        "timestamp": ts or timestamp(),
        "operations": operations or [],
        "baselines": baselines or [],
        "schemaVersion": 1,
        "since": since,
    }
    if resync_all is not None:
        message["resyncAll"] = resync_all
    return message


@contextlib.asynccontextmanager
async def connect(
    url: str,
    token: str,
    *,
    via: str = "subprotocol",
    max_message_bytes: int = 100 * 1024 * 1024,
    message_queue_size: int = 1024,
    connect_timeout_s: float = 10.0,
) -> AsyncIterator[VerdantClient]:
    """Open a sync websocket the way the Verdant client does (`Bearer, <token>` subprotocols),
    or with `?token=` (`via="query"`)."""
    ws_url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    subprotocols: list[str] | None = ["Bearer", token]
    if via == "query":
        ws_url += ("&" if "?" in ws_url else "?") + "token=" + token
        subprotocols = None
    async with open_websocket_url(
        ws_url,
        subprotocols=subprotocols,
        max_message_size=max_message_bytes,
        message_queue_size=message_queue_size,
        connect_timeout=connect_timeout_s,
    ) as ws:
        yield VerdantClient(ws)
