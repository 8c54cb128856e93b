"""What the sync socket needs of RFC 6455 beside the `websockets` protocol: pure code over bytes.

The frames themselves (parsing, unmasking, validation, control frames, the closing handshake)
are the `websockets` package's sans-IO `Protocol`, driven by `websocket.StreamWebSocket`. Three
things stay here, each because the library does not do it or does it at a measured price:

- **The upgrade request.** The first request on a connection decides where the connection goes:
  a well-formed upgrade to the sync path is ours, anything else goes to hypercorn with its bytes
  replayed, which answers anything malformed as it always has. Parsing it here costs ~22 µs; the
  library's `ServerProtocol` (HTTP parser, then `accept`) ~260 µs, a tenth of what a whole idle
  connection costs the server to connect and sync.
- **Frame boundaries ahead of the parser** (`FrameBoundaries`): the length a frame header
  announces, read before its payload is, so the I/O layer can reserve memory for a large message
  before reading it and can pace control frames. It never judges a frame: validity is the
  library's, and a frame it would refuse ends the connection whatever was counted here.
- **The header of a large outgoing frame** (`frame_header`): the library's serializer copies the
  payload twice, which for a multi-megabyte `sync-resp` costs as much memory again; a header
  written here goes out in front of the payload without copying it.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import unquote

from websockets.utils import accept_key

MAX_HEAD_BYTES: Final = 16 * 1024
"""A request head longer than this is not ours to parse; hypercorn answers it."""
MAX_CONTROL_PAYLOAD: Final = 125
_TEXT: Final = 0x1


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """A well-formed websocket upgrade (RFC 6455 §4.2.1), as far as the server needs it."""

    path: str
    """Percent-decoded, like an ASGI scope's `path`."""
    query_string: bytes
    subprotocols: tuple[str, ...]
    key: str


def head_length(data: bytes | bytearray) -> int:
    """Bytes up to and including the blank line that ends the request head; 0 if not there yet."""
    end = data.find(b"\r\n\r\n")
    return 0 if end < 0 else end + 4


def could_be_upgrade(data: bytes | bytearray) -> bool:
    """False as soon as the first bytes show a request that cannot be a websocket upgrade."""
    start = bytes(data[:4])
    return b"GET "[: len(start)] == start


def _tokens(values: list[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def parse_upgrade(head: bytes | bytearray) -> UpgradeRequest | None:
    """The request if it is a websocket upgrade we can take, else None.

    None is not a refusal: the caller hands the connection to the HTTP server, which answers
    anything unusual (HTTP/1.0, no `Host`, a body on the upgrade, a bad key) as it always has.
    """
    try:
        text = bytes(head).decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1":
        return None
    target = parts[1]
    if not target.startswith("/"):
        return None
    raw_path, _, query = target.partition("?")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            return None  # obsolete line folding or a malformed field: not ours to interpret
        headers.setdefault(name.lower(), []).append(value.strip())
    if len(headers.get("host", [])) != 1 or not headers["host"][0]:
        return None  # RFC 7230 §5.4 and RFC 6455 §4.1: exactly one Host
    if "content-length" in headers or "transfer-encoding" in headers:
        return None
    if "websocket" not in _tokens(headers.get("upgrade", [])):
        return None
    if "upgrade" not in _tokens(headers.get("connection", [])):
        return None
    if headers.get("sec-websocket-version") != ["13"]:
        return None
    keys = headers.get("sec-websocket-key", [])
    if len(keys) != 1:
        return None
    try:
        if len(base64.b64decode(keys[0], validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    subprotocols = tuple(
        p.strip() for v in headers.get("sec-websocket-protocol", []) for p in v.split(",")
        if p.strip()
    )
    return UpgradeRequest(
        path=unquote(raw_path), query_string=query.encode("ascii"),
        subprotocols=subprotocols, key=keys[0],
    )


def accept_response(key: str, subprotocol: str | None = None) -> bytes:
    """The 101 answer. No extension is answered, so none is in use (permessage-deflate is
    declined the way the Node server's `ws` declines it by default)."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def refusal_response(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    *,
    retry_after_s: int | None = None,
) -> bytes:
    """A complete HTTP answer instead of the upgrade; the connection closes after it."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    retry = f"retry-after: {retry_after_s}\r\n" if retry_after_s is not None else ""
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def text_frame_header(length: int) -> bytes:
    """The header of a whole, unmasked text frame (server to client) of `length` bytes."""
    if length < 126:
        return bytes((0x80 | _TEXT, length))
    if length < 0x10000:
        return struct.pack("!BBH", 0x80 | _TEXT, 126, length)
    return struct.pack("!BBQ", 0x80 | _TEXT, 127, length)


def fit_close_reason(reason: str) -> str:
    """A close reason cut to the 123 bytes a close frame leaves it, on a character."""
    return reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore")


@dataclass(slots=True)
class Scan:
    """What `FrameBoundaries.scan` saw in the bytes up to `end`."""

    end: int
    """Feed the parser up to here."""
    frames: int
    """Frame headers completed."""
    control_frames: int
    large_payload: int
    """Payload bytes announced by the headers of large data frames (see `large_bytes`)."""


class FrameBoundaries:
    """Where each client frame starts and how long its header says it is.

    Fed the same bytes as the parser, in order, it tells the I/O layer, before a payload is read,
    that a data frame will bring more than `large_bytes` into the message being received (so its
    memory can be reserved first), and how many frames (control frames among them) a piece of
    input holds (so a flood can be paced and cut off). Fragments count towards their message: a
    message sent as many small fragments is large once their sum is.
    """

    __slots__ = ("_head", "_message_bytes", "_remaining", "large_bytes")

    def __init__(self, large_bytes: int) -> None:
        self.large_bytes = large_bytes
        self._remaining = 0
        """Bytes of the current frame (header or payload) still to come."""
        self._head = b""
        """The start of a header cut by the end of a read."""
        self._message_bytes = 0
        """Payload of the data frames of the message being received, so far."""

    def scan(self, data: bytes, start: int, max_frames: int) -> Scan:
        """Scan `data[start:]`, stopping after `max_frames` frame headers."""
        pos, end = start, len(data)
        frames = controls = large = 0
        while pos < end:
            if self._remaining:
                step = min(self._remaining, end - pos)
                self._remaining -= step
                pos += step
                continue
            if frames == max_frames:
                break
            need = 2
            head = self._head + data[pos : pos + 14 - len(self._head)]
            if len(head) >= 2:
                code = head[1] & 0x7F
                need = 2 + (4 if head[1] & 0x80 else 0) + (2 if code == 126 else 8 if code == 127 else 0)
            if len(head) < need:
                self._head = head
                pos = end
                break
            taken = need - len(self._head)
            self._head = b""
            pos += taken
            frames += 1
            length = head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(head[2:4], "big")
            elif length == 127:
                length = int.from_bytes(head[2:10], "big")
            self._remaining = length
            if head[0] & 0x08:  # opcodes 8-15: control frames (the parser refuses the unknown)
                controls += 1
                continue
            before = self._message_bytes
            self._message_bytes = 0 if head[0] & 0x80 else before + length
            if before + length > self.large_bytes:
                large += length
        return Scan(pos, frames, controls, large)
