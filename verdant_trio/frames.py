"""RFC 6455 on the server side, sans-IO: the upgrade request, the handshake answer, frames.

The daemon serves the sync websocket straight from the TCP stream (see `listeners`); this module
makes every protocol decision as plain code over bytes, so it is tested without a socket. It does
only what a sync socket needs: no extensions (permessage-deflate is declined by not answering it,
as the Node server's `ws` does by default), no fragmented sends, text and binary messages in,
text messages out. Server frames are not masked, so `encode_frame` is the whole send path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final
from urllib.parse import unquote

WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD_BYTES: Final = 16 * 1024
"""A request head longer than this is not ours to parse; hypercorn answers it."""

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_NO_STATUS: Final = 1005
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009
_MAX_CONTROL_PAYLOAD: Final = 125


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
    anything unusual (HTTP/1.0, a body on the upgrade, a bad key) as it always has.
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


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()).decode()


def accept_response(key: str, subprotocol: str | None = None) -> bytes:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def refusal_response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    """A complete HTTP answer instead of the upgrade; the connection closes after it."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def frame_header(opcode: int, length: int) -> bytes:
    """The header of a whole, unmasked frame (server to client) with a payload of `length`."""
    if length < 126:
        return bytes((0x80 | opcode, length))
    if length < 0x10000:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One whole, unmasked frame (server to client)."""
    return frame_header(opcode, len(payload)) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit the 125-byte control payload, on a character."""
    data = reason.encode("utf-8")[: _MAX_CONTROL_PAYLOAD - 2].decode("utf-8", "ignore")
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + data.encode("utf-8"))


def unmask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR with the repeating 4-byte key, as one big-integer operation (C speed, any length)."""
    n = len(data)
    if n == 0:
        return b""
    key = (mask * ((n + 3) // 4))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class FrameError(Exception):
    """The peer broke the protocol; the connection is closed with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


def _valid_close_code(code: int) -> bool:
    # RFC 6455 §7.4: codes an endpoint may send; 1005, 1006 and 1015 never go on the wire.
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


class MessageReader:
    """Client frames in, whole messages and control events out.

    A data frame is buffered whole before it is unmasked, so memory per connection is bounded by
    `max_message_bytes` plus one read: the declared length is checked against the limit before
    the payload is waited for, and a message over the limit is refused with 1009.
    """

    __slots__ = ("_buffer", "_fragments", "_message_opcode", "_size", "max_message_bytes")

    def __init__(self, max_message_bytes: int, data: bytes = b"") -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray(data)
        self._fragments: list[bytes] = []
        self._message_opcode = 0
        self._size = 0

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_event(self) -> str | bytes | Ping | Close | None:
        """The next message or control event, or None until more bytes arrive.

        Raises `FrameError` on anything RFC 6455 forbids a client to send.
        """
        while True:
            buf = self._buffer
            if len(buf) < 2:
                return None
            first, second = buf[0], buf[1]
            if first & 0x70:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set; no extension was agreed")
            if not second & 0x80:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            opcode, final = first & 0x0F, bool(first & 0x80)
            length, offset = second & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    return None
                length, offset = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return None
                length, offset = int.from_bytes(buf[2:10], "big"), 10
                if length >> 63:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "frame length out of range")
            if opcode >= 0x8:
                if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                    raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown control opcode {opcode}")
                if not final or length > _MAX_CONTROL_PAYLOAD:
                    raise FrameError(
                        CLOSE_PROTOCOL_ERROR, "control frames must be unfragmented and short"
                    )
            elif opcode == OP_CONTINUATION:
                if not self._message_opcode:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
            elif opcode in (OP_TEXT, OP_BINARY):
                if self._message_opcode:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            else:
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown data opcode {opcode}")
            if opcode < 0x8 and self._size + length > self.max_message_bytes:
                raise FrameError(
                    CLOSE_TOO_BIG, f"message larger than {self.max_message_bytes} bytes"
                )
            end = offset + 4 + length
            if len(buf) < end:
                return None
            payload = unmask(memoryview(buf)[offset + 4 : end], bytes(buf[offset : offset + 4]))
            del buf[:end]
            if opcode == OP_PING:
                return Ping(payload)
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                return _parse_close(payload)
            if opcode != OP_CONTINUATION:
                self._message_opcode = opcode
            if not final:
                self._fragments.append(payload)
                self._size += length
                continue
            if self._fragments:
                self._fragments.append(payload)
                payload = b"".join(self._fragments)
                self._fragments.clear()
            message_opcode, self._message_opcode, self._size = self._message_opcode, 0, 0
            if message_opcode == OP_BINARY:
                return payload
            try:
                return payload.decode("utf-8")
            except UnicodeDecodeError:
                raise FrameError(CLOSE_INVALID_DATA, "text message is not valid UTF-8") from None


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(CLOSE_NO_STATUS, "")
    if len(payload) < 2:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _valid_close_code(code):
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        return Close(code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "close reason is not valid UTF-8") from None
