"""Uploads parsed from the multipart stream as it arrives (werkzeug's sans-IO decoder): one
file part, its name and type, and its bytes in chunks, refused past the size limit.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Final

from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.http import (
    parse_options_header,
)
from werkzeug.sansio.multipart import Data, Epilogue, File, MultipartDecoder, NeedData

from ..sync.errors import ErrorCode, VerdantError

_MIME: Final = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}(\s*;.{0,200})?$"
)


def clean_content_type(value: str | None) -> str:
    """Keep the type the client sent when it is a well-formed MIME type."""
    if value and _MIME.match(value.strip()):
        return value.strip()
    return "application/octet-stream"


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
