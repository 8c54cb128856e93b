"""The registry of active libraries: one task per library, started when a connection or request
first needs it and supervised so that one library's crash never takes the server down.

Ownership (cluster mode): the registry is given `owns(library_id)`, and a library it does not
own is refused (`NotServedHere`) before any task or shard exists for it, every time it is asked
for. `release(predicate)` then stops serving what the caller no longer owns. The engine knows
nothing of slots or tables; a single server owns everything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import trio

from ..sync.codes import CloseCode
from ..sync.errors import ErrorCode, VerdantError
from .library import LibraryHost
from .observe import NULL_OBSERVER, Observer
from .settings import LibrarySettings

log = logging.getLogger(__name__)

Ownership = Callable[[str], bool]
"""`owns(library_id)`: whether this server may serve the library now. Called on the event loop
for every request for a library, so it must be cheap and never block."""


def owns_everything(library_id: str) -> bool:
    """A server that is not part of a cluster."""
    return True


class NotServedHere(VerdantError):
    """The library belongs to another node (or is being released): refused with 503 (5030)
    and `Retry-After`, which every Verdant client retries; nothing was opened or created."""

    def __init__(self, library_id: str) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE, "this library is not served by this node; retry",
            retry_after_s=1,
        )
        self.library_id = library_id


class Libraries:
    """The registry of active libraries; their tasks live in this object's nursery."""

    def __init__(
        self,
        settings: LibrarySettings,
        nursery: trio.Nursery,
        observer: Observer = NULL_OBSERVER,
        *,
        owns: Ownership = owns_everything,
    ) -> None:
        self.settings = settings
        self._nursery = nursery
        self._observer = observer
        self.owns = owns
        self._hosts: dict[str, LibraryHost] = {}
        self._closing: dict[str, LibraryHost] = {}
        self._starting: dict[str, trio.Event] = {}
        self.on_empty: Callable[[LibraryHost], None] | None = None

    def forget(self, host: LibraryHost) -> None:
        """The host stops taking work (its task is closing): the next `use` starts a new one."""
        if self._hosts.get(host.id) is host:
            del self._hosts[host.id]
            self._closing[host.id] = host

    @property
    def active(self) -> dict[str, LibraryHost]:
        return self._hosts

    @contextlib.asynccontextmanager
    async def use(self, library_id: str) -> AsyncIterator[LibraryHost]:
        """Hold a library open for the duration of a connection or request.

        If the library's task is not running, this starts it, in the registry's nursery (the
        core's): the caller, a connection's or a request's task, waits until its shard is open,
        but the library's task outlives it and belongs to the core.
        """
        host = await self._acquire(library_id)
        try:
            yield host
        finally:
            host.refs -= 1

    async def _acquire(self, library_id: str) -> LibraryHost:
        while True:
            # Asked again after every wait: the fence may have gone up meanwhile. This is the
            # only place a host (and so a shard) is created, so a library this server does not
            # own is never opened, nor its database file created.
            if not self.owns(library_id):
                raise NotServedHere(library_id)
            host = self._hosts.get(library_id)
            if host is not None and host.accepting:
                host.refs += 1
                return host
            starting = self._starting.get(library_id)
            if starting is not None:
                await starting.wait()
                continue
            previous = self._closing.get(library_id)
            if previous is not None and not previous.closed.is_set():
                await previous.closed.wait()
                continue
            self._closing.pop(library_id, None)
            event = self._starting[library_id] = trio.Event()
            try:
                host = LibraryHost(library_id, self.settings, self, self._observer)
                host.on_empty = self.on_empty
                # started in the core's nursery, not the caller's (see `use`)
                await self._nursery.start(self._supervise, host)
                self._hosts[library_id] = host
            finally:
                del self._starting[library_id]
                event.set()

    async def _supervise(
        self, host: LibraryHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """A library task that fails must not take the server down with it."""
        try:
            await host.run(task_status=task_status)
        except Exception:
            if host.core is None:
                raise  # failed to open: `start` re-raises it to the caller that asked
            log.exception("library task crashed; its clients will reconnect library=%s", host.id)

    def stop_all(self) -> None:
        for host in list(self._hosts.values()):
            host.stop()

    async def release(
        self, predicate: Callable[[str], bool], reason: str = "library moved; reconnect"
    ) -> list[str]:
        """Stop serving the libraries `predicate` picks, and return once their shards are closed.

        The caller raises the fence first (`owns` refuses them), so nothing reopens them. Each
        open one closes its sockets with 1012 (clients reconnect at once and are routed to the
        new owner), finishes the batch in hand, checkpoints its WAL and closes its database:
        afterwards its files are whole and no longer written to, ready to be copied. Libraries
        being opened or closed meanwhile are waited for too. Returns the ids that were open.
        """
        released: list[str] = []
        while True:
            starting = [event for lib, event in self._starting.items() if predicate(lib)]
            hosts = [
                host for host in (*self._hosts.values(), *self._closing.values())
                if predicate(host.id) and not host.closed.is_set()
            ]
            if not starting and not hosts:
                return released
            still_owned = sorted(host.id for host in hosts if self.owns(host.id))
            if still_owned:
                raise ValueError(f"release of {len(still_owned)} libraries still owned: fence first")
            for host in hosts:
                closed = host.disconnect_all(CloseCode.SERVICE_RESTART, reason)
                host.stop()
                log.info("releasing library library=%s clients_closed=%d", host.id, closed)
            for event in starting:  # opened before the fence went up: then stopped above
                await event.wait()
            for host in hosts:
                await host.closed.wait()
                released.append(host.id)
