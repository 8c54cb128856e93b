"""Connected replicas: one connection object per websocket, one per HTTP sync request.

A websocket connection is one task while it is idle: the reader, which parses each message,
answers `heartbeat` itself (the client gives up after 3 s, so a heartbeat is never queued behind
a busy library) and hands library messages to the library's inbox without waiting. Two more
tasks exist only while there is a backlog, each started from here in the connection's own
nursery and ending when its backlog is empty:

- the forwarder, while the library's inbox is full, a `sync` waits for the server-wide limit on
  concurrent syncs, or a large message waits to be handled before its memory is given back;
  while it works, the reader keeps reading (and answering heartbeats) until the backlog holds
  `inbound_queue` messages, then it stops reading: that is backpressure, down to TCP;
- the writer, while the socket does not take what the library hands over. Otherwise a message
  is written to the socket at once by whoever delivers it, without waking any task.

Measured, a parked task costs ~2 KB and a memory channel pair ~1.8 KB: an idle connection with
three tasks and two channels held more than the whole connection of the Node server.

Silence is not timed per read: the core sweeps its connections and closes those that sent
nothing, not even a heartbeat, for the idle timeout (`close_if_idle`).

Backpressure story: a peer that stops reading fills its TCP buffer, then what the library hands
over waits in the connection's outbox; the library never waits for it. Once the outbox holds
`outbound_queue` messages the connection is closed with 1013 ("try again later") and a log line.
The client reconnects and resyncs from its last acknowledged position, so nothing is lost and a
slow consumer can never make the server's memory grow.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Any, Final, Protocol

import trio

from ..sync.codes import CloseCode
from ..sync.decisions import decode_nonce
from ..sync.errors import Disconnected, ErrorCode
from ..sync.protocol import (
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
from ..sync.tokens import TokenInfo
from .budget import Reservation
from .library import LibraryGone
from .observe import NULL_OBSERVER, Observer
from .settings import ConnectionSettings

log = logging.getLogger(__name__)


HEARTBEAT_RESPONSE: Final = encode({"type": "heartbeat-response"})
_keys = itertools.count(1)


def next_key() -> int:
    return next(_keys)


class Transport(Protocol):
    """The websocket operations a connection needs, whatever serves the socket."""

    async def receive(self) -> str | bytes:
        """The next message."""

    def buffered(self) -> bool:
        """More input is already here: the next `receive` may not wait for the peer."""

    def take_reservation(self) -> list[Reservation]:
        """The memory held for the last message received; the caller releases it."""

    def release_all(self) -> None:
        """The connection is over: give back any memory reserved for its messages."""

    def write_now(self, *payloads: bytes) -> bool:
        """Write text messages (in one write) without waiting if nothing is ahead of them;
        False: `send` them."""

    @property
    def pending_output(self) -> bool:
        """Part of a message `write_now` took still waits for `flush`."""

    async def flush(self) -> None: ...

    async def send(self, payload: bytes) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class LibraryPort(Protocol):
    """What a connection needs of its library (a `LibraryHost`, possibly wrapped)."""

    async def attach(self, peer: Any) -> None: ...

    def detach(self, peer: Any) -> None: ...

    def submit_nowait(self, peer: Any, messages: list[ClientMessage]) -> bool:
        """Queue messages if the inbox has room (False: it is full); never for a `sync`."""

    async def submit(
        self, peer: Any, messages: list[ClientMessage], *, wait: bool = False
    ) -> None: ...


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


def error_frame(message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> bytes:
    """Not a reference message type: clients ignore it, developers read it in the devtools."""
    return encode({"type": "error", "code": int(code), "message": message})


_Backlog = deque[tuple[list[ClientMessage], list[Reservation]]]


class ReplicaConnection:
    """A websocket from one replica (a `Peer` of its library)."""

    realtime = True
    __slots__ = (
        "_backlog", "_backlog_messages", "_drained", "_errors", "_nursery", "_observer", "_outbox",
        "_room", "_settings", "_transport", "close_code", "close_reason", "closing", "key",
        "last_heard", "library_id", "profile", "replica_id", "type", "user_id",
    )

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
        self._nursery: trio.Nursery | None = None
        self._outbox: deque[bytes] | None = None
        """Messages waiting for the socket; exists only while the writer task does. Bounded by
        `outbound_queue`: past it, the connection is closed (slow consumer)."""
        self._backlog: _Backlog | None = None
        """Messages waiting for the library; exists only while the forwarder task does.
        Bounded by `inbound_queue` messages: past it, the reader waits (backpressure)."""
        self._backlog_messages = 0
        self._errors = 0
        """Invalid messages so far; at `max_protocol_errors` the connection is closed."""
        self._drained: trio.Event | None = None
        """Set when the forwarder ends, while the connection waits for it (`_drain`)."""
        self._room: trio.Event | None = None
        """Set when the forwarder takes from a full backlog (the reader waits for it)."""
        self.last_heard = trio.current_time()
        """When the last message arrived; see `close_if_idle`."""
        self.close_code: int = CloseCode.NORMAL
        self.close_reason = ""
        self.closing = False

    # -- Peer -------------------------------------------------------------------------------

    def deliver(self, *payloads: bytes) -> None:
        """Hand messages to the socket, or to the writer if the socket is behind; never waits."""
        if self.closing or not payloads:
            return
        outbox = self._outbox
        if outbox is None:
            try:
                if self._transport.write_now(*payloads):
                    if self._transport.pending_output:
                        self._start_writer()
                    return
            except Disconnected:
                self._gone()
                return
            outbox = self._start_writer()
        if len(outbox) + len(payloads) > self._settings.outbound_queue:
            log.warning(
                "closing slow consumer: outbound queue full library=%s user=%s replica=%s "
                "queue=%d",
                self.library_id, self.user_id, self.replica_id, self._settings.outbound_queue,
            )
            self._observer.slow_consumer()
            self.close_soon(CloseCode.TRY_AGAIN_LATER, "outbound queue full (slow consumer)")
            return
        outbox.extend(payloads)

    def close_soon(self, code: int, reason: str) -> None:
        """Close from anywhere on the event loop: the connection's tasks end and it closes."""
        if self.closing:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _gone(self) -> None:
        """The peer went (or the socket failed): nothing more is said to it.

        The reader is not cancelled: it may hold messages the peer sent before its close frame
        (read ahead in the same packet, the usual way a client leaves), and it ends by itself
        with `Disconnected` once it has handed them over, since the input is already here (a
        torn socket fails its reads as well as its writes).
        """
        self.closing = True

    # -- the connection's life --------------------------------------------------------------

    async def serve(self, host: LibraryPort) -> None:
        """Run until the peer goes or the connection is closed; then close the socket."""
        try:
            await host.attach(self)
        except LibraryGone:
            await self._close(CloseCode.TRY_AGAIN_LATER, "library is restarting")
            return
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.closing:
                    nursery.cancel_scope.cancel()
                if self._outbox is not None:  # delivered to before the nursery existed
                    nursery.start_soon(self._writer, self._outbox)
                try:
                    await self._reader(host)
                except Disconnected:
                    self.closing = True
                    await self._drain()
                except LibraryGone:
                    self.close_soon(CloseCode.TRY_AGAIN_LATER, "library is restarting")
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            host.detach(self)
            self.closing = True
            self._drop_backlog()
            self._transport.release_all()
            await self._close(self.close_code, self.close_reason)

    async def _close(self, code: int, reason: str) -> None:
        """Bounded and shielded, so a shutdown still closes cleanly; a slow consumer's close
        may wait longer for the peer to read on (it sees 1013 when it does), but not shielded,
        so a shutdown cuts that wait short."""
        slow = code == CloseCode.TRY_AGAIN_LATER
        timeout_s = self._settings.slow_close_timeout_s if slow else self._settings.close_timeout_s
        with trio.move_on_after(timeout_s) as scope:
            scope.shield = not slow
            try:
                await self._transport.close(code, reason[:120])
            except Disconnected:
                pass

    def close_if_idle(self, now: float) -> None:
        """Called by the core's sweep (one timer for all connections, instead of a cancel scope
        around every read: that was measurable per heartbeat)."""
        if self.closing or now - self.last_heard < self._settings.idle_timeout_s:
            return
        log.info(
            "closing idle connection library=%s user=%s replica=%s",
            self.library_id, self.user_id, self.replica_id,
        )
        self.close_soon(CloseCode.IDLE, "idle: no message or heartbeat")

    # -- reading ----------------------------------------------------------------------------

    async def _reader(self, host: LibraryPort) -> None:
        """Read until the peer goes; library messages go out once per run of buffered input."""
        transport = self._transport
        pending: list[ClientMessage] = []
        reservations: list[Reservation] = []
        while True:
            try:
                raw = await transport.receive()
            except Disconnected:
                # What the peer sent before it went is handled like the rest: a client closes
                # right after its last `op` (and `disconnecting`), often in the same packet.
                if pending:
                    await self._forward(host, pending, reservations)
                raise
            message = self._parse(raw)
            del raw
            self.last_heard = trio.current_time()
            if isinstance(message, Heartbeat):
                self.deliver(HEARTBEAT_RESPONSE)
            elif message is not None:
                pending.append(message)
                reservations += transport.take_reservation()
            message = None  # nothing of a large message stays with this frame while it waits
            if pending and not transport.buffered():
                await self._forward(host, pending, reservations)
                pending, reservations = [], []

    def _parse(self, raw: str | bytes) -> ClientMessage | None:
        """The message, or None after answering an invalid one with an error frame."""
        try:
            if isinstance(raw, (bytes, bytearray)):
                raise ProtocolError("binary frames are not part of the protocol; send text")
            message = parse_client_message(raw)
        except ProtocolError as exc:
            self._errors += 1
            self._observer.message_in("invalid")
            log.info(
                "refused message library=%s user=%s replica=%s error=%s",
                self.library_id, self.user_id, self.replica_id, exc,
            )
            self.deliver(error_frame(str(exc)))
            if self._errors >= self._settings.max_protocol_errors:
                self.close_soon(CloseCode.POLICY, "too many invalid messages")
            return None
        self._observer.message_in(wire_type(message))
        return message

    async def _forward(
        self, host: LibraryPort, messages: list[ClientMessage], reservations: list[Reservation]
    ) -> None:
        """Hand everything read in one run to the library, in one envelope per group.

        Acknowledgements waiting together are merged (a replica's acknowledged time and server
        order only move forward, so the newest of each says all), and a `sync` travels alone so
        the server-wide limit on concurrent initial syncs can wait for it to finish. Straight
        into the inbox when it has room; else, and for a sync or a large message (its memory
        is held until the library has handled it), through the forwarder.
        """
        groups = split_for_library(messages)
        if self._backlog is None and not reservations:
            while groups and not isinstance(groups[0][0], Sync):
                if not host.submit_nowait(self, groups[0]):
                    break
                del groups[0]
            if not groups:
                return
        backlog = self._backlog
        if backlog is None:
            assert self._nursery is not None
            backlog = self._backlog = deque()
            self._nursery.start_soon(self._forwarder, host, backlog)
        for group in groups[:-1]:
            backlog.append((group, []))
        backlog.append((groups[-1], reservations))
        self._backlog_messages += sum(len(group) for group in groups)
        while self._backlog_messages >= self._settings.inbound_queue and self._backlog is not None:
            self._room = trio.Event()
            await self._room.wait()

    async def _forwarder(self, host: LibraryPort, backlog: _Backlog) -> None:
        try:
            while backlog:
                group, reservations = backlog[0]
                try:
                    await host.submit(self, group, wait=bool(reservations))
                finally:
                    for reservation in reservations:
                        reservation.release()
                    reservations.clear()
                backlog.popleft()
                self._backlog_messages -= len(group)
                if self._room is not None:
                    self._room.set()
                    self._room = None
        except LibraryGone:
            self.close_soon(CloseCode.TRY_AGAIN_LATER, "library is restarting")
        finally:
            if self._backlog is backlog:
                self._drop_backlog()
            if self._drained is not None:
                self._drained.set()

    async def _drain(self) -> None:
        """Let the forwarder hand the library what the peer sent before it went, for at most
        `close_timeout_s` (the backlog holds at most `inbound_queue` messages)."""
        if self._backlog is None:
            return
        drained = self._drained = trio.Event()
        with trio.move_on_after(self._settings.close_timeout_s):
            await drained.wait()

    def _drop_backlog(self) -> None:
        backlog, self._backlog = self._backlog, None
        self._backlog_messages = 0
        for _, reservations in backlog or ():
            for reservation in reservations:
                reservation.release()
        if self._room is not None:
            self._room.set()
            self._room = None

    # -- writing ----------------------------------------------------------------------------

    def _start_writer(self) -> deque[bytes]:
        outbox = self._outbox = deque()
        if self._nursery is not None:
            self._nursery.start_soon(self._writer, outbox)
        return outbox

    async def _writer(self, outbox: deque[bytes]) -> None:
        transport = self._transport
        try:
            await transport.flush()
            while outbox:
                await transport.send(outbox.popleft())
        except Disconnected:
            self._gone()
        finally:
            if self._outbox is outbox:
                self._outbox = None


class HttpPeer:
    """One HTTP sync request: collects what the library says to it until the batch is done."""

    realtime = False

    def __init__(self, info: TokenInfo, *, profile: Any = None, max_messages: int = 10_000) -> None:
        self.key = next_key()
        self.user_id = info.user_id
        self.type: ReplicaType = info.type
        self.replica_id: str | None = None
        self.profile = profile if profile is not None else {"id": info.user_id}
        self.payloads: list[bytes] = []
        self._max = max_messages
        self.truncated = False

    def close_soon(self, code: int, reason: str) -> None:
        """A request ends with its batch; there is no connection to close."""

    def deliver(self, *payloads: bytes) -> None:
        # Bounded: a request lives for one batch, but broadcasts from other replicas in that
        # batch reach it too. Past the bound the client simply pulls again.
        for payload in payloads:
            if len(self.payloads) >= self._max:
                self.truncated = True
                return
            self.payloads.append(payload)

    def body(self) -> bytes:
        return b'{"messages":[' + b",".join(self.payloads) + b"]}"
