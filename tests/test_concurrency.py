"""The concurrency shape: heartbeats beside a busy library, capped handshakes, shutdown."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio
from trio_websocket import HandshakeError

from verdant_trio.client import connect, timestamp
from verdant_trio.service.config import ProfilesSettings
from verdant_trio.sync.decisions import LibraryCore

pytestmark = pytest.mark.trio


async def test_heartbeat_is_answered_while_the_library_is_busy(
    server_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The library's worker thread is held inside a batch until the heartbeat has been
    answered: the answer cannot have waited for the library (the client gives up after 3 s)."""
    original = LibraryCore.handle
    inside = trio.Event()  # set from the worker thread once the slow batch has started
    release = threading.Event()  # the worker thread waits for this before going on

    def slow_handle(self: LibraryCore, peer: Any, message: Any, out: Any) -> None:
        if getattr(message, "replica_id", None) == "slow":
            trio.from_thread.run_sync(inside.set)
            release.wait(timeout=30)  # bounded, so a failing test still lets the server stop
        original(self, peer, message, out)

    monkeypatch.setattr(LibraryCore, "handle", slow_handle)
    async with server_factory() as server, connect(server.sync_url, server.token()) as client:
        try:
            await client.sync("r1")
            # an operation: batches with operations always run in a worker thread
            await client.op("slow", [{
                "oid": "items/slow", "timestamp": timestamp(),
                "data": {"op": "initialize", "value": {}},
            }])
            with trio.fail_after(10):
                await inside.wait()
            await client.send({"type": "heartbeat", "timestamp": timestamp(), "replicaId": "r1"})
            # answered while the worker thread is still held inside the batch
            await client.wait_for("heartbeat-response", timeout_s=5)
        finally:
            release.set()
        await client.wait_for("server-ack", timeout_s=10)


class GatedProfiles:
    """Profile lookups (made while a handshake slot is held) wait until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = trio.Event()

    async def get(self, user_id: str) -> Any:
        await self.gate.wait()
        return {"id": user_id}


async def test_handshakes_beyond_capacity_are_refused_cleanly(server_factory: Any) -> None:
    """Two handshakes hold the two slots (their profile lookups wait on a gate) until the other
    four have been refused; only then does the gate open and the two finish."""
    profiles = GatedProfiles()
    async with server_factory(
        profiles=profiles,
        # the lookup timeout would otherwise release the slots after 2 s on its own
        profile_settings=ProfilesSettings(timeout_s=30),
        core={"max_concurrent_handshakes": 2, "handshake_timeout_s": 0.3},
    ) as server:
        results: list[str] = []
        four_refused = trio.Event()

        async def attempt(i: int) -> None:
            try:
                async with connect(server.sync_url, server.token(user=f"u{i}")) as client:
                    await client.sync(f"r{i}")
                    results.append("ok")
            except HandshakeError as exc:
                results.append(f"refused {getattr(exc, 'status_code', '?')}")
                if results.count("ok") == 0 and len(results) == 4:
                    four_refused.set()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(attempt, i)
                # the bound only matters when the cap is broken (the assertion below then says
                # how); under the client's 10 s connect timeout, so the holders still finish
                with trio.move_on_after(5):
                    await four_refused.wait()
                profiles.gate.set()
        assert sorted(results) == ["ok"] * 2 + ["refused 503"] * 4
        # and the server is fine afterwards
        async with connect(server.sync_url, server.token(user="later")) as client:
            assert (await client.sync("r-later"))["type"] == "sync-resp"


async def test_shutdown_closes_websockets_with_going_away(server_factory: Any) -> None:
    async with server_factory() as server, connect(server.sync_url, server.token()) as client:
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

    from verdant_trio.engine.core import VerdantCore
    from verdant_trio.engine.settings import CoreSettings, LibrarySettings

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
