"""What the sync socket does of RFC 6455 beside the `websockets` protocol, without a socket:
the upgrade, frame boundaries ahead of the parser, the header of large frames. The library's
own client protocol plays the client."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side

from verdant_trio.transport.upgrade import (
    FrameBoundaries,
    accept_response,
    fit_close_reason,
    head_length,
    parse_upgrade,
    text_frame_header,
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
        _variant("Host: example.org\r\n", ""),
        _variant("Host: example.org\r\n", "Host: example.org\r\nHost: evil.example\r\n"),
        _variant("Host: example.org", "Host:"),
        _variant("/sync%2Fpath", "http://example.org/sync"),
    ],
)
def test_anything_unusual_is_left_to_the_http_server(head: bytes) -> None:
    assert parse_upgrade(head) is None


def test_handshake_answers() -> None:
    # RFC 6455 §1.3's worked example
    answer = accept_response(KEY, "Bearer")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert b"Sec-WebSocket-Protocol: Bearer\r\n" in answer and answer.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Protocol" not in accept_response(KEY)
    assert b"Sec-WebSocket-Extensions" not in accept_response(KEY)
    from verdant_trio.transport.upgrade import refusal_response

    refusal = refusal_response(401, b'{"code":4011}')
    assert refusal.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert b"content-length: 13\r\n" in refusal and refusal.endswith(b'\r\n\r\n{"code":4011}')


def client_frames(kinds: list[tuple[str, int, bool]]) -> list[bytes]:
    """Client frames as the library's client side writes them (masked), one bytes per frame."""
    sender = Protocol(Side.CLIENT)
    frames = []
    for kind, size, fin in kinds:
        payload = b"x" * size
        if kind == "text":
            sender.send_text(payload, fin=fin) if not sender.expect_continuation_frame \
                else sender.send_continuation(payload, fin=fin)
        elif kind == "binary":
            sender.send_binary(payload, fin=fin) if not sender.expect_continuation_frame \
                else sender.send_continuation(payload, fin=fin)
        elif kind == "ping":
            sender.send_ping(payload[:125])
        else:
            sender.send_pong(payload[:125])
        frames += sender.data_to_send()
    return frames


frame_kinds = st.lists(
    st.tuples(
        st.sampled_from(["text", "binary", "ping", "pong"]),
        st.sampled_from([0, 1, 125, 126, 200, 65535, 65536, 70000]),
        st.booleans(),
    ),
    min_size=1, max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(kinds=frame_kinds, cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=10),
       max_frames=st.integers(min_value=1, max_value=5))
def test_frame_boundaries_agree_with_the_library_however_the_bytes_are_cut(
    kinds: list[tuple[str, int, bool]], cuts: list[int], max_frames: int
) -> None:
    """Each scan stops at a frame boundary or at the end of the bytes it was given, counts the
    frames the library's client wrote, and announces exactly the payloads of large messages."""
    frames = client_frames(kinds)
    wire = b"".join(frames)
    starts = {0}
    position = 0
    for frame in frames:
        position += len(frame)
        starts.add(position)
    large_bytes = 1000
    expected_large = 0
    message = 0
    for (kind, size, fin), _ in zip(kinds, frames, strict=True):
        if kind in ("ping", "pong"):
            continue
        if message + size > large_bytes:
            expected_large += size
        message = 0 if fin else message + size
    scanner = FrameBoundaries(large_bytes)
    seen_frames = seen_controls = seen_large = 0
    chunk_start = 0
    for cut in sorted({c for c in cuts if 0 < c < len(wire)} | {len(wire)}):
        chunk = wire[chunk_start:cut]
        offset = 0
        while offset < len(chunk):
            scan = scanner.scan(chunk, offset, max_frames)
            assert scan.frames <= max_frames
            assert scan.end == len(chunk) or chunk_start + scan.end in starts
            assert scan.end > offset or scan.frames == 0
            seen_frames += scan.frames
            seen_controls += scan.control_frames
            seen_large += scan.large_payload
            offset = scan.end
        chunk_start = cut
    assert seen_frames == len(frames)
    assert seen_controls == sum(1 for kind, _, _ in kinds if kind in ("ping", "pong"))
    assert seen_large == expected_large


def test_a_large_header_is_announced_before_its_payload() -> None:
    (frame,) = client_frames([("text", 200_000, True)])
    scanner = FrameBoundaries(65536)
    scan = scanner.scan(frame[:14], 0, 64)  # header and mask only
    assert (scan.end, scan.frames, scan.large_payload) == (14, 1, 200_000)
    assert scanner.scan(frame[14:], 0, 64).frames == 0


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_large_frame_headers_are_read_by_the_library(size: int) -> None:
    text = ("é" * size)[: size // 2] + "a" * (size - len(("é" * size)[: size // 2]) * 2)
    payload = text.encode()
    receiver = Protocol(Side.CLIENT)
    receiver.receive_data(text_frame_header(len(payload)) + payload)
    (event,) = receiver.events_received()
    assert isinstance(event, Frame) and event.opcode is Opcode.TEXT and event.fin
    assert bytes(event.data).decode() == text


def test_close_reasons_are_cut_on_a_character_to_fit() -> None:
    assert fit_close_reason("é" * 200) == "é" * 61
    assert len(fit_close_reason("x" * 300).encode()) == 123
    assert fit_close_reason("short") == "short"
