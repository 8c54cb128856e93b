"""The Verdant core: everything a transport needs, with no HTTP framework in sight.

`open_core` starts the nursery that owns every library task and yields a `VerdantCore`. The
Quart app, the embedding blueprint and the CLI all drive the same core: websocket connections,
HTTP sync batches, files (`core.files`) and the admin operations (`core.admin`).

In a cluster the core is given `owns(library_id)` and serves only what it owns: a websocket for
another node's library is refused with 503 (5030) before the upgrade, after a hold
(`refusal_delay_s`, under the handshake limiter: `@verdant-web/store` 3.6.3 reconnects a
refused socket at once, forever, so an immediate refusal would make it spin; the hold ends early
when what the server owns changes, `ownership_changed`); HTTP requests get the same 503 at once
(pull clients retry after their interval). `release` stops serving.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from ..storage.files import FileStorage
from ..storage.names import check_id
from ..sync.codes import CloseCode
from ..sync.errors import ErrorCode, VerdantError
from ..sync.protocol import (
    ClientMessage,
    Heartbeat,
    ProtocolError,
    Sync,
    validate_client_message,
    wire_type,
)
from ..sync.tokens import TokenInfo, TokenVerifier
from .admin import Admin
from .budget import MemoryBudget
from .connections import HttpPeer, ReplicaConnection, Transport
from .files import Files
from .library import LibraryGone, LibraryHost
from .observe import NULL_OBSERVER, Observer
from .profiles import CachedProfiles, DefaultProfiles, ProfileSource
from .registry import Libraries, NotServedHere, Ownership, owns_everything
from .settings import CoreSettings

log = logging.getLogger(__name__)


class VerdantCore:
    def __init__(
        self,
        settings: CoreSettings,
        *,
        token_secret: str,
        profiles: ProfileSource | None = None,
        observer: Observer = NULL_OBSERVER,
        file_storage: FileStorage | None = None,
        owns: Ownership = owns_everything,
    ) -> None:
        self.settings = settings
        self.file_storage = file_storage
        self.owns: Ownership = owns
        """Whether this server serves a library now (always, outside a cluster)."""
        self._nursery: trio.Nursery | None = None
        self.verifier = TokenVerifier(token_secret)
        self._libraries: Libraries | None = None
        self.profiles = (
            profiles if isinstance(profiles, CachedProfiles)
            else CachedProfiles(profiles or DefaultProfiles())
        )
        self.observer = observer
        self.running = trio.Event()
        self.sync_limiter = trio.CapacityLimiter(settings.max_concurrent_syncs)
        self.handshake_limiter = trio.CapacityLimiter(settings.max_concurrent_handshakes)
        self.message_budget = MemoryBudget(settings.message_memory_bytes)
        self.connections: set[ReplicaConnection] = set()
        self._admitted = 0
        """Websockets admitted and not yet finished (handshaking or connected)."""
        self.shutting_down = False
        self._ownership_changed = trio.Event()
        """Set (and replaced) by `ownership_changed`: a held refusal then ends at once."""
        self.files = Files(self)
        """Uploads, serving and clean-up of files attached to documents."""
        self.admin = Admin(self)
        """What the admin API and `verdant-trio admin` do to a library."""

    @property
    def libraries(self) -> Libraries:
        if self._libraries is None:
            raise VerdantError(ErrorCode.UNAVAILABLE, "the Verdant core is not running")
        return self._libraries

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the library tasks until cancelled; then each finishes its batch and closes."""
        self.settings.libraries.databases_dir.mkdir(parents=True, exist_ok=True)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._libraries = Libraries(
                    self.settings.libraries, nursery, self.observer, owns=self.owns
                )
                # The last user leaving a library queues its file clean-up for the one task
                # below that does them in turn (a bounded queue: a full one drops the request,
                # and the next departure asks again).
                self._libraries.on_empty = lambda host: self.files.request_clean_up(host.id)
                nursery.start_soon(self.files.clean_up_emptied_libraries)
                nursery.start_soon(self._close_idle_connections)
                self.running.set()
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self.begin_shutdown()
                    self._libraries.stop_all()
        finally:
            self._libraries = None
            self._nursery = None

    async def _close_idle_connections(self) -> None:
        """Websockets that sent nothing, not even a heartbeat, for the idle timeout are closed
        (4008) within a quarter of the timeout after it (at most 5 s)."""
        interval_s = min(self.settings.connections.idle_timeout_s / 4, 5.0)
        while True:
            await trio.sleep(interval_s)
            self._sweep_idle(trio.current_time())

    def _sweep_idle(self, now: float) -> None:
        # A function of its own: a loop variable in the task above would keep the last
        # connection it swept (socket, buffers) alive while the task sleeps, indefinitely on a
        # server that goes quiet.
        for connection in list(self.connections):
            connection.close_if_idle(now)

    # -- access -----------------------------------------------------------------------------

    def verify(self, token: str | None) -> TokenInfo:
        info = self.verifier.verify(token)
        check_id(info.library_id, "library id")
        return info

    def require_owner(self, library_id: str) -> None:
        """`NotServedHere` (503) unless this server serves the library: the check the edges
        make before reading a body or writing a file, so a refusal costs nothing."""
        if not self.owns(library_id):
            raise NotServedHere(library_id)

    @contextlib.asynccontextmanager
    async def library_for_request(self, library_id: str) -> AsyncIterator[LibraryHost]:
        """`libraries.use` for an HTTP request: a library stopped under the request (released
        to another node, evicted, crashed) is a 503 the client retries, never a 500."""
        try:
            async with self.libraries.use(library_id) as host:
                yield host
        except LibraryGone:
            raise VerdantError(
                ErrorCode.UNAVAILABLE, "the library is restarting or moving; retry",
                retry_after_s=1,
            ) from None

    def ownership_changed(self) -> None:
        """What `owns` answers has changed (a new table, a fence lifted): refusals being held
        end now, so their clients retry at once (the next one is held again if it must be)."""
        self._ownership_changed.set()
        self._ownership_changed = trio.Event()

    async def release(self, predicate: Callable[[str], bool]) -> list[str]:
        """Stop serving what `predicate` picks (`owns` must refuse it already); see
        `Libraries.release`. Returns the ids of the libraries that were open."""
        started = trio.current_time()
        released = await self.libraries.release(predicate, "library moved to another node")
        log.info(
            "released libraries count=%d duration_ms=%.1f",
            len(released), (trio.current_time() - started) * 1000,
        )
        return released

    # -- websocket --------------------------------------------------------------------------

    def admit_websocket(self, info: TokenInfo) -> None:
        """Decide before the upgrade: refused sockets get an HTTP error, never a dropped socket."""
        if self.shutting_down:
            raise VerdantError(ErrorCode.UNAVAILABLE, "the server is shutting down")
        if not info.type.can_realtime:
            raise VerdantError(
                ErrorCode.FORBIDDEN,
                f"a {info.type.name.lower()} token may not open a realtime connection",
            )
        if self._admitted >= self.settings.max_connections:
            raise VerdantError(ErrorCode.UNAVAILABLE, "too many connections; retry later")

    async def serve_websocket(
        self,
        info: TokenInfo,
        accept: Any,
        transport: Transport,
    ) -> None:
        """Run one replica's websocket: `accept()` is called once the library is ready.

        The handshake (token already verified, library opened, profile loaded) is capped by a
        capacity limiter, so a reconnect storm after a restart queues instead of piling up; a
        handshake that cannot start within the timeout is refused with 503.
        """
        self.admit_websocket(info)
        # The slot is taken at admission, not once accepted: concurrent handshakes count too.
        self._admitted += 1
        try:
            await self._serve_admitted(info, accept, transport)
        finally:
            self._admitted -= 1

    async def _serve_admitted(self, info: TokenInfo, accept: Any, transport: Transport) -> None:
        try:
            self.handshake_limiter.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_after(self.settings.handshake_timeout_s) as waited:
                await self.handshake_limiter.acquire()
            if waited.cancelled_caught:  # a cancelled acquire holds nothing
                raise VerdantError(ErrorCode.UNAVAILABLE, "server busy; retry later") from None
        handshaking = True
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    self.require_owner(info.library_id)
                    profile = await self.profiles.get(info.user_id)
                    # `use` asks again: the fence may have gone up during the profile lookup
                    host = await stack.enter_async_context(self.libraries.use(info.library_id))
                except NotServedHere:
                    # Held before the 503 and still under the handshake limiter, so a storm of
                    # refused reconnects waits in line instead of spinning (see the module).
                    # The hold ends early when what this server owns changes: a client held
                    # while its library moves retries as soon as the library may have a home.
                    self.observer.refused("websocket")
                    with trio.move_on_after(self.settings.refusal_delay_s):
                        await self._ownership_changed.wait()
                    raise
                try:
                    await accept()
                finally:
                    handshaking = False
                    self.handshake_limiter.release()
                connection = ReplicaConnection(
                    info,
                    transport,
                    self.settings.connections,
                    profile=profile,
                    observer=self.observer,
                )
                self.connections.add(connection)
                if self.shutting_down:  # the handshake finished after the close-all sweep
                    connection.close_soon(CloseCode.GOING_AWAY, "server shutting down")
                self.observer.connection_opened("websocket", int(info.type))
                try:
                    await connection.serve(_LimitedHost(host, self.sync_limiter))
                finally:
                    self.connections.discard(connection)
                    self.observer.connection_closed("websocket", int(info.type))
        finally:
            if handshaking:
                self.handshake_limiter.release()

    # -- HTTP sync --------------------------------------------------------------------------

    def parse_http_body(self, body: Any) -> list[ClientMessage]:
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            raise VerdantError(ErrorCode.BODY_REQUIRED, "body must be {\"messages\": [...]}")
        items = body["messages"]
        if len(items) > self.settings.max_http_messages:
            raise VerdantError(
                ErrorCode.INVALID_REQUEST,
                f"at most {self.settings.max_http_messages} messages per request",
            )
        try:
            return [validate_client_message(item) for item in items]
        except ProtocolError as exc:
            raise VerdantError(ErrorCode.INVALID_REQUEST, str(exc)) from None

    async def http_sync(self, info: TokenInfo, messages: list[ClientMessage]) -> bytes:
        """Handle a push/pull request; every message is validated before any is handled."""
        if self.shutting_down:
            raise VerdantError(ErrorCode.UNAVAILABLE, "the server is shutting down")
        self.require_owner(info.library_id)  # heartbeats too: they are the owner's to answer
        for message in messages:
            self.observer.message_in(wire_type(message))
        peer = HttpPeer(info, profile=await self.profiles.get(info.user_id))
        if all(isinstance(m, Heartbeat) for m in messages):
            for _ in messages:
                peer.deliver(b'{"type":"heartbeat-response"}')
            return peer.body()
        has_sync = any(isinstance(m, Sync) for m in messages)
        self.observer.connection_opened("http", int(info.type))
        try:
            async with self.library_for_request(info.library_id) as host:
                if has_sync:
                    async with self.sync_limiter:
                        await host.request(peer, messages)
                else:
                    await host.request(peer, messages)
        finally:
            self.observer.connection_closed("http", int(info.type))
        return peer.body()

    # -- libraries ----------------------------------------------------------------------------

    def exists(self, library_id: str) -> bool:
        """Whether the library is open or has a database: admin operations never create one.

        A library of another node is `NotServedHere`, not missing: its database may well be
        there, on its owner."""
        check_id(library_id, "library id")
        self.require_owner(library_id)
        return (
            library_id in self.libraries.active
            or self.settings.libraries.shard_path(library_id).exists()
        )

    @contextlib.asynccontextmanager
    async def existing(self, library_id: str) -> AsyncIterator[LibraryHost]:
        """`library_for_request` for a library that must already exist (404 otherwise)."""
        if not self.exists(library_id):
            raise VerdantError(ErrorCode.NOT_FOUND, f"library {library_id!r} not found")
        async with self.library_for_request(library_id) as host:
            yield host

    # -- lifecycle --------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Refuse new work and tell every connected replica the server is going away."""
        self.shutting_down = True
        for connection in list(self.connections):
            connection.close_soon(CloseCode.GOING_AWAY, "server shutting down")


class _LimitedHost:
    """The library as a connection sees it: initial syncs pass the server-wide sync limiter."""

    def __init__(self, host: LibraryHost, limiter: trio.CapacityLimiter) -> None:
        self._host = host
        self._limiter = limiter

    async def attach(self, peer: Any) -> None:
        await self._host.attach(peer)

    def detach(self, peer: Any) -> None:
        self._host.detach(peer)

    def submit_nowait(self, peer: Any, messages: list[ClientMessage]) -> bool:
        return self._host.submit_nowait(peer, messages)

    async def submit(
        self, peer: Any, messages: list[ClientMessage], *, wait: bool = False
    ) -> None:
        if any(isinstance(m, Sync) for m in messages):
            async with self._limiter:
                await self._host.submit(peer, messages, wait=True)
        else:
            await self._host.submit(peer, messages, wait=wait)


@contextlib.asynccontextmanager
async def open_core(
    settings: CoreSettings,
    *,
    token_secret: str,
    profiles: ProfileSource | None = None,
    observer: Observer = NULL_OBSERVER,
    file_storage: FileStorage | None = None,
    owns: Ownership = owns_everything,
) -> AsyncIterator[VerdantCore]:
    """Create and run a core for the duration of the block."""
    core = VerdantCore(
        settings, token_secret=token_secret, profiles=profiles, observer=observer,
        file_storage=file_storage, owns=owns,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(core.run)
        try:
            yield core
        finally:
            nursery.cancel_scope.cancel()
