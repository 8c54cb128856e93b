"""Library tasks: commit before anyone hears, batching, idle close, presence leases."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from verdant_trio.engine.registry import Libraries
from verdant_trio.engine.settings import LibrarySettings
from verdant_trio.sync.protocol import ReplicaType, validate_client_message

from .fakes import RecordingPeer

pytestmark = pytest.mark.trio


Peer = RecordingPeer


@contextlib.asynccontextmanager
async def libraries(tmp_path: Path, **settings: Any) -> AsyncIterator[Libraries]:
    async with trio.open_nursery() as nursery:
        registry = Libraries(LibrarySettings(databases_dir=tmp_path, **settings), nursery)
        yield registry
        registry.stop_all()


def message(kind: str, **fields: Any) -> Any:
    return validate_client_message({"type": kind, **fields})


def stamp(n: int) -> str:
    return f"0001{1700000000000 + n:013d}-000000"


def op_message(replica: str, oid: str, n: int) -> Any:
    ts = stamp(n)
    return message("op", replicaId=replica, timestamp=ts, operations=[
        {"oid": oid, "timestamp": ts, "data": {"op": "initialize", "value": {"n": n}}}
    ])


async def settle(
    peer: Peer, kind: str, timeout_s: float = 5.0, step_s: float = 0.01
) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        while True:
            for m in peer.inbox:
                if m["type"] == kind:
                    return m
            await trio.sleep(step_s)


async def test_nobody_hears_of_an_operation_whose_commit_failed(tmp_path: Path) -> None:
    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        writer, listener = Peer(1, "alice"), Peer(2, "bob")
        await host.attach(writer)
        await host.attach(listener)
        assert host.core is not None
        conn = host.core.shard.conn
        conn.set_commit_hook(lambda: True)  # every COMMIT turns into a ROLLBACK
        await host.submit(writer, [op_message("ra", "items/1", 1)], wait=True)
        assert "server-ack" not in writer.kinds()
        assert "op-re" not in listener.kinds()
        assert writer.closed_with is not None and writer.closed_with[0] == 1011
        conn.set_commit_hook(None)
        assert await host.call(lambda core: core.shard.operation_count()) == 0
        # the client reconnects and sends it again: now it is stored, acked and rebroadcast
        await host.submit(writer, [op_message("ra", "items/1", 1)], wait=True)
        assert "server-ack" in writer.kinds()
        assert (await settle(listener, "op-re"))["operations"][0]["oid"] == "items/1"
        assert await host.call(lambda core: core.shard.operation_count()) == 1


async def test_acks_are_sent_only_after_the_commit(tmp_path: Path) -> None:
    """The peer's deliver runs after the batch's transaction: the op is readable from a second
    connection at the moment the server-ack is delivered."""
    import apsw

    seen: list[int] = []

    @dataclass(eq=False)
    class Checking(Peer):
        def deliver(self, *payloads: bytes) -> None:
            if any(b'"server-ack"' in payload for payload in payloads):
                other = apsw.Connection(str(tmp_path / "lib.sqlite"))
                seen.append(other.execute('SELECT COUNT(*) FROM "OperationHistory"').fetchone()[0])
                other.close()
            super().deliver(*payloads)

    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        writer = Checking(1, "alice")
        await host.attach(writer)
        for n in range(5):
            await host.submit(writer, [op_message("ra", f"items/{n}", n)], wait=True)
    assert seen == [1, 2, 3, 4, 5]


async def test_a_batch_reaches_each_peer_in_one_delivery(tmp_path: Path) -> None:
    """Two writers' operations in one batch: each writer's `server-ack` and the `op-re` of the
    other's operation reach it in one `deliver`, which its socket writes at once."""
    deliveries: dict[str, list[list[str]]] = {}

    @dataclass(eq=False)
    class Counting(Peer):
        def deliver(self, *payloads: bytes) -> None:
            kinds = [orjson.loads(payload)["type"] for payload in payloads]
            deliveries.setdefault(self.user_id, []).append(kinds)
            super().deliver(*payloads)

    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        alice, bob = Counting(1, "alice"), Counting(2, "bob")
        await host.attach(alice)
        await host.attach(bob)
        started, gate = threading.Event(), threading.Event()

        def hold(core: Any) -> None:  # the library's turn: both operations queue behind it
            started.set()
            gate.wait(10)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(host.call, hold)
            await trio.to_thread.run_sync(started.wait, 10)
            deliveries.clear()
            await host.submit(alice, [op_message("ra", "items/a", 1)])
            await host.submit(bob, [op_message("rb", "items/b", 2)])
            gate.set()
        await settle(alice, "op-re")
        await settle(bob, "op-re")
    for user in ("alice", "bob"):
        first = deliveries[user][0]
        assert "server-ack" in first and "op-re" in first, deliveries


async def test_a_peer_that_raises_on_delivery_ends_its_library_and_hangs_no_one(
    tmp_path: Path,
) -> None:
    """A bug in a peer's `deliver` (after the commit) ends the library task, not the server:
    the waiting sender returns, its other peers are closed so they reconnect, the shard keeps
    what was committed, the library reopens."""

    @dataclass(eq=False)
    class Broken(Peer):
        def deliver(self, *payloads: bytes) -> None:
            raise RuntimeError("a bug in a peer")

    async with libraries(tmp_path) as registry:
        async with registry.use("lib") as host:
            writer, idle = Broken(1, "alice"), Peer(2, "bob")
            await host.attach(writer)
            await host.attach(idle)
            with trio.fail_after(10):
                await host.submit(writer, [op_message("ra", "items/1", 1)], wait=True)
                await host.closed.wait()
            assert idle.closed_with is not None and idle.closed_with[0] == 1013
        async with registry.use("lib") as again:
            assert again is not host
            assert await again.call(lambda core: core.shard.operation_count()) == 1


@dataclass(eq=False)
class Clocked(Peer):
    """Notes when each global-ack is handed to it, on the clock the library's timers use."""

    global_acks_at: list[float] = field(default_factory=list)

    def deliver(self, *payloads: bytes) -> None:
        before = len(self.inbox)
        super().deliver(*payloads)
        if any(m["type"] == "global-ack" for m in self.inbox[before:]):
            self.global_acks_at.append(time.monotonic())

    def delivered_oids(self) -> list[str]:
        return [op["oid"] for m in self.inbox if m["type"] == "op-re" for op in m["operations"]]


async def test_global_ack_broadcasts_are_coalesced(tmp_path: Path) -> None:
    interval_s = 0.3
    async with libraries(
        tmp_path, global_ack_interval_s=interval_s, batch_min_peers=1, batch_window_s=0.02
    ) as registry, registry.use("lib") as host:
        peers = [Clocked(i, f"user{i}") for i in range(1, 4)]
        for p in peers:
            await host.attach(p)
            await host.submit(p, [message("sync", replicaId=f"r{p.key}", timestamp="0001", operations=[], baselines=[], since=None)], wait=True)

        def ack(p: Clocked, n: int) -> Any:
            return message("ack", replicaId=f"r{p.key}", timestamp=stamp(n))

        # a burst: operations queued together travel together
        for n in range(50):
            await host.submit(peers[0], [op_message("r1", f"items/{n}", n + 10)])
            for p in peers[1:]:
                await host.submit(p, [ack(p, n + 10)])
        with trio.fail_after(10):
            while len(peers[1].delivered_oids()) < 50:
                await trio.sleep(0.01)
        assert peers[1].delivered_oids() == [f"items/{n}" for n in range(50)]
        assert len([m for m in peers[1].inbox if m["type"] == "op-re"]) < 50
        # then one operation at a time, each acknowledged by everyone before the next: every
        # batch moves the global ack, and the broadcasts of it stay an interval apart
        for n in range(50, 70):
            await host.submit(peers[0], [op_message("r1", f"items/{n}", n + 10)], wait=True)
            for p in peers[1:]:
                await host.submit(p, [ack(p, n + 10)], wait=True)
        last = stamp(69 + 10)
        with trio.fail_after(10):  # the last move is not dropped, only held back
            while not [m for m in peers[1].inbox if m == {"type": "global-ack", "timestamp": last}]:
                await trio.sleep(0.01)
        times = peers[1].global_acks_at
        assert len(times) >= 2
        # (a little slack: the time is noted just after the library stamps its broadcast)
        assert min(b - a for a, b in itertools.pairwise(times)) >= 0.8 * interval_s, times


async def test_a_senders_operations_in_one_batch_share_one_rebroadcast(tmp_path: Path) -> None:
    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        writer, listener, other = Peer(1, "alice"), Peer(2, "bob"), Peer(3, "carol")
        for p in (writer, listener, other):
            await host.attach(p)
        batch = [op_message("ra", f"items/{n}", n) for n in range(5)]
        await host.request(writer, batch)  # one envelope: certainly one batch
        await settle(listener, "op-re")
        (rebroadcast,) = [m for m in listener.inbox if m["type"] == "op-re"]
        assert [op["oid"] for op in rebroadcast["operations"]] == [f"items/{n}" for n in range(5)]
        assert [m for m in other.inbox if m["type"] == "op-re"] == [rebroadcast]
        # one server-ack, with the newest timestamp, acknowledges the sender's whole batch
        (ack,) = [m for m in writer.inbox if m["type"] == "server-ack"]
        assert ack["timestamp"] == batch[-1].timestamp
        assert "op-re" not in writer.kinds()


async def test_idle_library_closes_and_reopens(tmp_path: Path, autojump_clock: Any) -> None:
    """On trio's autojump clock, with the default hour: the library closes an hour after its
    last user left, not before (the decision reads trio's clock, so a jump while a worker thread
    opens the shard can only make the hour pass sooner in real time, never shorter)."""
    async with libraries(tmp_path) as registry:
        async with registry.use("lib") as host:
            first = host
        left = trio.current_time()
        await first.closed.wait()
        assert trio.current_time() - left >= LibrarySettings(tmp_path).idle_close_s == 3600
        assert "lib" not in registry.active
        async with registry.use("lib") as host:
            assert host is not first
            assert await host.call(lambda core: core.shard.operation_count()) == 0


async def test_http_presence_expires_into_presence_offline(tmp_path: Path, autojump_clock: Any) -> None:
    """On trio's autojump clock, with the default minute of presence after an HTTP request."""
    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        watcher = Peer(1, "alice")
        await host.attach(watcher)
        puller = Peer(2, "bob", type=ReplicaType.PUSH, realtime=False)
        await host.request(puller, [message("presence-update", replicaId="rb", presence={"p": 1})])
        assert puller.kinds() == ["presence-changed"]
        assert (await settle(watcher, "presence-changed"))["userInfo"]["id"] == "bob"
        asked = trio.current_time()
        offline = await settle(watcher, "presence-offline", timeout_s=3600, step_s=1.0)
        assert offline == {"type": "presence-offline", "userId": "bob", "replicaId": "rb"}
        assert trio.current_time() - asked >= 0.9 * LibrarySettings(tmp_path).http_presence_ttl_s


async def test_a_failing_message_keeps_what_came_before_and_nothing_after_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client reads a `server-ack` as "everything I sent before it is synced": acknowledging
    a message after a rolled-back one would make it drop that one for good."""
    from verdant_trio.sync import decisions as library

    original = library.LibraryCore._handle_presence

    def boom(self: Any, peer: Any, msg: Any, out: Any) -> None:
        if msg.presence == "boom":
            raise RuntimeError("bug")
        original(self, peer, msg, out)

    monkeypatch.setattr(library.LibraryCore, "_handle_presence", boom)
    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        peer, other = Peer(1, "alice", realtime=False), Peer(2, "bob", realtime=False)
        await host.request(peer, [
            op_message("ra", "items/1", 1),
            message("presence-update", replicaId="ra", presence="boom"),
            op_message("ra", "items/2", 2),
        ])
        assert peer.kinds() == ["server-ack", "error"]
        assert peer.inbox[0]["timestamp"] == op_message("ra", "items/1", 1).timestamp
        await host.request(other, [op_message("rb", "items/3", 3)])  # others are served
        assert other.kinds() == ["server-ack"]
        # (compaction may already have folded items/1 into a baseline: read the documents)
        snapshots = await host.call(
            lambda core: [core.object_snapshot(f"items/{n}") for n in (1, 2, 3)]
        )
        assert snapshots == [{"n": 1}, None, {"n": 3}]


async def test_a_rolled_back_message_leaves_nothing_in_joined_replies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from verdant_trio.storage.shard import Shard

    original = Shard.insert_operations
    calls = {"n": 0}

    def failing_second_insert(self: Shard, *args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # message 2 fails after message 1 joined the op-re and the ack
            raise RuntimeError("bug")
        return original(self, *args)

    monkeypatch.setattr(Shard, "insert_operations", failing_second_insert)
    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        writer, listener = Peer(1, "alice"), Peer(2, "bob")
        await host.attach(writer)
        await host.attach(listener)
        batch = [op_message("ra", f"items/{n}", n) for n in (1, 2, 3)]
        await host.request(writer, batch)
        await settle(listener, "op-re")
        (rebroadcast,) = [m for m in listener.inbox if m["type"] == "op-re"]
        assert [op["oid"] for op in rebroadcast["operations"]] == ["items/1"]
        (ack,) = [m for m in writer.inbox if m["type"] == "server-ack"]
        assert ack["timestamp"] == batch[0].timestamp  # not past the lost message
        assert writer.closed_with is not None and writer.closed_with[0] == 1011  # it resyncs
        # until it has gone, nothing more of the writer's is taken (or acknowledged)
        await host.submit(writer, [op_message("ra", "items/4", 4)], wait=True)
        assert [m for m in writer.inbox if m["type"] == "server-ack"] == [ack]
        snapshots = await host.call(
            lambda core: [core.object_snapshot(f"items/{n}") for n in (1, 2, 3, 4)]
        )
        assert snapshots == [{"n": 1}, None, None, None]
        host.detach(writer)  # it reconnects (a new connection) and sends what was not acked
        again = Peer(3, "alice")
        await host.attach(again)
        await host.submit(again, [op_message("ra", "items/2", 2)], wait=True)
        assert [m["type"] for m in again.inbox] == ["server-ack"]
        assert await host.call(lambda core: core.object_snapshot("items/2")) == {"n": 2}


@contextlib.asynccontextmanager
async def busy(host: Any) -> AsyncIterator[None]:
    """Hold the library inside a batch (a call blocked in its worker thread) for the block:
    what connections do meanwhile waits in the inbox, as when a big sync is being handled."""
    import threading

    entered, release = trio.Event(), threading.Event()

    def block(core: Any) -> None:
        trio.from_thread.run_sync(entered.set)
        release.wait(10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(host.call, block)
        with trio.fail_after(5):
            await entered.wait()
        try:
            yield
        finally:
            release.set()


async def test_a_peer_gone_before_its_attach_was_applied_is_never_attached(tmp_path: Path) -> None:
    """A socket dropped right after the upgrade: its attach is still in the inbox when its
    departure is handled. Applied afterwards, it would stay attached (and its user present) for
    as long as the library runs: memory, a target in every broadcast, a ghost in presence."""
    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        watcher, dropped = Peer(1, "alice"), Peer(2, "bob")
        await host.attach(watcher)
        async with busy(host):
            await host.attach(dropped)
            await host.submit(dropped, [message("presence-update", replicaId="rb", presence={})])
            host.detach(dropped)
        with trio.fail_after(5):
            peers, presence = await host.call(lambda core: (set(core.peers), core.presence.all()))
        assert peers == {watcher.key}
        assert presence == {}
        assert "presence-changed" not in watcher.kinds()


async def test_presence_sent_just_before_a_close_does_not_outlive_the_connection(tmp_path: Path) -> None:
    """The last messages of a connection reach the library after its departure was handled:
    the operation is stored and rebroadcast, the presence update is not applied (the user has
    already been reported offline)."""
    async with libraries(tmp_path) as registry, registry.use("lib") as host:
        watcher, leaving = Peer(1, "alice"), Peer(2, "bob")
        for peer, replica in ((watcher, "ra"), (leaving, "rb")):
            await host.attach(peer)
            await host.submit(peer, [message("sync", replicaId=replica, timestamp="0001",
                                             operations=[], baselines=[], since=None)], wait=True)
        async with busy(host):
            await host.submit(leaving, [
                op_message("rb", "items/1", 1),
                message("presence-update", replicaId="rb", presence={"here": True}),
            ])
            host.detach(leaving)
        with trio.fail_after(5):
            count, presence = await host.call(
                lambda core: (core.shard.operation_count(), core.presence.all())
            )
        assert count == 1
        assert presence == {}
        assert (await settle(watcher, "op-re"))["operations"][0]["oid"] == "items/1"
        assert "presence-changed" not in watcher.kinds()
