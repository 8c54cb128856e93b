"""Files attached to documents, as the engine handles them: uploads stored before they are
answered, the stored type of a file being served, and the deletion of files whose last
reference compaction folded away.

The bytes live in a `FileStorage` (`storage.files`); their metadata in the library's shard,
written in the library's turn (`LibraryHost.call`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from ..storage.files import IncomingFile, StoredFile
from ..storage.names import check_id, safe_file_name
from ..sync.decisions import LibraryCore
from ..sync.errors import ErrorCode, VerdantError
from ..sync.tokens import TokenInfo
from .library import LibraryHost

if TYPE_CHECKING:
    from .core import VerdantCore

log = logging.getLogger(__name__)

CLEAN_UP_QUEUE: Final = 64
"""Libraries waiting for their file clean-up; past it a request is dropped (and made again the
next time the library empties)."""


class Files:
    def __init__(self, core: VerdantCore) -> None:
        self._core = core
        self._upload_locks: dict[tuple[str, str], trio.Lock] = {}
        self._clean_ups, self._clean_ups_receive = trio.open_memory_channel[str](CLEAN_UP_QUEUE)

    def info_row(self, library: LibraryCore, file_id: str, base_url: str | None) -> dict[str, Any] | None:
        """The file info clients expect; without file storage the url is null, as in the
        reference. Runs in the library's turn."""
        row = library.shard.file(file_id)
        if row is None:
            return None
        storage = self._core.file_storage
        url = storage.url(library.id, row.file_id, row.name, base_url) if storage else None
        return {"id": row.file_id, "name": row.name, "type": row.type, "url": url}

    async def upload(self, info: TokenInfo, file_id: str, upload: IncomingFile) -> StoredFile:
        """Store an uploaded file, then its metadata; only then may the client be answered."""
        core = self._core
        storage = core.file_storage
        if storage is None:
            raise VerdantError(ErrorCode.NO_FILE_STORAGE, "file storage is not configured")
        if not info.type.can_write:
            raise VerdantError(ErrorCode.FORBIDDEN, "a read-only token may not upload files")
        check_id(file_id, "file id")
        core.require_owner(info.library_id)  # before a byte is written to our file storage
        name = safe_file_name(upload.name)
        key = (info.library_id, file_id)
        lock = self._upload_locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                size = await storage.put(info.library_id, file_id, name, upload.chunks())
                async with core.library_for_request(info.library_id) as host:
                    await host.call(lambda library: library.shard.put_file(file_id, name, upload.type))
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._upload_locks.pop(key, None)
        core.observer.upload(size)
        log.info(
            "file stored library=%s user=%s file=%s size=%d type=%s",
            info.library_id, info.user_id, file_id, size, upload.type,
        )
        return StoredFile(file_id, name, upload.type, size)

    async def served_type(self, library_id: str, file_id: str) -> str | None:
        """The stored content type of a file that still has metadata (None: not ours;
        `NotServedHere` for another node's library)."""
        if not self._core.exists(library_id):
            return None
        async with self._core.library_for_request(library_id) as host:
            row = await host.call(lambda library: library.shard.file(file_id))
        return None if row is None else row.type

    async def delete(self, host: LibraryHost, files: list[tuple[str, str]]) -> int:
        """Remove stored files, then the metadata of those that are gone.

        A file that fails to delete keeps its metadata (still pending), so it is retried later;
        a failure is logged and never takes the library down.
        """
        storage = self._core.file_storage
        gone: list[str] = []
        for file_id, name in files:
            if storage is not None:
                try:
                    await storage.delete(host.id, file_id, name)
                except Exception as exc:
                    log.error(
                        "failed to delete file; will retry library=%s file=%s error=%r",
                        host.id, file_id, exc,
                    )
                    continue
            gone.append(file_id)
        if gone:

            def forget(library: LibraryCore) -> None:
                for file_id in gone:
                    library.shard.delete_file(file_id)

            await host.call(forget)
            log.info("files deleted library=%s count=%d", host.id, len(gone))
        return len(gone)

    # -- clean-up when a library empties ----------------------------------------------------

    def request_clean_up(self, library_id: str) -> None:
        """The last user left a library: its expired files go (never waits)."""
        if self._core.file_storage is None:
            return
        try:
            self._clean_ups.send_nowait(library_id)
        except trio.WouldBlock:
            log.debug("file clean-up queue full; skipped library=%s", library_id)

    async def clean_up_emptied_libraries(self) -> None:
        """The core's task that deletes, one library after another, the files whose refs
        disappeared longer than `file_expiration_days` ago."""
        async for library_id in self._clean_ups_receive:
            if not self._core.owns(library_id):
                continue  # released since it emptied: its new owner cleans up
            try:
                async with self._core.libraries.use(library_id) as host:
                    expired = await host.call(
                        lambda library: [
                            (f.file_id, f.name) for f in library.shard.files_pending_delete()
                        ]
                    )
                    if expired:
                        await self.delete(host, expired)
            except Exception:
                log.exception("file clean-up failed; will retry library=%s", library_id)
