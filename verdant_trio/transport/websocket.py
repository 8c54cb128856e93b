"""The sync websocket on a TCP stream: the `websockets` sans-IO protocol under our own I/O.

Framing, unmasking, validation, control frames and the closing handshake are the `websockets`
package's `Protocol` (C-accelerated unmasking, exhaustive RFC 6455 conformance tests, the most
used websocket implementation in Python). What is ours is the I/O around it, because that is
where the sync socket's speed comes from: bytes move with `os.read`/`os.write` on the socket's
descriptor, and the task waits with trio's `wait_readable`/`wait_writable` only when the socket
is not ready (trio's stream methods yield to the scheduler even when a call succeeds at once, and
on an idle connection that was most of what a heartbeat cost).

The read loop's rules (`receive`), so that no client can freeze or bloat the server:

- **Fairness.** The reader yields to the scheduler at least once per read from the socket and
  before every message it returns, and it hands the parser at most `MAX_FRAMES_PER_STEP` frames
  at a time, yielding between steps: however the input is cut into frames, one connection keeps
  the event loop for no more than one step's parsing.
- **Control frames are paced.** A connection may send `CONTROL_BURST` pings, pongs or closes at
  once and `CONTROL_FRAMES_PER_S` a second after that; past it, it is closed with 1008. The pongs
  the protocol owes are written before the socket is read again, so a peer that pings without
  reading stops being read (TCP holds it back) and is owed at most one step's pongs.
- **Large messages wait for memory.** A data frame that brings the message being received past
  `LARGE_MESSAGE_BYTES` reserves `MEMORY_PER_BYTE` times its size from the server-wide
  `MemoryBudget` before its payload is read; until then the socket is not read. The reservation
  passes to whoever takes the message (`take_reservation`) and is given back when they are done
  with it. A reservation not granted within `budget_wait_s` closes the connection with 1013.
- **Closes are bounded by the caller.** After a protocol error the close frame goes out at once
  and `receive` raises `Disconnected`; the connection's own `close`, under its timeout, waits for
  the peer, so the socket is gone within that timeout whatever the peer does.
"""

from __future__ import annotations

import logging
import os
import socket as stdlib_socket
from typing import Final

import trio
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Event, Protocol, Side, State

from ..engine.budget import MEMORY_PER_BYTE, MemoryBudget, MessageTooLarge, Reservation
from ..sync.codes import CloseCode
from ..sync.errors import Disconnected
from .upgrade import (
    FrameBoundaries,
    accept_response,
    fit_close_reason,
    refusal_response,
    text_frame_header,
)

log = logging.getLogger(__name__)
_protocol_log = logging.getLogger(f"{__name__}.protocol")
"""The library logs every closed connection at INFO; we log what matters ourselves."""
_protocol_log.setLevel(logging.WARNING)

RECEIVE_BYTES: Final = 64 * 1024
LARGE_FRAME_BYTES: Final = 64 * 1024
"""Outgoing frames from this size go out as our header and the payload, uncopied."""
IOV_MAX: Final = 1024
"""Buffers one `writev` takes (Linux's UIO_MAXIOV); the rest go in the next call."""
LARGE_MESSAGE_BYTES: Final = 64 * 1024
"""Incoming messages past this size (one read's worth) need a memory reservation."""
MAX_FRAMES_PER_STEP: Final = 64
"""At most this many frames are parsed between two yields (~0.3 ms of the library's time)."""
CONTROL_BURST: Final = 100
CONTROL_FRAMES_PER_S: Final = 10.0
"""Browsers never send a ping (Verdant has its own heartbeat message); these only stop floods."""
_TRANSPORT_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class StreamWebSocket:
    """A server websocket on a TCP stream: the `Transport` a `ReplicaConnection` drives.

    The reader (receive, and the pongs and close echo the protocol owes) and the writers (a
    message written at once by `write_now`, or by a task through `send`) share the socket;
    `_write` keeps their frames whole and in order. A write cancelled part of the way (a slow
    consumer being cut off) knows what is still unsent: the close finishes that frame before its
    own, and the peer reads a clean close once it reads again. The descriptor is read through the
    trio socket on every call, so once the stream is closed a late call fails instead of touching
    a reused descriptor.
    """

    __slots__ = (
        "_budget",
        "_budget_wait_s",
        "_control_at",
        "_control_tokens",
        "_eof",
        "_events",
        "_fragment_opcode",
        "_fragments",
        "_frames",
        "_input",
        "_offset",
        "_owed",
        "_protocol",
        "_received",
        "_receiving",
        "_socket",
        "_stream",
        "_torn",
        "_unsent",
        "_write_done",
        "_writing",
        "_yielded",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        *,
        max_message_bytes: int,
        budget: MemoryBudget,
        budget_wait_s: float,
        first_bytes: bytes = b"",
    ) -> None:
        self._stream = stream
        self._socket = stream.socket
        self._protocol = Protocol(Side.SERVER, max_size=max_message_bytes, logger=_protocol_log)
        self._frames = FrameBoundaries(LARGE_MESSAGE_BYTES)
        self._input = first_bytes
        """Bytes read from the socket; those before `_offset` went to the parser."""
        self._offset = 0
        self._events: list[Event] = []
        """Parsed and not yet handled, last first."""
        self._fragments: list[bytes] = []
        self._fragment_opcode = Opcode.TEXT
        self._budget = budget
        self._budget_wait_s = budget_wait_s
        self._owed = 0
        """Payload bytes announced by large frames and not reserved yet."""
        self._receiving: list[Reservation] = []
        """Reservations of the message being received."""
        self._received: list[Reservation] = []
        """Reservations of the message `receive` returned last, until taken or the next call."""
        self._control_tokens = float(CONTROL_BURST)
        self._control_at = trio.current_time()
        self._yielded = False
        """Whether the reader yielded since it last returned a message."""
        self._unsent: list[memoryview] = []
        """What a write has not sent yet: after a cancelled write, the rest of its frame, which
        goes out before anything else."""
        self._writing = False
        self._write_done: trio.Event | None = None
        """Exists only while a write is in progress and another task waits for it to end."""
        self._torn = False
        """The stream failed: nothing more can be written on it."""
        self._eof = False
        """The peer ended its side of the stream."""

    # -- the handshake -------------------------------------------------------------------------

    async def accept(self, key: str, subprotocol: str | None) -> None:
        """Answer the upgrade request: the socket is open."""
        await self._write(accept_response(key, subprotocol))

    async def refuse(self, status: int, body: bytes, retry_after_s: int | None = None) -> None:
        """Answer the upgrade request with an HTTP error instead (bounded by the caller)."""
        try:
            await self._write(refusal_response(status, body, retry_after_s=retry_after_s))
        except Disconnected:
            pass

    # -- receiving --------------------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message (see the module docstring for the rules of this loop)."""
        self.release_message()
        protocol = self._protocol
        while True:
            while self._events:
                frame = self._events.pop()  # popped: a large message's bytes go with its text
                assert isinstance(frame, Frame)  # once open, the protocol only yields frames
                message = self._message(frame)
                if message is not None:
                    if not self._yielded:
                        await trio.lowlevel.checkpoint()
                    self._yielded = False
                    self._received, self._receiving = self._receiving, []
                    return message
            if protocol.state is not State.OPEN:
                await self._flush_protocol()  # the close frame a failure queued
                self._log_close()
                raise Disconnected()
            await self._step()

    def buffered(self) -> bool:
        """Input is already here: the next `receive` may not need the peer to send more."""
        return bool(self._events) or self._offset < len(self._input)

    def take_reservation(self) -> list[Reservation]:
        """The memory reservations of the last message received: the caller now releases them
        (once the message is handled); otherwise the next `receive` does."""
        taken, self._received = self._received, []
        return taken

    def release_message(self) -> None:
        for reservation in self._received:
            reservation.release()
        self._received = []

    def release_all(self) -> None:
        """The connection is over: nothing it reserved is held any more."""
        self.release_message()
        for reservation in self._receiving:
            reservation.release()
        self._receiving = []

    def _message(self, frame: Frame) -> str | bytes | None:
        """A whole message once its last frame is here (fragments are rare: browsers never
        fragment), None for control frames and the first fragments."""
        opcode, data = frame.opcode, frame.data
        if opcode is Opcode.PING or opcode is Opcode.PONG or opcode is Opcode.CLOSE:
            return None  # the protocol answered a ping or a close already
        # The parser keeps its last frame until it parses the next one: take the payload out
        # of it, so a large message is not held twice while it is decoded and parsed.
        frame.data = b""
        if opcode is Opcode.CONT or not frame.fin:
            if opcode is not Opcode.CONT:
                self._fragment_opcode = opcode
            self._fragments.append(bytes(data))
            if not frame.fin:
                return None
            opcode, data = self._fragment_opcode, b"".join(self._fragments)
            self._fragments.clear()
        if opcode is Opcode.BINARY:
            return bytes(data)
        try:
            return bytes(data).decode("utf-8")  # bytes(): no copy, the unmasked data is bytes
        except UnicodeDecodeError:
            self._protocol.fail(CloseCode.INVALID_DATA, "text message is not valid UTF-8")
            self._events = []  # nothing after it counts
            return None

    async def _step(self) -> None:
        """Hand the parser its next piece of input, reading the socket when none is left."""
        if self._offset >= len(self._input):
            if self._owed:
                await self._reserve()
                if self._protocol.state is not State.OPEN:
                    await self._flush_protocol()
                    return
            await self._read()
        else:
            await trio.lowlevel.checkpoint()  # between two steps of one read
            self._yielded = True
        protocol = self._protocol
        if self._eof and self._offset >= len(self._input):
            protocol.receive_eof()
        else:
            data, start = self._input, self._offset
            scan = self._frames.scan(data, start, MAX_FRAMES_PER_STEP)
            if scan.control_frames and not self._allow_control(scan.control_frames):
                protocol.fail(CloseCode.POLICY, "too many control frames")
            else:
                whole = start == 0 and scan.end == len(data)
                protocol.receive_data(data if whole else data[start : scan.end])
                self._owed += scan.large_payload
            self._offset = scan.end
            if self._offset >= len(data):
                self._input, self._offset = b"", 0
        self._events = protocol.events_received()[::-1]  # popped from the end, in order
        await self._flush_protocol()

    async def _read(self) -> None:
        sock = self._socket
        while True:
            try:
                data = os.read(sock.fileno(), RECEIVE_BYTES)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                self._yielded = True
            except _TRANSPORT_ERRORS:
                self._torn = True
                data = b""
                break
        if not self._yielded:
            await trio.lowlevel.checkpoint()  # input that was already waiting: yield all the same
            self._yielded = True
        if data:
            self._input, self._offset = data, 0
        else:
            self._eof = True

    def _allow_control(self, count: int) -> bool:
        now = trio.current_time()
        tokens = min(
            float(CONTROL_BURST),
            self._control_tokens + (now - self._control_at) * CONTROL_FRAMES_PER_S,
        )
        self._control_at = now
        if tokens < count:
            log.warning("closing websocket: control frame flood frames=%d", count)
            return False
        self._control_tokens = tokens - count
        return True

    async def _reserve(self) -> None:
        """Memory for the large frames announced, before their payload is read."""
        nbytes, self._owed = self._owed * MEMORY_PER_BYTE, 0
        try:
            with trio.move_on_after(self._budget_wait_s):
                self._receiving.append(await self._budget.reserve(nbytes))
                return
        except MessageTooLarge:
            self._protocol.fail(CloseCode.TOO_BIG, "message too large for this server")
            return
        log.warning(
            "closing websocket: no memory for a large message bytes=%d waited_s=%.0f",
            nbytes // MEMORY_PER_BYTE, self._budget_wait_s,
        )
        self._protocol.fail(CloseCode.TRY_AGAIN_LATER, "server busy with large messages; retry")

    def _log_close(self) -> None:
        close = self._protocol.close_sent
        cause = self._protocol.parser_exc
        if close is not None and cause is not None and close.code != CloseCode.NORMAL:
            log.info("closing websocket: %s (%d)", cause, close.code)

    # -- sending ----------------------------------------------------------------------------

    def _frame(self, payload: bytes) -> tuple[bytes, ...]:
        protocol = self._protocol
        if protocol.state is not State.OPEN or self._torn:
            raise Disconnected()
        if len(payload) >= LARGE_FRAME_BYTES:  # no copy of a multi-megabyte sync-resp
            return text_frame_header(len(payload)), payload
        protocol.send_text(payload)
        return tuple(protocol.data_to_send())

    def write_now(self, *payloads: bytes) -> bool:
        """Write text messages, all in one write, if nothing is ahead of them; False: queue them
        for `send`.

        True means the messages are ours: what the socket did not take at once waits for `flush`
        (see `pending_output`). Never waits, so a library task can hand messages straight to the
        socket without waking another task.
        """
        if self._writing or self._unsent:
            return False
        frames = [memoryview(part) for payload in payloads for part in self._frame(payload)]
        self._unsent.extend(frames)
        try:
            self._write_some()
        except _TRANSPORT_ERRORS:
            self._torn = True
            raise Disconnected() from None
        return True

    @property
    def pending_output(self) -> bool:
        return bool(self._unsent)

    async def flush(self) -> None:
        """Finish what `write_now` started."""
        await self._write()

    async def send(self, payload: bytes) -> None:
        await self._write(*self._frame(payload))

    async def _flush_protocol(self) -> None:
        """Write what the protocol owes the peer: pongs, a close frame, the end of the stream."""
        for data in self._protocol.data_to_send():
            try:
                await self._write(data, eof=not data)
            except Disconnected:
                return

    async def _write(self, *parts: bytes, eof: bool = False) -> None:
        while self._writing:
            if self._write_done is None:
                self._write_done = trio.Event()
            await self._write_done.wait()
        if self._torn:
            raise Disconnected()
        self._writing = True
        try:
            self._unsent.extend(memoryview(part) for part in parts if part)
            await self._send_unsent()
            if eof:
                self._socket.shutdown(stdlib_socket.SHUT_WR)
        except _TRANSPORT_ERRORS:
            self._torn = True
            raise Disconnected() from None
        finally:
            self._writing = False
            if self._write_done is not None:
                self._write_done.set()
                self._write_done = None

    def _write_some(self) -> bool:
        """Write until done or the socket is full; True when nothing is left. Several frames go
        in one `writev`: one segment for the peer (or a proxy) to read, not one per frame."""
        unsent = self._unsent
        fd = self._socket.fileno()
        while unsent:
            try:
                sent = os.write(fd, unsent[0]) if len(unsent) == 1 else os.writev(fd, unsent[:IOV_MAX])
            except BlockingIOError:
                return False
            done = 0
            while done < len(unsent) and sent >= len(unsent[done]):
                sent -= len(unsent[done])
                done += 1
            del unsent[:done]
            if sent:
                unsent[0] = unsent[0][sent:]
        return True

    async def _send_unsent(self) -> None:
        # `_unsent` is exact whenever this is interrupted: a cancel can only land in the wait.
        while not self._write_some():
            await trio.lowlevel.wait_writable(self._socket)

    # -- closing ----------------------------------------------------------------------------

    async def close(self, code: int, reason: str) -> None:
        """Send our close frame (after a frame in progress), then wait, as long as the caller
        allows, for the peer's close frame and the end of the stream.

        Reading to the end matters: closing a socket with unread input makes the kernel send a
        reset, which can destroy the close frame before the peer has read it.
        """
        protocol = self._protocol
        if protocol.state is State.OPEN and not self._torn:
            protocol.send_close(code, fit_close_reason(reason))
        await self._flush_protocol()
        while protocol.state is not State.CLOSED and not self._torn:
            if self._eof and self._offset >= len(self._input):
                protocol.receive_eof()
                await self._flush_protocol()
                break
            if self._offset >= len(self._input):
                await self._read()
                continue
            protocol.receive_data(self._input[self._offset :])
            self._input, self._offset = b"", 0
            protocol.events_received()  # after our close frame, messages are discarded
            await self._flush_protocol()

    @property
    def close_code(self) -> int | None:
        """The code of the close frame the peer sent, once it has."""
        close: Close | None = self._protocol.close_rcvd
        return None if close is None else close.code
