"""The listening sockets: the sync websocket served from the TCP stream, the rest by hypercorn.

Why not let hypercorn serve the sync socket too: measured on this stack, a frame through
hypercorn's protocol objects, wsproto and ASGI events costs 2–3× what it costs here, and an idle
connection holds ~22 KB of hypercorn, h11 and wsproto state (the project's shared performance
notes, and the README's benchmark "idle"). The sync socket is the server's one hot path, so the
first request on each connection is read here: a well-formed websocket upgrade to the sync path
(`upgrade.parse_upgrade`) is served by `websocket.StreamWebSocket`; anything else (HTTP sync,
files, admin, a later upgrade on a kept-alive connection) goes to hypercorn with the bytes
already read replayed in front of the stream.

The nursery tree follows hypercorn's `worker_serve`: lifespan → connection handlers → listeners.
Shutdown stops accepting, tells hypercorn's connections to finish, and gives every handler the
graceful timeout before cancelling them (the core has already closed sync sockets with 1001).
"""

from __future__ import annotations

import logging
import os
import socket as stdlib_socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from ..engine.budget import MemoryBudget
from .linger import lingering_close
from .settings import LingerSettings
from .upgrade import (
    MAX_HEAD_BYTES,
    UpgradeRequest,
    could_be_upgrade,
    head_length,
    parse_upgrade,
)
from .websocket import RECEIVE_BYTES, StreamWebSocket

log = logging.getLogger(__name__)

_TRANSPORT_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ReplayStream(trio.abc.HalfCloseableStream):
    """The stream hypercorn serves a connection on: the bytes `_handle` already read, handed out
    again, then the socket's. The socket stays `_handle`'s: hypercorn's `send_eof` and `aclose`
    end hypercorn's use of the stream, and `_handle` closes the socket once `TCPServer.run` has
    returned, with a lingering close when hypercorn ended the connection after a request.

    Why hypercorn's close must not reach the socket: `TCPServer` serialises its `send_all`
    calls with its `send_lock`, but `_close` calls `send_eof` and `aclose` without it, from
    whichever task learns that the connection ends. When a client closes while its request's
    body is unfinished (it read a refusal's head and left), the reader task gets h11's
    protocol error and runs `_close` while an app task is between the refusal's head and its
    body. Trio's `send_eof` holds the stream's send conflict detector across a checkpoint; the
    app's `send_all` arriving then raises `BusyResourceError`, which hypercorn's `protocol_send`
    does not catch ("Error in ASGI Framework"); in the other order `aclose` closes the socket
    under a send in progress. Here nothing of hypercorn's close touches the socket: a send in
    progress completes, later sends and receives raise `ClosedResourceError` (hypercorn takes
    that as the connection ending; a receive in progress is woken with it), and the FIN and the
    close come after every hypercorn task has ended. This leans on `TCPServer`'s structure,
    which is why hypercorn's minor version is pinned.

    Neither is a cancel point either: after a response with `Connection: close` hypercorn runs
    `_close` in the app's task, and Quart cancels that task as soon as its response is sent. A
    cancellable checkpoint in `send_eof` skipped the `aclose` after it, and a connection whose
    refusal came from Quart (an HTTP sync POST with a bad token or too big a body) stayed open,
    its body read and thrown away for as long as the client kept sending.

    Hypercorn reads `socket` for the addresses and finds no `do_handshake` (so it knows the
    stream is plain TCP).
    """

    def __init__(self, stream: trio.SocketStream, replay: bytes) -> None:
        self._stream = stream
        self._replay = replay
        self.socket = stream.socket
        self._closed = False
        self._receiving: trio.CancelScope | None = None
        """Exists while a receive waits on the socket, so that `aclose` can end it."""
        self.half_closed = False
        """Hypercorn called `send_eof` before `aclose`: its `_close`, which ends a connection
        after a request (a response with `Connection: close`, a broken request), not the idle
        timeout's close of a connection between requests."""
        self.peer_ended = False
        """The peer's end of stream or a reset was read: it sends nothing more."""

    def _check_open(self) -> None:
        if self._closed or self.half_closed:
            raise trio.ClosedResourceError("hypercorn has closed this connection")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError("hypercorn has closed this connection")
        if self._replay:
            data, self._replay = self._replay, b""
            await trio.lowlevel.checkpoint()
            return data
        with trio.CancelScope() as self._receiving:
            try:
                data = await self._stream.receive_some(max_bytes)
            except trio.BrokenResourceError:
                self.peer_ended = True
                raise
            finally:
                self._receiving = None
            if not data:
                self.peer_ended = True
            return data
        raise trio.ClosedResourceError("hypercorn has closed this connection")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("hypercorn has closed this connection")
        self.half_closed = True
        # Not a cancel point, so that the `aclose` that follows happens: see the class docstring.
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        self._closed = True
        if self._receiving is not None:
            self._receiving.cancel()
        await trio.lowlevel.cancel_shielded_checkpoint()


async def read_first_head(stream: trio.SocketStream, timeout_s: float) -> bytes:
    """What the client sent first, read until it is a whole request head or plainly not an
    upgrade (or the head limit, end of stream, or timeout). Whatever was read is returned."""
    data = bytearray()
    sock = stream.socket
    with trio.move_on_after(timeout_s):
        while could_be_upgrade(data) and not head_length(data) and len(data) < MAX_HEAD_BYTES:
            # os.read on the descriptor, waiting only when nothing is there: the stream's own
            # receive costs several times as much, and this runs for every connection
            try:
                chunk = os.read(sock.fileno(), RECEIVE_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not chunk:
                break
            data += chunk
    return bytes(data)


SyncSocketHandler = Callable[[UpgradeRequest, StreamWebSocket, str], Awaitable[None]]
"""Serves one upgraded sync socket: (request, transport, client address)."""


class Listeners:
    """Accepts connections and routes each by its first request (see the module docstring)."""

    def __init__(
        self,
        asgi: Any,
        config: HypercornConfig,
        *,
        is_sync_path: Callable[[str], bool],
        sync_socket: SyncSocketHandler,
        budget: MemoryBudget,
        budget_wait_s: float,
        linger: LingerSettings | None = None,
    ) -> None:
        """`config.websocket_max_message_size` bounds our sockets' messages as hypercorn's;
        `budget` is the memory large messages share (`budget_wait_s`: how long one waits);
        `linger` bounds the draining of a connection hypercorn closed after a request."""
        self._app = wrap_app(asgi, config.wsgi_max_body_size, "asgi")
        self._config = config
        self._is_sync_path = is_sync_path
        self._sync_socket = sync_socket
        self._budget = budget
        self._budget_wait_s = budget_wait_s
        self._linger = linger or LingerSettings()
        self._context = WorkerContext(None)
        self._lifespan_state: LifespanState = {}

    async def serve(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[None]],
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `shutdown_trigger` returns; reports the bound addresses once listening."""
        config = self._config
        config.set_statsd_logger_class(StatsdLogger)
        lifespan = Lifespan(self._app, config, self._lifespan_state)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            async with trio.open_nursery() as handlers:
                sockets = config.create_sockets()
                listeners = []
                binds = []
                for sock in sockets.insecure_sockets:
                    sock.listen(config.backlog)
                    listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                    binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
                task_status.started(binds)
                try:
                    async with trio.open_nursery() as accepting:
                        accepting.start_soon(
                            partial(
                                trio.serve_listeners, self._handle, listeners,
                                handler_nursery=handlers,
                            )
                        )
                        await shutdown_trigger()
                        accepting.cancel_scope.cancel()
                finally:
                    await self._context.terminated.set()
                    handlers.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel()

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            try:
                first = await read_first_head(stream, self._config.keep_alive_timeout)
            except _TRANSPORT_ERRORS:
                return
            if not first:
                return
            end = head_length(first)
            upgrade = parse_upgrade(first[:end]) if end else None
            if upgrade is not None and self._is_sync_path(upgrade.path):
                transport = StreamWebSocket(
                    stream,
                    max_message_bytes=self._config.websocket_max_message_size,
                    budget=self._budget,
                    budget_wait_s=self._budget_wait_s,
                    first_bytes=first[end:],
                )
                del first  # the head is read; an idle connection should not keep it
                await self._sync_socket(upgrade, transport, _peer(stream))
                return
            served = ReplayStream(stream, first)
            await TCPServer(
                self._app, self._config, self._context,
                ConnectionState(self._lifespan_state.copy()),
                served,  # type: ignore[arg-type]  # duck-typed: see ReplayStream
            )
            if served.half_closed and not served.peer_ended:
                # the client may still be sending the body of the request just answered
                await lingering_close(stream, self._linger, _peer(stream))
        finally:
            await trio.aclose_forcefully(stream)


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if stream.socket.family in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6):
        return str(address[0])
    return str(address) or "unix"
