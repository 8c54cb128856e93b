"""A lean websocket and HTTP/1.1 client on raw Trio streams: the load generator's transport.

Why not trio-websocket (our `verdant_trio.client`): it runs a reader task per connection that
parses every frame with wsproto and hands it over a memory channel, which costs the generator
roughly as much CPU per frame as the server spends. With 50 listeners receiving a Node server's
~150 frames per operation, the generator, not the server, became the bottleneck. Here a
connection is one loop over a byte buffer:

- server frames are never masked, so a frame is a 2-10 byte header and its payload;
- client frames must be masked, and a zero mask key is a valid key whose XOR is the identity,
  so sending costs one header and no copy of the payload;
- pings are answered, a close frame ends the connection with its code.

`python -m bench --client trio-websocket` swaps in `verdant_trio.client` for comparison.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import trio

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_ZERO_MASK: Final = b"\x00\x00\x00\x00"
_READ_BYTES: Final = 256 * 1024


class WsClosed(Exception):
    """The server closed the websocket (code None: the TCP connection ended without a close)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"websocket closed: {code} {reason}".strip())
        self.code = code
        self.reason = reason


class HandshakeRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"websocket refused: HTTP {status} {body[:200]!r}")
        self.status = status
        self.body = body


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + _ZERO_MASK + payload


def split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url.replace("ws://", "http://", 1))
    if parts.scheme not in ("http", "ws"):
        raise ValueError(f"only plain http/ws URLs are supported, got {url!r}")
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"


class LeanSocket:
    """One websocket. `receive()` returns text payloads as bytes; `send()` takes str or bytes."""

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self.stream = stream
        self._buf = bytearray(buffered)
        self._pos = 0
        self._send_lock = trio.StrictFIFOLock()
        self.close_code: int | None = None
        self.bytes_received = 0

    @classmethod
    async def connect(
        cls,
        url: str,
        token: str | None,
        *,
        timeout_s: float = 30.0,
        rcvbuf_bytes: int | None = None,
    ) -> LeanSocket:
        host, port, path = split_url(url)
        with trio.fail_after(timeout_s):
            if rcvbuf_bytes is None:
                stream = await trio.open_tcp_stream(host, port)
            else:
                # A small receive buffer makes a client that stops reading stall the server's
                # writes sooner (the kernel otherwise absorbs megabytes on loopback).
                sock = trio.socket.socket()
                sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, rcvbuf_bytes)
                await sock.connect((host, port))
                stream = trio.SocketStream(sock)
            try:
                key = base64.b64encode(os.urandom(16)).decode()
                lines = [
                    f"GET {path} HTTP/1.1",
                    f"Host: {host}:{port}",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    f"Sec-WebSocket-Key: {key}",
                    "Sec-WebSocket-Version: 13",
                ]
                if token is not None:
                    lines.append(f"Sec-WebSocket-Protocol: Bearer, {token}")
                await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
                head, rest = await _read_head(stream)
                status = int(head.split(b" ", 2)[1])
                if status != 101:
                    body = rest + await _read_some(stream, _content_length(head) - len(rest))
                    raise HandshakeRefused(status, body)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        return cls(stream, rest)

    async def send(self, data: str | bytes) -> None:
        payload = data.encode() if isinstance(data, str) else data
        async with self._send_lock:
            try:
                await self.stream.send_all(_frame(OP_TEXT, payload))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise WsClosed(self.close_code) from None

    async def send_json(self, message: Any) -> None:
        await self.send(orjson.dumps(message))

    async def _fill(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        try:
            chunk = await self.stream.receive_some(_READ_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            chunk = b""
        if not chunk:
            raise WsClosed(self.close_code)
        self.bytes_received += len(chunk)
        self._buf += chunk

    async def _frame(self) -> tuple[int, bool, bytes]:
        while True:
            buf, pos = self._buf, self._pos
            available = len(buf) - pos
            if available >= 2:
                b0, b1 = buf[pos], buf[pos + 1]
                n = b1 & 0x7F
                start = pos + 2
                if n == 126:
                    if available >= 4:
                        n = (buf[pos + 2] << 8) | buf[pos + 3]
                        start = pos + 4
                    else:
                        start = -1
                elif n == 127:
                    if available >= 10:
                        n = struct.unpack_from("!Q", buf, pos + 2)[0]
                        start = pos + 10
                    else:
                        start = -1
                if start >= 0 and b1 & 0x80:
                    raise ValueError("server frames must not be masked")
                if start >= 0 and len(buf) >= start + n:
                    self._pos = start + n
                    return b0 & 0x0F, bool(b0 & 0x80), bytes(buf[start : start + n])
            await self._fill()

    async def receive(self) -> bytes:
        """The next text or binary message; raises `WsClosed` when the server closes."""
        parts: list[bytes] = []
        while True:
            opcode, fin, payload = await self._frame()
            if opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                parts.append(payload)
                if fin:
                    return payload if len(parts) == 1 else b"".join(parts)
            elif opcode == OP_PING:
                async with self._send_lock:
                    await self.stream.send_all(_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.close_code = code
                reason = payload[2:].decode("utf-8", "replace")
                with trio.move_on_after(1):
                    async with self._send_lock:
                        try:
                            await self.stream.send_all(_frame(OP_CLOSE, payload[:2]))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                await trio.aclose_forcefully(self.stream)
                raise WsClosed(code, reason)

    async def receive_json(self) -> Any:
        return orjson.loads(await self.receive())

    async def aclose(self, code: int = 1000) -> None:
        with trio.move_on_after(1):
            async with self._send_lock:
                try:
                    await self.stream.send_all(_frame(OP_CLOSE, struct.pack("!H", code)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        await trio.aclose_forcefully(self.stream)


async def _read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("connection closed during the HTTP response head")
        data += chunk
        if len(data) > 1 << 20:
            raise ConnectionError("HTTP response head too large")
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    return head, rest


async def _read_some(stream: trio.SocketStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _headers(head: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def _content_length(head: bytes) -> int:
    value = _headers(head).get("content-length")
    return int(value) if value and value.isdigit() else 0


class LeanHttp:
    """A keep-alive HTTP/1.1 connection (Content-Length or chunked responses)."""

    def __init__(self, url: str) -> None:
        self.host, self.port, _ = split_url(url)
        self._stream: trio.SocketStream | None = None
        self._rest = b""

    async def _connect(self) -> trio.SocketStream:
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._rest = b""
        return self._stream

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        for attempt in (0, 1):
            stream = await self._connect()
            lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            for name, value in (headers or {}).items():
                lines.append(f"{name}: {value}")
            lines.append(f"Content-Length: {len(body)}")
            try:
                await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
                return await self._response(stream)
            except (trio.BrokenResourceError, ConnectionError):
                await self.aclose()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _response(self, stream: trio.SocketStream) -> tuple[int, bytes]:
        data = bytearray(self._rest)
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
        head, _, rest = bytes(data).partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = _headers(head)
        buf = bytearray(rest)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                while b"\r\n" not in buf:
                    buf += await _need(stream)
                size_line, _, tail = bytes(buf).partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                buf = bytearray(tail)
                while len(buf) < size + 2:
                    buf += await _need(stream)
                body += buf[:size]
                del buf[: size + 2]
                if size == 0:
                    break
            self._rest = bytes(buf)
        else:
            length = int(headers.get("content-length", "0"))
            while len(buf) < length:
                buf += await _need(stream)
            body, self._rest = buf[:length], bytes(buf[length:])
        if headers.get("connection", "").lower() == "close":
            await self.aclose()
        return status, bytes(body)

    async def aclose(self) -> None:
        if self._stream is not None:
            await trio.aclose_forcefully(self._stream)
            self._stream = None


async def _need(stream: trio.SocketStream) -> bytes:
    chunk = await stream.receive_some(65536)
    if not chunk:
        raise ConnectionError("connection closed mid-body")
    return chunk


async def messages(sock: LeanSocket) -> AsyncIterator[bytes]:
    while True:
        yield await sock.receive()
