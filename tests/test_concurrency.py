"""The concurrency shape: heartbeats beside a busy library, capped handshakes, shutdown."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
from trio_websocket import HandshakeError

from verdant_trio.client import connect, timestamp
from verdant_trio.library import LibraryCore

pytestmark = pytest.mark.trio


async def test_heartbeat_is_answered_while_the_library_is_busy(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = LibraryCore.handle

    def slow_handle(self: LibraryCore, peer: Any, message: Any, out: Any) -> None:
        if getattr(message, "replica_id", None) == "slow":
            time.sleep(2.0)  # a long batch in the library's worker thread
        original(self, peer, message, out)

    monkeypatch.setattr(LibraryCore, "handle", slow_handle)
    async with server_factory() as server:
        async with connect(server.sync_url, server.token()) as client:
            await client.sync("r1")
            await client.send({"type": "presence-update", "replicaId": "slow", "presence": {}})
            await trio.sleep(0.2)  # the library is now inside the slow batch
            started = trio.current_time()
            await client.send({"type": "heartbeat", "timestamp": timestamp(), "replicaId": "r1"})
            await client.wait_for("heartbeat-response", timeout_s=5)
            assert trio.current_time() - started < 1.0  # the client gives up after 3 s
            await client.wait_for("presence-changed", timeout_s=10)


class SlowProfiles:
    async def get(self, user_id: str) -> Any:
        await trio.sleep(1.5)
        return {"id": user_id}


async def test_handshakes_beyond_capacity_are_refused_cleanly(server_factory: Any) -> None:
    async with server_factory(
        profiles=SlowProfiles(),
        core={"max_concurrent_handshakes": 2, "handshake_timeout_s": 0.3},
    ) as server:
        results: list[str] = []

        async def attempt(i: int) -> None:
            try:
                async with connect(server.sync_url, server.token(user=f"u{i}")) as client:
                    await client.sync(f"r{i}")
                    results.append("ok")
            except HandshakeError as exc:
                results.append(f"refused {getattr(exc, 'status_code', '?')}")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(attempt, i)
        assert results.count("ok") >= 2
        assert {r for r in results if r != "ok"} <= {"refused 503"}
        assert "refused 503" in results
        # and the server is fine afterwards
        async with connect(server.sync_url, server.token(user="later")) as client:
            assert (await client.sync("r-later"))["type"] == "sync-resp"


async def test_shutdown_closes_websockets_with_going_away(server_factory: Any) -> None:
    async with server_factory() as server:
        async with connect(server.sync_url, server.token()) as client:
            await client.sync("r1")
            server.shutdown.set()
            assert await client.wait_closed() == 1001


async def test_the_idle_sweep_keeps_no_departed_connection_alive(
    tmp_path: Any, autojump_clock: trio.abc.Clock
) -> None:
    """The sweep sleeps between passes; what it swept last must not stay referenced from its
    frame (on a server that goes quiet, indefinitely: a socket and its buffers)."""
    import gc
    import weakref

    from verdant_trio.core import CoreSettings, VerdantCore
    from verdant_trio.libraries import LibrarySettings

    core = VerdantCore(
        CoreSettings(LibrarySettings(databases_dir=tmp_path)), token_secret="s" * 32
    )
    swept = trio.Event()

    class Connection:
        def close_if_idle(self, now: float) -> None:
            swept.set()

    connection = Connection()
    gone = weakref.ref(connection)
    core.connections.add(connection)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(core._close_idle_connections)
        await swept.wait()
        core.connections.discard(connection)  # type: ignore[arg-type]
        del connection
        await trio.sleep(60)  # virtual time: many sweeps over no connection
        gc.collect()
        assert gone() is None
        nursery.cancel_scope.cancel()
