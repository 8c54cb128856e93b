"""The stream websocket over a real socket pair, with the `websockets` client protocol as the peer:
messages whole however the bytes are cut, every breach the library reports closed with its
code, control-frame floods cut off, closes bounded, large messages waiting for memory."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side

from verdant_trio.engine.budget import MEMORY_PER_BYTE, MemoryBudget
from verdant_trio.sync.errors import Disconnected
from verdant_trio.transport.websocket import CONTROL_BURST, StreamWebSocket

from .wsframes import masked

pytestmark = pytest.mark.trio


class Peer:
    """The client side: the library's client protocol over the other end of the pair."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.protocol = Protocol(Side.CLIENT, max_size=None)
        self.eof = False
        self.pending: list[Frame] = []

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                await self.stream.send_all(data)

    async def frames(self, timeout_s: float = 10.0) -> list[Frame]:
        """Frames until the server ends the stream."""
        out: list[Frame] = []
        with trio.fail_after(timeout_s):
            while not self.eof:
                data = await self.stream.receive_some(65536)
                if not data:
                    self.eof = True
                    self.protocol.receive_eof()
                else:
                    self.protocol.receive_data(data)
                out += [e for e in self.protocol.events_received() if isinstance(e, Frame)]
        return out

    async def next_frame(self, timeout_s: float = 10.0) -> Frame:
        with trio.fail_after(timeout_s):
            while True:
                self.pending += [e for e in self.protocol.events_received() if isinstance(e, Frame)]
                if self.pending:
                    return self.pending.pop(0)
                data = await self.stream.receive_some(65536)
                assert data, "the server ended the stream"
                self.protocol.receive_data(data)


@asynccontextmanager
async def pair(
    *, max_message_bytes: int = 1 << 20, budget: MemoryBudget | None = None, wait_s: float = 5.0,
) -> AsyncIterator[tuple[StreamWebSocket, Peer]]:
    a, b = trio.socket.socketpair()
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    ws = StreamWebSocket(
        server_stream, max_message_bytes=max_message_bytes,
        budget=budget or MemoryBudget(1 << 30), budget_wait_s=wait_s,
    )
    try:
        yield ws, Peer(client_stream)
    finally:
        await server_stream.aclose()
        await client_stream.aclose()


async def test_messages_come_out_whole_cut_anywhere_with_pings_between_fragments() -> None:
    async with pair() as (ws, peer):
        client = peer.protocol
        client.send_text("first é".encode())
        client.send_text(b"frag-", fin=False)
        client.send_ping(b"p1")
        client.send_continuation(b"ment", fin=True)
        client.send_binary(b"\x00\x01")
        wire = b"".join(client.data_to_send())
        async with trio.open_nursery() as nursery:
            async def trickle() -> None:
                for i in range(0, len(wire), 3):  # three bytes per write
                    await peer.send_raw(wire[i : i + 3])
                    await trio.lowlevel.checkpoint()
            nursery.start_soon(trickle)
            with trio.fail_after(10):
                assert await ws.receive() == "first é"
                assert await ws.receive() == "frag-ment"
                assert await ws.receive() == b"\x00\x01"
        pong = await peer.next_frame()
        assert pong.opcode is Opcode.PONG and pong.data == b"p1"


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (masked(0x1, b"hello", mask=None), 1002),  # unmasked
        (masked(0x1, b"hello", rsv=0x40), 1002),  # no extension agreed
        (masked(0x3, b"hello"), 1002),  # unknown data opcode
        (masked(0xB, b""), 1002),  # unknown control opcode
        (masked(0x0, b"orphan"), 1002),  # continuation without a message
        (masked(0x1, b"a", fin=False) + masked(0x1, b"b"), 1002),  # new message inside one
        (masked(0x9, b"x" * 126), 1002),  # control frame too long
        (masked(0x9, b"x", fin=False), 1002),  # fragmented control frame
        (masked(0x8, b"\x03"), 1002),  # one-byte close payload
        (masked(0x8, struct.pack("!H", 1005)), 1002),  # a code never sent on the wire
        (masked(0x8, struct.pack("!H", 999)), 1002),
        (masked(0x8, struct.pack("!H", 1000) + b"\xff"), 1007),  # reason not UTF-8
        (masked(0x1, b"\xc3\x28"), 1007),  # text not UTF-8
        (masked(0x1, "é".encode()[:1], fin=False) + masked(0x0, b"\x00"), 1007),
        (masked(0x1, b"x" * 2000), 1009),
        (masked(0x1, b"x" * 600, fin=False) + masked(0x0, b"x" * 600), 1009),
        (masked(0x2, b"", length=1 << 40)[:14], 1009),  # refused from its header
    ],
)
async def test_every_breach_is_closed_with_its_code_and_the_stream_ended(wire: bytes, code: int) -> None:
    async with pair(max_message_bytes=1024) as (ws, peer):
        await peer.send_raw(wire)
        with trio.fail_after(10), pytest.raises(Disconnected):
            while True:
                await ws.receive()
        frames = await peer.frames()  # the close frame, then the server's end of stream
        assert [f.opcode for f in frames] == [Opcode.CLOSE]
        assert Close.parse(frames[0].data).code == code


async def test_after_a_breach_the_close_is_bounded_by_its_caller() -> None:
    """A peer that breaks the protocol and then never reads nor closes holds nothing for long:
    the connection's close gives up after its timeout."""
    async with pair(max_message_bytes=1024) as (ws, peer):
        await peer.send_raw(masked(0x1, b"hello", mask=None))
        with pytest.raises(Disconnected):
            await ws.receive()
        with trio.move_on_after(0.5) as scope:
            await ws.close(1000, "")
        assert scope.cancelled_caught  # waiting for a peer that never answers, until cut off


async def test_a_close_handshake_completes_and_echoes_the_code() -> None:
    async with pair() as (ws, peer):
        peer.protocol.send_close(4321, "done")
        await peer.send()
        with trio.fail_after(10), pytest.raises(Disconnected):
            await ws.receive()
        assert ws.close_code == 4321
        frames = await peer.frames()
        assert [f.opcode for f in frames] == [Opcode.CLOSE]
        assert Close.parse(frames[0].data).code == 4321


async def test_a_control_frame_flood_is_cut_off_with_1008() -> None:
    async with pair() as (ws, peer):
        flood = masked(0xA, b"") * (CONTROL_BURST * 3)
        await peer.send_raw(flood)
        with trio.fail_after(10), pytest.raises(Disconnected):
            await ws.receive()
        frames = await peer.frames()
        assert [f.opcode for f in frames] == [Opcode.CLOSE]
        assert Close.parse(frames[0].data).code == 1008


async def test_pings_within_the_pace_are_answered() -> None:
    async with pair() as (ws, peer):
        for i in range(CONTROL_BURST // 2):
            peer.protocol.send_ping(b"%d" % i)
        peer.protocol.send_text(b"after")
        await peer.send()
        with trio.fail_after(10):
            assert await ws.receive() == "after"
        pongs = [await peer.next_frame() for _ in range(CONTROL_BURST // 2)]
        assert [p.data for p in pongs] == [b"%d" % i for i in range(CONTROL_BURST // 2)]


async def test_the_reader_yields_between_messages_and_between_steps() -> None:
    """However the input is cut into frames, other tasks run while one connection reads it:
    a sibling task runs before every message is returned and while a flood of pongs is parsed
    (before the fix, a stream of pongs kept the reader looping without a checkpoint, and every
    other task of the process stalled)."""
    async with pair() as (ws, peer):
        for i in range(500):
            peer.protocol.send_text(b"%d" % i)
        wire = b"".join(peer.protocol.data_to_send()) + masked(0xA, b"") * 20_000
        ticks = 0

        async def sibling() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send_raw, wire)
            nursery.start_soon(sibling)
            seen = []
            with trio.fail_after(10):
                for i in range(500):
                    assert await ws.receive() == str(i)
                    seen.append(ticks)
                before = ticks
                with pytest.raises(Disconnected):
                    await ws.receive()
                # Trio runs the tasks of a batch in random order, so a yield before each message
                # shows as the sibling running at least once in any two messages.
                assert all(later > earlier for earlier, later in zip(seen, seen[2:], strict=False))
                assert ticks > before  # while the flood was parsed, before it was cut off
                nursery.start_soon(ws.close, 1000, "")  # reads away what the flood still sends
                frames = await peer.frames()
            nursery.cancel_scope.cancel()
        assert Close.parse(frames[-1].data).code == 1008


async def test_large_messages_wait_for_memory_and_give_it_back() -> None:
    size = 300_000
    budget = MemoryBudget(size * MEMORY_PER_BYTE)  # room for one at a time
    async with pair(budget=budget) as (first, peer1), pair(budget=budget) as (second, peer2):
        for peer in (peer1, peer2):
            peer.protocol.send_text(b"x" * size)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer1.send)
            assert await first.receive() == "x" * size
            held = first.take_reservation()
            assert sum(r.nbytes for r in held) == size * MEMORY_PER_BYTE
            assert budget.used_bytes == size * MEMORY_PER_BYTE
            nursery.start_soon(peer2.send)
            got: list[str | bytes] = []

            async def receive_second() -> None:
                got.append(await second.receive())

            nursery.start_soon(receive_second)
            with trio.fail_after(10):
                while budget.waiting == 0:
                    await trio.sleep(0.01)
            assert not got  # its payload is not read until the first gives its memory back
            for reservation in held:
                reservation.release()
        assert got == ["x" * size]
        second.release_all()
        assert budget.used_bytes == 0


async def test_a_large_message_that_cannot_get_memory_is_closed_with_1013() -> None:
    size = 300_000
    budget = MemoryBudget(size * MEMORY_PER_BYTE)
    hog = await budget.reserve(size)
    async with pair(budget=budget, wait_s=0.3) as (ws, peer):
        peer.protocol.send_text(b"x" * size)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer.send)
            with trio.fail_after(10), pytest.raises(Disconnected):
                await ws.receive()
            nursery.start_soon(ws.close, 1000, "")  # as the connection does: reads the rest away
            frames = await peer.frames()
            nursery.cancel_scope.cancel()
        assert Close.parse(frames[-1].data).code == 1013
    assert budget.waiting == 0
    hog.release()
    assert budget.used_bytes == 0


async def test_messages_handed_over_together_leave_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's messages for one peer cost one system call: one segment for the peer, or for a
    proxy in between, to read and forward."""
    async with pair() as (ws, peer):
        writes: list[int] = []
        real_write, real_writev = os.write, os.writev

        def write(fd: int, data: bytes) -> int:
            writes.append(len(data))
            return real_write(fd, data)

        def writev(fd: int, buffers: list[bytes]) -> int:
            writes.append(sum(len(b) for b in buffers))
            return real_writev(fd, buffers)

        messages = [b'{"type":"server-ack"}', b'{"type":"op-re"}', b'{"type":"global-ack"}']
        with monkeypatch.context() as patched:
            patched.setattr(os, "write", write)
            patched.setattr(os, "writev", writev)
            assert ws.write_now(*messages)
        assert len(writes) == 1
        assert [bytes((await peer.next_frame()).data) for _ in messages] == messages


async def test_a_partial_write_of_several_messages_finishes_in_order() -> None:
    """Past what the socket takes at once, `flush` sends the rest from where the kernel
    stopped, inside a frame or between two."""
    async with pair() as (ws, peer):
        big = ("ü" * 600_000).encode()  # more than a socket buffer, header and payload apart
        messages = [b'{"n":1}', big, b'{"n":3}', big[:70_000], b'{"n":5}']
        assert ws.write_now(*messages)
        assert ws.pending_output
        received: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.flush)
            for _ in messages:
                received.append(bytes((await peer.next_frame()).data))
        assert not ws.pending_output
        assert received == messages


async def test_sends_frame_small_and_large_messages_the_library_reads() -> None:
    async with pair() as (ws, peer):
        small, large = b'{"type":"x"}', ("é" * 100_000).encode()
        assert ws.write_now(small)
        await ws.send(large)
        assert bytes((await peer.next_frame()).data) == small
        frame = await peer.next_frame()
        assert frame.opcode is Opcode.TEXT and bytes(frame.data) == large
