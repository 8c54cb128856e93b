"""Serving a stored file over HTTP: conditional requests, single byte ranges, and which types
must download as attachments rather than run as pages of our origin.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio
from werkzeug.http import (
    http_date,
    parse_date,
    parse_range_header,
)

ACTIVE_CONTENT: Final = frozenset(
    {
        "text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml",
        "text/javascript", "application/javascript", "application/ecmascript",
        "text/ecmascript", "application/x-javascript", "text/x-javascript",
        "application/wasm", "multipart/x-mixed-replace",
    }
)  # fmt: skip
"""Types a browser would run as our origin's page or script: served as attachments."""


if TYPE_CHECKING:
    from io import BufferedReader

    from trio._file_io import AsyncIOWrapper

    StoredFile = AsyncIOWrapper[BufferedReader]
    """A stored file opened for reading (what `trio.open_file` gives)."""


def is_active_content(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in ACTIVE_CONTENT


@dataclass(frozen=True, slots=True)
class FileResponse:
    """What to answer a GET/HEAD for a stored file: status, headers, and the byte range."""

    status: int
    headers: dict[str, str]
    start: int = 0
    stop: int = 0

    async def body(self, file: StoredFile, chunk_bytes: int = 64 * 1024) -> AsyncIterator[bytes]:
        """Stream the range from the file opened for this response (`open_stored`), closing it
        at the end; never the whole file in memory."""
        remaining = self.stop - self.start
        async with file as f:
            await f.seek(self.start)
            while remaining > 0:
                chunk = await f.read(min(chunk_bytes, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk


async def open_stored(path: Path) -> tuple[StoredFile, os.stat_result] | None:
    """The file opened, and its status read from the open file; None if it is gone.

    Opened before the answer is planned, so a file deleted meanwhile (its library evicted,
    compaction) is a 404, and one deleted while it is being sent is still sent whole (the
    open file outlives its name), instead of a 200 whose body fails.
    """
    try:
        file = await trio.open_file(path, "rb")
    except FileNotFoundError:
        return None
    try:
        return file, await trio.to_thread.run_sync(os.fstat, file.fileno())
    except BaseException:
        await file.aclose()
        raise


def plan_file_response(
    stat: os.stat_result, content_type: str, request_headers: Mapping[str, str]
) -> FileResponse:
    """Conditional requests (ETag, Last-Modified) and single byte ranges, as browsers use them
    for media seeking."""
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
