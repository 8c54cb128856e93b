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
import logging
import os
import re
import secrets
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import quote

import trio
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import (
    http_date,
    parse_date,
    parse_options_header,
    parse_range_header,
)
from werkzeug.sansio.multipart import Data, Epilogue, File, MultipartDecoder, NeedData

from .errors import ErrorCode, VerdantError
from .storage.names import encode_id, safe_file_name

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES: Final = 100 * 1024 * 1024
_MIME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}(\s*;.{0,200})?$")
ACTIVE_CONTENT: Final = frozenset(
    {
        "text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml",
        "text/javascript", "application/javascript", "application/ecmascript",
        "text/ecmascript", "application/x-javascript", "text/x-javascript",
        "application/wasm", "multipart/x-mixed-replace",
    }
)  # fmt: skip
"""Types a browser would run as our origin's page or script: served as attachments."""


def clean_content_type(value: str | None) -> str:
    """Keep the type the client sent when it is a well-formed MIME type."""
    if value and _MIME.match(value.strip()):
        return value.strip()
    return "application/octet-stream"


def is_active_content(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in ACTIVE_CONTENT


@dataclass(frozen=True, slots=True)
class StoredFile:
    file_id: str
    name: str
    type: str
    size: int


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
    """

    def __init__(self, root_directory: str | os.PathLike[str], host: str | None = None) -> None:
        self.root = Path(root_directory).resolve()
        self.host = host.rstrip("/") if host else None

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
        temp = directory / f".upload-{secrets.token_hex(8)}.part"
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
            if other != final and not other.name.startswith(".upload-"):
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
        return (
            f"{base}/files/{quote(encode_id(library_id, 'library id'), safe='')}"
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
            if part.startswith(".upload-"):
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


class UploadTooLarge(VerdantError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"file is larger than the maximum upload size of {limit} bytes",
        )


class MultipartFile:
    """The `file` part of a multipart/form-data stream, read as it arrives.

    `open_multipart_file` reads up to the part's headers (so the name and type are known before
    any byte is stored); `chunks()` then yields the part's data straight from the network. The
    decoder holds at most one network chunk, so memory stays flat whatever the size.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        decoder: MultipartDecoder,
        name: str,
        type: str,
        max_bytes: int,
    ) -> None:
        self._body = body
        self._decoder = decoder
        self.name = name
        self.type = type
        self._max_bytes = max_bytes
        self.size = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        decoder = self._decoder
        while True:
            event = _next_event(decoder)
            if isinstance(event, NeedData):
                if decoder.complete:
                    raise VerdantError(ErrorCode.INVALID_REQUEST, "upload ended before the file did")
                _feed(decoder, await _next_chunk(self._body))
                continue
            if not isinstance(event, Data):
                raise VerdantError(ErrorCode.INVALID_REQUEST, "malformed multipart body")
            if event.data:
                self.size += len(event.data)
                if self.size > self._max_bytes:
                    raise UploadTooLarge(self._max_bytes)
                yield event.data
            if not event.more_data:
                break
        # read the rest of the form so the request completes; other fields are ignored
        while True:
            event = _next_event(decoder)
            if isinstance(event, Epilogue):
                return
            if isinstance(event, NeedData):
                if decoder.complete:
                    return
                _feed(decoder, await _next_chunk(self._body))


def _feed(decoder: MultipartDecoder, data: bytes | None) -> None:
    try:
        decoder.receive_data(data)
    except RequestEntityTooLarge:
        raise VerdantError(
            ErrorCode.INVALID_REQUEST,
            "malformed multipart body: no part boundary within the first MiB",
        ) from None


async def _next_chunk(body: AsyncIterator[bytes]) -> bytes | None:
    try:
        return await body.__anext__()
    except StopAsyncIteration:
        return None


def _next_event(decoder: MultipartDecoder) -> object:
    try:
        return decoder.next_event()
    except ValueError as exc:  # werkzeug's way of saying the body is malformed
        raise VerdantError(ErrorCode.INVALID_REQUEST, f"malformed multipart body: {exc}") from None


async def open_multipart_file(
    body: AsyncIterator[bytes],
    content_type: str | None,
    *,
    max_bytes: int,
    field: str = "file",
) -> MultipartFile:
    mime, options = parse_options_header(content_type or "")
    boundary = options.get("boundary")
    if mime != "multipart/form-data" or not boundary:
        raise VerdantError(ErrorCode.INVALID_REQUEST, "expected a multipart/form-data upload")
    decoder = MultipartDecoder(boundary.encode(), max_form_memory_size=1024 * 1024, max_parts=16)
    while True:
        event = _next_event(decoder)
        if isinstance(event, NeedData):
            if decoder.complete:
                break
            _feed(decoder, await _next_chunk(body))
        elif isinstance(event, File) and event.name == field:
            return MultipartFile(
                body,
                decoder,
                event.filename or "file",
                clean_content_type(event.headers.get("content-type")),
                max_bytes,
            )
        elif isinstance(event, Epilogue):
            break
    raise VerdantError(ErrorCode.INVALID_REQUEST, f"no file was uploaded in the '{field}' form field")


@dataclass(frozen=True, slots=True)
class FileResponse:
    """What to answer a GET/HEAD for a stored file: status, headers, and the byte range."""

    status: int
    headers: dict[str, str]
    start: int = 0
    stop: int = 0

    async def body(self, path: Path, chunk_bytes: int = 64 * 1024) -> AsyncIterator[bytes]:
        """Stream the range from disk; never the whole file in memory."""
        remaining = self.stop - self.start
        async with await trio.open_file(path, "rb") as f:
            await f.seek(self.start)
            while remaining > 0:
                chunk = await f.read(min(chunk_bytes, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk


def plan_file_response(
    path: Path, content_type: str, request_headers: Mapping[str, str]
) -> FileResponse:
    """Conditional requests (ETag, Last-Modified) and single byte ranges, as browsers use them
    for media seeking."""
    stat = path.stat()
    size = stat.st_size
    etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
    headers = {
        "Content-Type": content_type,
        "ETag": etag,
        "Last-Modified": http_date(stat.st_mtime),
        "Accept-Ranges": "bytes",
    }
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is not None:
        tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
        if etag in tags or "*" in tags:
            return FileResponse(304, headers)
    else:
        since = parse_date(request_headers.get("If-Modified-Since"))
        if since is not None and int(stat.st_mtime) <= since.timestamp():
            return FileResponse(304, headers)
    wanted = parse_range_header(request_headers.get("Range"))
    if_range = request_headers.get("If-Range")
    if wanted is not None and (if_range is None or if_range.strip() == etag):
        span = wanted.range_for_length(size) if len(wanted.ranges) == 1 else None
        if span is None:
            headers["Content-Range"] = f"bytes */{size}"
            return FileResponse(416, headers)
        start, stop = span
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        headers["Content-Length"] = str(stop - start)
        return FileResponse(206, headers, start, stop)
    headers["Content-Length"] = str(size)
    return FileResponse(200, headers, 0, size)
