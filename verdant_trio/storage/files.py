"""Files attached to documents: streamed uploads, storage backends, safe serving.

An upload is parsed from the multipart stream as it arrives and written in chunks to a temporary
file next to its destination, fsynced, and renamed into place only when complete: a reader never
sees a partial file, a broken upload leaves nothing behind, and memory stays flat whatever the
size. The metadata row is written only after the bytes are safe, and only then does the client
get its response (the Node server pipes the upload without waiting, and at Verdant HEAD fails
every browser upload outright).

`FileStorage` is the seam for other backends (S3-like): put a stream, give a URL, delete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import quote

import trio

from ..sync.errors import ErrorCode, VerdantError
from .names import encode_id, safe_file_name

UPLOAD_PREFIX: Final = ".upload-"
"""Names of uploads in progress (`<prefix><random>.part` beside the final file): never a
stored file, and never part of a copy."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    file_id: str
    name: str
    type: str
    size: int


class IncomingFile(Protocol):
    """A file on its way in (an upload's file part): its name and type are known before its bytes
    are read, and `chunks()` yields them as they arrive."""

    name: str
    type: str

    def chunks(self) -> AsyncIterator[bytes]: ...


class FileStorage(Protocol):
    """Where file bytes live. Names passed in are already safe (`safe_file_name`)."""

    async def put(
        self, library_id: str, file_id: str, name: str, chunks: AsyncIterator[bytes]
    ) -> int:
        """Store the stream completely or not at all; returns the size in bytes."""
        ...

    def url(self, library_id: str, file_id: str, name: str, base_url: str | None) -> str | None:
        """Where clients fetch the file; `base_url` is the request's origin when known."""
        ...

    async def delete(self, library_id: str, file_id: str, name: str) -> None:
        """Remove the file; a file that is already gone is not an error."""
        ...

    async def delete_library(self, library_id: str) -> None: ...


class LocalFileStorage:
    """Files on the local disk under `<root>/<library>/<file id>/<name>`, served by us.

    `host` is the public base URL for file links (e.g. the origin behind your reverse proxy);
    without it, links use the origin of the request that asked for the file info.

    `slot_of` (cluster mode): the slot of a library id. Links then carry it,
    `/files/<slot>/<library>/<file id>/<name>`, so that the front routes a download to the
    library's node by its URL alone (a download carries no token).
    """

    def __init__(
        self,
        root_directory: str | os.PathLike[str],
        host: str | None = None,
        *,
        slot_of: Callable[[str], int] | None = None,
    ) -> None:
        self.root = Path(root_directory).resolve()
        self.host = host.rstrip("/") if host else None
        self.slot_of = slot_of

    def directory(self, library_id: str, file_id: str) -> Path:
        path = self.root / encode_id(library_id, "library id") / encode_id(file_id, "file id")
        # belt and braces: the encodings cannot escape, and we check anyway
        if not path.resolve().is_relative_to(self.root):
            raise VerdantError(ErrorCode.INVALID_REQUEST, "unsafe file location")
        return path

    def path(self, library_id: str, file_id: str, name: str) -> Path:
        return self.directory(library_id, file_id) / safe_file_name(name)

    async def put(
        self, library_id: str, file_id: str, name: str, chunks: AsyncIterator[bytes]
    ) -> int:
        directory = self.directory(library_id, file_id)
        final = directory / safe_file_name(name)
        await trio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
        temp = directory / f"{UPLOAD_PREFIX}{secrets.token_hex(8)}.part"
        size = 0
        completed = False
        try:
            async with await trio.open_file(temp, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    await out.write(chunk)
                await out.flush()
                await trio.to_thread.run_sync(os.fsync, out.fileno())
            await trio.to_thread.run_sync(self._install, directory, temp, final)
            completed = True
        finally:
            if not completed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_unlink_quietly, temp)
                    await trio.to_thread.run_sync(_rmdir_quietly, directory)
        return size

    @staticmethod
    def _install(directory: Path, temp: Path, final: Path) -> None:
        os.replace(temp, final)
        # a re-upload under another name leaves no stale copy behind
        for other in directory.iterdir():
            if other != final and not other.name.startswith(UPLOAD_PREFIX):
                _unlink_quietly(other)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def url(self, library_id: str, file_id: str, name: str, base_url: str | None) -> str | None:
        base = self.host or (base_url.rstrip("/") if base_url else None)
        if base is None:
            return None
        slot = f"/{self.slot_of(library_id)}" if self.slot_of is not None else ""
        return (
            f"{base}/files{slot}/{quote(encode_id(library_id, 'library id'), safe='')}"
            f"/{quote(encode_id(file_id, 'file id'), safe='')}"
            f"/{quote(safe_file_name(name), safe='')}"
        )

    async def delete(self, library_id: str, file_id: str, name: str) -> None:
        directory = self.directory(library_id, file_id)
        await trio.to_thread.run_sync(_unlink_quietly, directory / safe_file_name(name))
        await trio.to_thread.run_sync(_rmdir_quietly, directory)

    async def delete_library(self, library_id: str) -> None:
        directory = self.root / encode_id(library_id, "library id")
        await trio.to_thread.run_sync(lambda: shutil.rmtree(directory, ignore_errors=True))

    def locate(self, library_name: str, file_name: str, name: str) -> Path | None:
        """The stored file for a served URL's (already encoded) path components, if any."""
        for part in (library_name, file_name, name):
            if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
                return None
            if part.startswith(UPLOAD_PREFIX):
                return None
        path = self.root / library_name / file_name / name
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):
            return None
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            return None
        return resolved


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
            raise
