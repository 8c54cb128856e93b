"""The listening sockets over real TCP: our websocket path, the hand-over to hypercorn, idle."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from verdant_trio.client import connect, sync_message, timestamp
from verdant_trio.engine.settings import ConnectionSettings

from .conftest import RunningServer

pytestmark = pytest.mark.trio


class RawSocket:
    """A websocket client on a bare TCP stream, driven event by event (wsproto)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.eof = False

    @classmethod
    async def open(cls, server: RunningServer) -> RawSocket:
        port = int(server.url.rsplit(":", 1)[1])
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self, timeout_s: float = 10.0) -> Event | None:
        """The next event; None once the server ended the stream."""
        with trio.fail_after(timeout_s):
            while True:
                for event in self.ws.events():
                    return event
                if self.eof:
                    return None
                data = await self.stream.receive_some(65536)
                if not data:
                    self.eof = True
                    return None
                self.ws.receive_data(data)

    async def next_control(self) -> Event | None:
        """The next event that is not a message (presence may arrive at any time)."""
        while isinstance(event := await self.next_event(), TextMessage):
            pass
        return event

    async def handshake(self, server: RunningServer, token: str) -> Event | None:
        await self.send(Request(
            host="127.0.0.1", target=server.settings.app.sync_path, subprotocols=["Bearer", token],
        ))
        return await self.next_event()

    async def message(self) -> dict[str, Any]:
        """The next text message, skipping presence chatter."""
        while True:
            event = await self.next_event()
            assert isinstance(event, TextMessage), event
            message = orjson.loads(event.data)
            if not message["type"].startswith("presence"):
                return message


def sync_frame(replica: str) -> TextMessage:
    return TextMessage(orjson.dumps(sync_message(replica)).decode())


async def test_the_sync_socket_answers_pings_and_echoes_a_close(server: RunningServer) -> None:
    raw = await RawSocket.open(server)
    accepted = await raw.handshake(server, server.token())
    assert isinstance(accepted, AcceptConnection) and accepted.subprotocol == "Bearer"
    await raw.send(sync_frame("r1"))
    assert (await raw.message())["type"] == "sync-resp"
    await raw.send(Ping(b"are you there"))
    assert await raw.next_control() == Pong(b"are you there")
    await raw.send(CloseConnection(code=4321, reason="done"))
    closing = await raw.next_control()
    assert isinstance(closing, CloseConnection) and closing.code == 4321
    assert await raw.next_event() is None  # and then the server ends the stream
    await raw.stream.aclose()


async def test_a_refused_upgrade_is_an_http_error_with_a_verdant_body(server: RunningServer) -> None:
    raw = await RawSocket.open(server)
    refused = await raw.handshake(server, "not-a-token")
    assert isinstance(refused, RejectConnection) and refused.status_code == 401
    body = b""
    while True:
        event = await raw.next_event()
        if not isinstance(event, RejectData):
            break
        body += event.data
        if event.body_finished:
            break
    assert orjson.loads(body)["code"] == 4011
    await raw.stream.aclose()


async def test_an_upgrade_on_a_kept_alive_connection_is_served_too(server: RunningServer) -> None:
    """A first request that is not an upgrade hands the whole connection to hypercorn; an
    upgrade that follows on it is served from ASGI events, with the same behaviour."""
    port = int(server.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    response = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(65536)
        head, _, body = response.partition(b"\r\n\r\n")
        length = int(next(
            line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        ))
        while len(body) < length:
            body += await stream.receive_some(65536)
    assert head.startswith(b"HTTP/1.1 200")
    raw = RawSocket(stream)
    accepted = await raw.handshake(server, server.token())
    assert isinstance(accepted, AcceptConnection) and accepted.subprotocol == "Bearer"
    await raw.send(sync_frame("r2"))
    assert (await raw.message())["type"] == "sync-resp"
    await raw.send(CloseConnection(code=1000))
    await stream.aclose()


async def test_a_slow_first_request_holds_up_nobody(server: RunningServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    await slow.send_all(b"GET /verdant HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")
    with trio.fail_after(10):
        async with connect(server.sync_url, server.token()) as client:
            assert (await client.sync("r3"))["type"] == "sync-resp"
        async with server.http() as http:
            assert (await http.get("/healthz")).status_code == 200
    await slow.aclose()


async def test_silent_sockets_are_closed_and_heartbeats_keep_them(server_factory: Any) -> None:
    """The talking socket is older than the silent one, so the sweep that closes the silent one
    would have closed it too without its heartbeats: after that sweep it still answers."""
    idle_timeout_s = 1.0
    connections = ConnectionSettings(idle_timeout_s=idle_timeout_s)
    async with server_factory(core={"connections": connections}) as server, connect(
        server.sync_url, server.token(user="bob")
    ) as talking:
        await talking.sync("talking")
        sent = 0
        stop = trio.Event()

        async def heartbeats() -> None:
            nonlocal sent
            while not stop.is_set():
                await talking.send({"type": "heartbeat"})
                sent += 1
                with trio.move_on_after(0.1):  # paces them: ten per idle timeout
                    await stop.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeats)
            async with connect(server.sync_url, server.token()) as silent:
                last_sent = trio.current_time()  # the server hears it after this
                await silent.sync("silent")
                with trio.fail_after(10):
                    assert await silent.wait_closed() == 4008
                # not before the timeout since its last frame (the server's clock is
                # time.monotonic, trio's perf_counter: both CLOCK_MONOTONIC on Linux)
                assert trio.current_time() - last_sent >= idle_timeout_s
            stop.set()
        # answers come in order: the last one is to a heartbeat sent after that sweep
        await talking.send({"type": "heartbeat"})
        for _ in range(sent + 1):
            await talking.wait_for("heartbeat-response")  # raises Closed if it was closed
        assert talking.close_code is None


async def test_large_messages_cross_whole_in_both_directions(server: RunningServer) -> None:
    """A 300 KB op in (several TCP reads) and a sync-resp of several of them out (written as
    header and payload apart) arrive byte for byte."""
    values = [f"{i}:" + "é" * 150_000 for i in range(3)]
    async with connect(server.sync_url, server.token()) as writer:
        await writer.sync("writer")
        for i, value in enumerate(values):
            stamp = await writer.op("writer", [{
                "oid": f"items/big{i}", "timestamp": timestamp(),
                "data": {"op": "initialize", "value": {"text": value}},
            }])
            ack = await writer.wait_for("server-ack")
            assert ack["timestamp"] == stamp
    async with connect(server.sync_url, server.token(user="reader")) as reader:
        response = await reader.sync("reader")
    # operations, or baselines if compaction folded them meanwhile
    texts = [op["data"]["value"]["text"] for op in response["operations"]]
    texts += [baseline["snapshot"]["text"] for baseline in response["baselines"]]
    assert sorted(texts) == values
