"""The registry of active libraries: one task per library, started when a connection or request
first needs it and supervised so that one library's crash never takes the server down.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import trio

from .library import LibraryHost
from .observe import NULL_OBSERVER, Observer
from .settings import LibrarySettings

log = logging.getLogger(__name__)


class Libraries:
    """The registry of active libraries; their tasks live in this object's nursery."""

    def __init__(
        self,
        settings: LibrarySettings,
        nursery: trio.Nursery,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.settings = settings
        self._nursery = nursery
        self._observer = observer
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
