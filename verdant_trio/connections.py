"""Connected replicas: one connection object per websocket, one per HTTP sync request.

A websocket connection owns three tasks in its own nursery:
- the reader parses frames, answers `heartbeat` itself (the client gives up after 3 s, so a
  heartbeat is never queued behind a busy library; with nothing queued for the writer it writes
  the answer at once instead of waking the writer) and puts library messages on a small bounded
  inbound channel;
- the forwarder moves them into the library's inbox (blocking there is backpressure);
- the writer drains the bounded outbound channel into the socket.

Silence is not timed per read: the core sweeps its connections and closes those that sent
nothing, not even a heartbeat, for the idle timeout (`close_if_idle`).

Backpressure story: a peer that stops reading fills its TCP buffer, then the writer blocks, then
its outbound channel fills; the library never waits for it. The next message the library hands
over finds the channel full and the connection is closed with 1013 ("try again later") and a log
line. The client reconnects and resyncs from its last acknowledged position, so nothing is lost
and a slow consumer can never make the server's memory grow.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from .errors import ErrorCode
from .libraries import LibraryGone
from .library import decode_nonce
from .observe import NULL_OBSERVER, Observer
from .protocol import (
    Ack,
    ClientMessage,
    Heartbeat,
    ProtocolError,
    ReplicaType,
    Sync,
    encode,
    parse_client_message,
    wire_type,
)
from .tokens import TokenInfo

log = logging.getLogger(__name__)

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013
CLOSE_IDLE: Final = 4008
"""Application close code: no frame (not even a heartbeat) within the idle timeout."""

HEARTBEAT_RESPONSE: Final = encode({"type": "heartbeat-response"})
_keys = itertools.count(1)


def next_key() -> int:
    return next(_keys)


class Disconnected(Exception):
    """The websocket is gone (closed by the peer, or the transport failed)."""


class Transport(Protocol):
    """The few websocket operations a connection needs, whatever serves the socket."""

    async def receive(self) -> str | bytes: ...

    async def send(self, text: str) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class LibraryPort(Protocol):
    """What a connection needs of its library (a `LibraryHost`, possibly wrapped)."""

    async def attach(self, peer: Any) -> None: ...

    def detach(self, peer: Any) -> None: ...

    async def submit(self, peer: Any, messages: list[ClientMessage]) -> None: ...


def split_for_library(messages: list[ClientMessage]) -> list[list[ClientMessage]]:
    """Group read-ahead messages for the library: merge waiting acks, keep syncs alone.

    Order is kept except that an ack moves to the end of the run it was merged into, which
    is harmless: acknowledgements are monotonic and nothing in the run depends on them.
    """
    groups: list[list[ClientMessage]] = []
    run: list[ClientMessage] = []
    acks: dict[str, Ack] = {}

    def close_run() -> None:
        if acks:
            run.extend(acks.values())
            acks.clear()
        if run:
            groups.append(run.copy())
            run.clear()

    for message in messages:
        if isinstance(message, Sync):
            close_run()
            groups.append([message])
        elif isinstance(message, Ack):
            acks[message.replica_id] = merge_acks(acks.get(message.replica_id), message)
        else:
            run.append(message)
    close_run()
    return groups


def merge_acks(earlier: Ack | None, later: Ack) -> Ack:
    if earlier is None:
        return later
    timestamp = max(filter(None, (earlier.timestamp, later.timestamp)), default=None)
    nonce = later.nonce or earlier.nonce
    if earlier.nonce and later.nonce:
        orders = [decode_nonce(n) for n in (earlier.nonce, later.nonce)]
        nonce = later.nonce if (orders[1] or 0) >= (orders[0] or 0) else earlier.nonce
    return Ack(replica_id=later.replica_id, timestamp=timestamp, nonce=nonce)


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    outbound_queue: int = 1024
    inbound_queue: int = 64
    idle_timeout_s: float = 120.0
    max_protocol_errors: int = 16
    close_timeout_s: float = 2.0
    slow_close_timeout_s: float = 30.0
    """How long a slow consumer's close (1013) waits for it to read what is in flight."""


def error_frame(message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> str:
    """Not a reference message type: clients ignore it, developers read it in the devtools."""
    return encode({"type": "error", "code": int(code), "message": message})


class ReplicaConnection:
    """A websocket from one replica (a `Peer` of its library)."""

    realtime = True

    def __init__(
        self,
        info: TokenInfo,
        transport: Transport,
        settings: ConnectionSettings,
        *,
        profile: Any = None,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.key = next_key()
        self.user_id = info.user_id
        self.type: ReplicaType = info.type
        self.library_id = info.library_id
        self.replica_id: str | None = None
        self.profile = profile if profile is not None else {"id": info.user_id}
        self._transport = transport
        self._settings = settings
        self._observer = observer
        self._out_send, self._out_receive = trio.open_memory_channel[str](settings.outbound_queue)
        self._in_send, self._in_receive = trio.open_memory_channel[Any](settings.inbound_queue)
        self._outbound = 0
        """Messages handed to the writer and not yet written (queued or in its hands)."""
        self._cancel: trio.CancelScope | None = None
        self.last_heard = time.monotonic()
        """When the last frame arrived; see `close_if_idle`."""
        self.close_code = CLOSE_NORMAL
        self.close_reason = ""
        self.closing = False

    # -- Peer -------------------------------------------------------------------------------

    def deliver(self, text: str) -> None:
        if self.closing:
            return
        try:
            self._out_send.send_nowait(text)
            self._outbound += 1
        except trio.WouldBlock:
            log.warning(
                "closing slow consumer: outbound queue full library=%s user=%s replica=%s "
                "queue=%d",
                self.library_id, self.user_id, self.replica_id, self._settings.outbound_queue,
            )
            self._observer.slow_consumer()
            self.close_soon(CLOSE_TRY_AGAIN_LATER, "outbound queue full (slow consumer)")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def close_soon(self, code: int, reason: str) -> None:
        """Close from anywhere on the event loop: the connection's tasks end and it closes."""
        if self.closing:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason
        if self._cancel is not None:
            self._cancel.cancel()

    # -- tasks ------------------------------------------------------------------------------

    async def serve(self, host: LibraryPort) -> None:
        """Run until the peer goes or the connection is closed; then close the socket."""
        try:
            await host.attach(self)
        except LibraryGone:
            await self._close(CLOSE_TRY_AGAIN_LATER, "library is restarting")
            return
        try:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                if self.closing:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._until_disconnected, self._writer)
                nursery.start_soon(self._forwarder, host)
                await self._until_disconnected(self._reader)
                nursery.cancel_scope.cancel()
        finally:
            host.detach(self)
            self.closing = True
            self._out_send.close()
            await self._close(self.close_code, self.close_reason)

    async def _close(self, code: int, reason: str) -> None:
        """Bounded and shielded, so a shutdown still closes cleanly; a slow consumer's close
        may wait longer for the peer to read on (it sees 1013 when it does), but not shielded,
        so a shutdown cuts that wait short."""
        slow = code == CLOSE_TRY_AGAIN_LATER
        timeout_s = self._settings.slow_close_timeout_s if slow else self._settings.close_timeout_s
        with trio.move_on_after(timeout_s) as scope:
            scope.shield = not slow
            try:
                await self._transport.close(code, reason[:120])
            except Disconnected:
                pass

    async def _until_disconnected(self, task: Callable[[], Awaitable[None]]) -> None:
        """A gone peer is the normal end of a connection, not an error of the nursery."""
        try:
            await task()
        except Disconnected:
            self.closing = True
            if self._cancel is not None:
                self._cancel.cancel()

    def close_if_idle(self, now: float) -> None:
        """Called by the core's sweep (one timer for all connections, instead of a cancel scope
        around every read: that was measurable per heartbeat)."""
        if self.closing or now - self.last_heard < self._settings.idle_timeout_s:
            return
        log.info(
            "closing idle connection library=%s user=%s replica=%s",
            self.library_id, self.user_id, self.replica_id,
        )
        self.close_soon(CLOSE_IDLE, "idle: no message or heartbeat")

    async def _reader(self) -> None:
        errors = 0
        while True:
            raw = await self._transport.receive()
            self.last_heard = time.monotonic()
            try:
                if isinstance(raw, (bytes, bytearray)):
                    raise ProtocolError("binary frames are not part of the protocol; send text")
                message = parse_client_message(raw)
            except ProtocolError as exc:
                errors += 1
                self._observer.message_in("invalid")
                log.info(
                    "refused message library=%s user=%s replica=%s error=%s",
                    self.library_id, self.user_id, self.replica_id, exc,
                )
                self.deliver(error_frame(str(exc)))
                if errors >= self._settings.max_protocol_errors:
                    self.close_soon(CLOSE_POLICY, "too many invalid messages")
                    return
                continue
            self._observer.message_in(wire_type(message))
            if isinstance(message, Heartbeat):
                if self._outbound or self.closing:
                    self.deliver(HEARTBEAT_RESPONSE)
                else:  # nothing queued or being written: answer now, in order, writer asleep
                    await self._transport.send(HEARTBEAT_RESPONSE)
                continue
            await self._in_send.send(message)

    async def _forwarder(self, host: LibraryPort) -> None:
        """Hand everything read so far to the library in one envelope.

        Acknowledgements waiting together are merged (a replica's acknowledged time and server
        order only move forward, so the newest of each says all), and a `sync` travels alone so
        the server-wide limit on concurrent initial syncs can wait for it to finish.
        """
        receive = self._in_receive
        while True:
            try:
                pending = [await receive.receive()]
            except trio.EndOfChannel:
                return
            while len(pending) < self._settings.inbound_queue:
                try:
                    pending.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                for group in split_for_library(pending):
                    await host.submit(self, group)
            except LibraryGone:
                self.close_soon(CLOSE_TRY_AGAIN_LATER, "library is restarting")
                return

    async def _writer(self) -> None:
        async for text in self._out_receive:
            await self._transport.send(text)
            self._outbound -= 1


class HttpPeer:
    """One HTTP sync request: collects what the library says to it until the batch is done."""

    realtime = False

    def __init__(self, info: TokenInfo, *, profile: Any = None, max_messages: int = 10_000) -> None:
        self.key = next_key()
        self.user_id = info.user_id
        self.type: ReplicaType = info.type
        self.replica_id: str | None = None
        self.profile = profile if profile is not None else {"id": info.user_id}
        self.texts: list[str] = []
        self._max = max_messages
        self.truncated = False

    def deliver(self, text: str) -> None:
        # Bounded: a request lives for one batch, but broadcasts from other replicas in that
        # batch reach it too. Past the bound the client simply pulls again.
        if len(self.texts) >= self._max:
            self.truncated = True
            return
        self.texts.append(text)

    def body(self) -> bytes:
        return ('{"messages":[' + ",".join(self.texts) + "]}").encode()
