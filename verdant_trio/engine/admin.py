"""What the admin API and `verdant-trio admin` do to a library: read its state and documents,
force a replica truant, forget a user's replicas, evict everything. Never creates a library."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..storage.names import check_id
from ..sync.codes import CloseCode
from ..sync.decisions import LibraryCore
from ..sync.errors import ErrorCode, VerdantError

if TYPE_CHECKING:
    from .core import VerdantCore

log = logging.getLogger(__name__)


def sanitize_fragment(value: str) -> str:
    """As the client builds oids: separators inside a collection or id become placeholders."""
    return value.replace("/", "&slash;").replace(":", "&colon;").replace(".", "&dot;")


def document_oid(collection: str, document_id: str) -> str:
    return f"{sanitize_fragment(collection)}/{sanitize_fragment(document_id)}"


class Admin:
    def __init__(self, core: VerdantCore) -> None:
        self._core = core

    async def info(self, library_id: str) -> dict[str, Any]:
        async with self._core.existing(library_id) as host:
            data = await host.call(lambda library: library.info())
        if data is None:
            raise VerdantError(ErrorCode.NOT_FOUND, f"library {library_id!r} has no data")
        return data

    async def document(
        self, library_id: str, collection: str, document_id: str, base_url: str | None = None
    ) -> Any:
        """A document with nested objects and file infos resolved."""
        oid = document_oid(collection, document_id)
        files = self._core.files
        async with self._core.existing(library_id) as host:
            snapshot = await host.call(
                lambda library: library.hydrate(
                    oid, lambda file_id: files.info_row(library, file_id, base_url)
                )
            )
        if snapshot is None:
            raise VerdantError(ErrorCode.NOT_FOUND, f"document {collection}/{document_id} not found")
        return snapshot

    async def file_info(
        self, library_id: str, file_id: str, base_url: str | None = None
    ) -> dict[str, Any]:
        check_id(file_id, "file id")
        files = self._core.files
        async with self._core.existing(library_id) as host:
            info = await host.call(lambda library: files.info_row(library, file_id, base_url))
        if info is None:
            raise VerdantError(ErrorCode.NOT_FOUND, f"file {file_id!r} not found")
        info["libraryId"] = library_id
        return info

    async def force_truant(self, library_id: str, replica_id: str) -> None:
        async with self._core.existing(library_id) as host:
            found = await host.call(lambda library: library.shard.force_truant(replica_id))
        if not found:
            raise VerdantError(ErrorCode.NOT_FOUND, f"replica {replica_id!r} not found")
        log.info("replica forced truant library=%s replica=%s", library_id, replica_id)

    async def evict_user(self, library_id: str, user_id: str) -> int:
        async with self._core.existing(library_id) as host:
            count = await host.call(lambda library: library.shard.delete_replicas_of_user(user_id))
        log.info("user evicted library=%s user=%s replicas=%d", library_id, user_id, count)
        return count

    async def evict(self, library_id: str) -> None:
        """Drop a library's data; connected clients are disconnected, reconnect and re-upload."""
        core = self._core
        async with core.existing(library_id) as host:

            def wipe(library: LibraryCore) -> list[tuple[str, str]]:
                library.clear_presence()
                library.shard.delete_everything()
                return [(f.file_id, f.name) for f in library.shard.files()]

            files = await host.call(wipe)
            deleted = await core.files.delete(host, files)
            if core.file_storage is not None and deleted == len(files):
                await core.file_storage.delete_library(library_id)
            closed = host.disconnect_all(CloseCode.EVICTED, "library evicted; resync")
        log.warning(
            "library evicted library=%s clients_closed=%d files_deleted=%d",
            library_id, closed, deleted,
        )
