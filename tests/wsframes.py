"""Client frames built by hand, for what a well-behaved client library never sends, and a raw
websocket upgrade over TCP (tests of the edge, where the peer is hostile)."""

from __future__ import annotations

import base64
import os
import struct

import trio


def masked(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, length: int | None = None,
    mask: bytes | None = b"\x01\x02\x03\x04",
) -> bytes:
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", first, bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


async def raw_upgrade(port: int, token: str, path: str = "/verdant") -> tuple[trio.SocketStream, bytes]:
    """A websocket opened by hand on a TCP stream; returns it and the bytes after the 101."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all((
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Protocol: Bearer, {token}\r\n\r\n"
    ).encode())
    head = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            assert chunk, "the server closed during the upgrade"
            head += chunk
    head, _, rest = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return stream, rest
