"""RFC 6455 server side, without a socket: wsproto plays the client on both directions."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.events import Ping as WsPing

from verdant_trio.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    Close,
    FrameError,
    MessageReader,
    Ping,
    accept_key,
    accept_response,
    close_frame,
    encode_frame,
    head_length,
    parse_upgrade,
    refusal_response,
    unmask,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="

BROWSER_HEAD = (
    "GET /sync%2Fpath?token=abc&x=1 HTTP/1.1\r\n"
    "Host: example.org\r\n"
    "connection: keep-alive, Upgrade\r\n"
    "Pragma: no-cache\r\n"
    "upgrade: WebSocket\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    "Sec-WebSocket-Protocol: Bearer, eyJ.token.sig\r\n"
    "\r\n"
).encode()


def test_a_browser_upgrade_is_recognised() -> None:
    assert head_length(BROWSER_HEAD) == len(BROWSER_HEAD)
    assert head_length(BROWSER_HEAD[:-2]) == 0
    upgrade = parse_upgrade(BROWSER_HEAD)
    assert upgrade is not None
    assert upgrade.path == "/sync/path"
    assert upgrade.query_string == b"token=abc&x=1"
    assert upgrade.subprotocols == ("Bearer", "eyJ.token.sig")
    assert upgrade.key == KEY


def _variant(old: str, new: str) -> bytes:
    assert old in BROWSER_HEAD.decode()
    return BROWSER_HEAD.decode().replace(old, new, 1).encode()


@pytest.mark.parametrize(
    "head",
    [
        _variant("GET ", "POST "),
        _variant("HTTP/1.1\r\n", "HTTP/1.0\r\n"),
        _variant("upgrade: WebSocket", "upgrade: h2c"),
        _variant("connection: keep-alive, Upgrade", "connection: keep-alive"),
        _variant("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
        _variant(f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Key: c2hvcnQ="),
        _variant(f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Key: not base64!"),
        _variant(f"Sec-WebSocket-Key: {KEY}\r\n", f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Key: {KEY}\r\n"),
        _variant("Pragma: no-cache\r\n", "Content-Length: 5\r\n"),
        _variant("Pragma: no-cache\r\n", "Pragma: no-cache\r\n folded\r\n"),
        _variant("Pragma: no-cache\r\n", "Pragma : no-cache\r\n"),
        _variant("Host: example.org", "Host: ex\xe4mple.org"),
        _variant("/sync%2Fpath", "http://example.org/sync"),
    ],
)
def test_anything_unusual_is_left_to_the_http_server(head: bytes) -> None:
    assert parse_upgrade(head) is None


def test_handshake_answers() -> None:
    # RFC 6455 §1.3's worked example
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    answer = accept_response(KEY, "Bearer")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert b"Sec-WebSocket-Protocol: Bearer\r\n" in answer and answer.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Protocol" not in accept_response(KEY)
    assert b"Sec-WebSocket-Extensions" not in accept_response(KEY)
    refusal = refusal_response(401, b'{"code":4011}')
    assert refusal.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"content-length: 13\r\n" in refusal and refusal.endswith(b'\r\n\r\n{"code":4011}')


def client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = b"\x01\x02\x03\x04",
    length: int | None = None,
) -> bytes:
    """A client frame built by hand, for what a well-behaved client library never sends."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 0x10000:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_all(reader: MessageReader) -> list[Any]:
    events = []
    while (event := reader.next_event()) is not None:
        events.append(event)
    return events


message_parts = st.one_of(
    st.lists(st.text(max_size=300), min_size=1, max_size=4).map(lambda parts: ("text", parts)),
    st.lists(st.binary(max_size=300), min_size=1, max_size=4).map(lambda parts: ("bytes", parts)),
)


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(st.tuples(message_parts, st.booleans()), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
)
def test_messages_come_out_whole_however_the_bytes_are_cut(
    messages: list[tuple[tuple[str, list[Any]], bool]], cuts: list[int]
) -> None:
    sender = client()
    wire = b""
    expected: list[Any] = []
    for (kind, parts), ping_inside in messages:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            event = TextMessage(part, message_finished=last) if kind == "text" else BytesMessage(part, message_finished=last)
            wire += sender.send(event)
            if ping_inside and not last:  # control frames may come between fragments
                wire += sender.send(WsPing(b"p%d" % i))
                expected.append(Ping(b"p%d" % i))
        expected.append("".join(parts) if kind == "text" else b"".join(parts))
    reader = MessageReader(max_message_bytes=1 << 20)
    got: list[Any] = []
    start = 0
    for cut in sorted(c for c in cuts if c < len(wire)) + [len(wire)]:
        reader.feed(wire[start:cut])
        start = max(start, cut)
        got += read_all(reader)
    assert got == expected


def test_leading_bytes_after_the_head_are_read() -> None:
    frame = client().send(TextMessage("early"))
    assert read_all(MessageReader(1024, frame)) == ["early"]


def test_close_frames() -> None:
    reader = MessageReader(1024)
    reader.feed(client().send(CloseConnection(code=4000, reason="bye é")))
    assert read_all(reader) == [Close(4000, "bye é")]
    reader.feed(client_frame(OP_CLOSE, b""))
    assert read_all(reader) == [Close(1005, "")]


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (client_frame(OP_TEXT, b"hello", mask=None), 1002),
        (client_frame(OP_TEXT, b"hello", rsv=0x40), 1002),
        (client_frame(3, b"hello"), 1002),
        (client_frame(0xB, b""), 1002),
        (client_frame(OP_CONTINUATION, b"orphan"), 1002),
        (client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"), 1002),
        (client_frame(OP_PING, b"x" * 126), 1002),
        (client_frame(OP_PING, b"x", fin=False), 1002),
        (client_frame(OP_CLOSE, b"\x03"), 1002),
        (client_frame(OP_CLOSE, struct.pack("!H", 1005)), 1002),
        (client_frame(OP_CLOSE, struct.pack("!H", 999)), 1002),
        (client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007),
        (client_frame(OP_TEXT, b"\xc3\x28"), 1007),
        (client_frame(OP_TEXT, "é".encode()[:1], fin=False) + client_frame(OP_CONTINUATION, b"\x00"), 1007),
        (client_frame(OP_TEXT, b"x" * 2000), 1009),
        (client_frame(OP_TEXT, b"x" * 600, fin=False) + client_frame(OP_CONTINUATION, b"x" * 600), 1009),
        (client_frame(OP_BINARY, b"", length=1 << 40)[:10], 1009),
        (bytes((0x81, 0xFF)) + (1 << 63).to_bytes(8, "big"), 1002),
    ],
)
def test_protocol_violations_fail_with_their_close_code(wire: bytes, code: int) -> None:
    reader = MessageReader(max_message_bytes=1024)
    reader.feed(wire)
    with pytest.raises(FrameError) as failure:
        read_all(reader)
    assert failure.value.code == code


def test_an_oversized_message_is_refused_before_its_payload_arrives() -> None:
    reader = MessageReader(max_message_bytes=1024)
    reader.feed(client_frame(OP_TEXT, b"x" * 5000)[:8])  # header and mask only
    with pytest.raises(FrameError) as failure:
        reader.next_event()
    assert failure.value.code == 1009


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_server_frames_are_read_by_a_client(size: int) -> None:
    text = ("é" * size)[: size // 2] + "a" * (size - len(("é" * size)[: size // 2]) * 2)
    receiver = client()
    receiver.receive_data(encode_frame(OP_TEXT, text.encode()))
    events = list(receiver.events())
    assert len(events) == 1 and isinstance(events[0], TextMessage)
    assert events[0].data == text and events[0].message_finished


def test_close_reasons_are_cut_on_a_character_to_fit() -> None:
    frame = close_frame(1013, "é" * 200)
    assert len(frame) <= 127
    receiver = client()
    receiver.receive_data(frame)
    (event,) = list(receiver.events())
    assert isinstance(event, CloseConnection) and event.code == 1013
    assert event.reason == "é" * 61


@given(st.binary(max_size=2000), st.binary(min_size=4, max_size=4))
def test_unmask_is_the_xor_of_the_spec(data: bytes, mask: bytes) -> None:
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert unmask(data, mask) == expected
    assert unmask(memoryview(bytearray(data)), mask) == expected
