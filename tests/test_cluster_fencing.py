"""Fencing in the engine: a library this server does not own is never opened, and `release`
stops serving one (sockets closed with 1012, batch finished, shard checkpointed and closed).

The engine only gets `owns(library_id)`; these tests give it a set. What a cluster node wires
to it (the placement table, SIGHUP) is tested in test_cluster_node.py.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio
import trio.testing

from verdant_trio.engine.core import VerdantCore, open_core
from verdant_trio.engine.observe import NullObserver
from verdant_trio.engine.registry import Libraries, NotServedHere
from verdant_trio.engine.settings import CoreSettings, LibrarySettings
from verdant_trio.storage.files import LocalFileStorage
from verdant_trio.storage.names import encode_id
from verdant_trio.sync.codes import CloseCode
from verdant_trio.sync.errors import ErrorCode, VerdantError
from verdant_trio.sync.protocol import ReplicaType, validate_client_message
from verdant_trio.sync.tokens import TokenInfo

from .fakes import RecordingPeer

SECRET = "fencing-secret-0123456789abcdef0123"


def op_message(replica: str, n: int) -> Any:
    ts = f"0001{1700000000000 + n:013d}-000000"
    return validate_client_message({
        "type": "op", "replicaId": replica, "timestamp": ts,
        "operations": [{"oid": "items/a", "timestamp": ts,
                        "data": {"op": "initialize", "value": {"n": n}}}],
    })


def sync_message(replica: str) -> Any:
    return validate_client_message({
        "type": "sync", "replicaId": replica, "timestamp": "0001",
        "operations": [], "baselines": [], "since": None,
    })


@contextlib.asynccontextmanager
async def registry(tmp_path: Path, owned: set[str]) -> AsyncIterator[Libraries]:
    async with trio.open_nursery() as nursery:
        libraries = Libraries(
            LibrarySettings(databases_dir=tmp_path), nursery, owns=owned.__contains__
        )
        yield libraries
        libraries.stop_all()


async def test_a_library_not_owned_is_refused_before_any_shard_exists(tmp_path: Path) -> None:
    settings = LibrarySettings(databases_dir=tmp_path)
    with trio.fail_after(10):
        async with registry(tmp_path, {"ours"}) as libraries:
            with pytest.raises(NotServedHere) as refused:
                async with libraries.use("theirs"):
                    raise AssertionError("a host was handed out for a library not owned")
            assert refused.value.http_status == 503
            assert refused.value.code == ErrorCode.UNAVAILABLE
            assert refused.value.retry_after_s == 1
            async with libraries.use("ours"):
                pass
    assert settings.shard_path("ours").exists()
    assert not settings.shard_path("theirs").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "theirs" in p.name) == []


async def test_release_closes_sockets_with_1012_and_closes_the_shard_whole(tmp_path: Path) -> None:
    owned = {"lib", "other"}
    settings = LibrarySettings(databases_dir=tmp_path)
    with trio.fail_after(10):
        async with registry(tmp_path, owned) as libraries:
            peer = RecordingPeer(key=1, user_id="alice", replica_id="r1")
            bystander = RecordingPeer(key=2, user_id="bob", replica_id="r2")
            async with libraries.use("lib") as host, libraries.use("other") as other:
                await host.attach(peer)
                await other.attach(bystander)
                await host.submit(peer, [op_message("r1", 1)], wait=True)
                assert "server-ack" in peer.kinds()  # acknowledged before the release
                with pytest.raises(ValueError, match="fence first"):
                    await libraries.release(lambda lib: lib == "lib")
                owned.discard("lib")  # the fence
                released = await libraries.release(lambda lib: lib == "lib")
                assert released == ["lib"]
                assert peer.closed_with is not None
                assert peer.closed_with[0] == CloseCode.SERVICE_RESTART == 1012
                assert host.closed.is_set() and host.core is not None and host.core.shard.closed
                assert bystander.closed_with is None and not other.closed.is_set()
                with pytest.raises(NotServedHere):
                    async with libraries.use("lib"):
                        pass
                assert await libraries.release(lambda lib: lib == "lib") == []  # nothing left
    # checkpointed: the database file alone holds the acknowledged operation
    wal = Path(f"{settings.shard_path('lib')}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    connection = apsw.Connection(str(settings.shard_path("lib")), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = list(connection.execute("SELECT count(*) FROM OperationHistory"))
    finally:
        connection.close()
    assert rows == [(1,)]


class CountingObserver(NullObserver):
    def __init__(self) -> None:
        self.refusals: list[str] = []

    def refused(self, transport: str) -> None:
        self.refusals.append(transport)


@contextlib.asynccontextmanager
async def core_owning(
    tmp_path: Path, owned: set[str], observer: NullObserver | None = None, **core: Any
) -> AsyncIterator[VerdantCore]:
    settings = CoreSettings(LibrarySettings(databases_dir=tmp_path / "dbs"), **core)
    storage = LocalFileStorage(tmp_path / "files")
    async with open_core(
        settings, token_secret=SECRET, owns=owned.__contains__, file_storage=storage,
        observer=observer or NullObserver(),
    ) as running:
        yield running


def info(library: str, type: ReplicaType = ReplicaType.REALTIME) -> TokenInfo:
    return TokenInfo(
        user_id="alice", library_id=library, sync_endpoint=None, role=None, type=type, token="t"
    )


async def test_a_websocket_for_another_nodes_library_is_held_under_the_handshake_limiter(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Three upgrades for a library not owned, two handshakes at a time: each is held for the
    refusal delay before its 503, and the third waits for a slot, so refusals cannot spin."""
    observer = CountingObserver()
    accepted: list[str] = []
    refused_at: list[float] = []

    async def accept() -> None:
        accepted.append("accepted")

    async with core_owning(
        tmp_path, {"ours"}, observer, refusal_delay_s=1.0, max_concurrent_handshakes=2
    ) as core:
        started = trio.current_time()

        async def upgrade() -> None:
            with pytest.raises(NotServedHere):
                await core.serve_websocket(info("theirs"), accept, transport=None)  # type: ignore[arg-type]
            refused_at.append(trio.current_time() - started)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(upgrade)
            await trio.testing.wait_all_tasks_blocked()
            assert core.handshake_limiter.borrowed_tokens == 2  # held while refused
    assert accepted == []
    assert sorted(round(t, 3) for t in refused_at) == [1.0, 1.0, 2.0]
    assert observer.refusals == ["websocket"] * 3
    assert not (tmp_path / "dbs" / "theirs.sqlite").exists()


async def test_a_held_refusal_ends_when_what_the_server_owns_changes(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A client held while its library moves retries as soon as the library may have a home,
    not after the whole hold; the refusal still happens (the retry is held again if needed)."""
    refused_after: list[float] = []

    async def accept() -> None:
        raise AssertionError("not owned: never accepted")

    async with core_owning(tmp_path, {"ours"}, CountingObserver(), refusal_delay_s=30.0) as core:
        started = trio.current_time()

        async def upgrade() -> None:
            with pytest.raises(NotServedHere):
                await core.serve_websocket(info("theirs"), accept, transport=None)  # type: ignore[arg-type]
            refused_after.append(trio.current_time() - started)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upgrade)
            await trio.sleep(2.0)
            assert refused_after == []  # held
            core.ownership_changed()
        async with trio.open_nursery() as nursery:  # a hold that starts now lasts again
            started = trio.current_time()
            nursery.start_soon(upgrade)
    assert [round(t, 3) for t in refused_after] == [2.0, 30.0]


class Chunks:
    name = "photo.png"
    type = "image/png"

    def __init__(self) -> None:
        self.read = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        self.read += 1
        yield b"png bytes"


async def test_http_sync_uploads_and_admin_refuse_another_nodes_library_with_503(
    tmp_path: Path,
) -> None:
    with trio.fail_after(10):
        async with core_owning(tmp_path, {"ours"}) as core:
            heartbeat = validate_client_message({"type": "heartbeat", "replicaId": "r1"})
            for request in (
                lambda: core.http_sync(info("theirs"), [sync_message("r1")]),
                lambda: core.http_sync(info("theirs"), [heartbeat]),  # the owner's to answer
                lambda: core.admin.info("theirs"),  # 503, not 404: it exists, elsewhere
                lambda: core.admin.file_info("theirs", "f1"),
                lambda: core.files.served_type("theirs", "f1"),
            ):
                with pytest.raises(NotServedHere):
                    await request()
            upload = Chunks()
            with pytest.raises(NotServedHere):
                await core.files.upload(info("theirs"), "f1", upload)
            assert upload.read == 0  # refused before a byte was stored
            stored = await core.files.upload(info("ours"), "f1", Chunks())
            assert stored.size == len(b"png bytes")
    assert sorted(p.name for p in (tmp_path / "dbs").iterdir()) == ["ours.sqlite"]
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["ours"]


async def test_a_request_caught_by_a_stopping_library_is_a_503_not_a_500(tmp_path: Path) -> None:
    """An HTTP sync queued behind a batch when the library stops (a release, an eviction) is
    told to retry: `LibraryGone` becomes 503 on the HTTP paths."""
    with trio.fail_after(10):
        async with core_owning(tmp_path, {"lib"}) as core:
            in_batch, let_go = threading.Event(), threading.Event()
            outcome: list[BaseException] = []

            def block(_: Any) -> None:
                in_batch.set()
                let_go.wait(5)

            async def queued_request() -> None:
                try:
                    await core.http_sync(info("lib"), [sync_message("r1")])
                except VerdantError as exc:
                    outcome.append(exc)

            async with core.libraries.use("lib") as host, trio.open_nursery() as nursery:
                nursery.start_soon(host.call, block)
                await trio.to_thread.run_sync(in_batch.wait)  # the library is busy in a thread
                nursery.start_soon(queued_request)
                await trio.testing.wait_all_tasks_blocked()  # queued behind the busy batch
                host.stop()
                let_go.set()
            await host.closed.wait()
    assert len(outcome) == 1
    assert isinstance(outcome[0], VerdantError) and not isinstance(outcome[0], NotServedHere)
    assert (outcome[0].http_status, outcome[0].retry_after_s) == (503, 1)


def test_file_urls_carry_the_slot_in_cluster_mode(tmp_path: Path) -> None:
    slot_of: Callable[[str], int] = lambda library: 1234 if library == "a lib" else 0  # noqa: E731
    cluster = LocalFileStorage(tmp_path, "https://front.example", slot_of=slot_of)
    single = LocalFileStorage(tmp_path, "https://sync.example")
    names = f"{encode_id('a lib')}/{encode_id('f 1')}/photo.png"
    assert names.startswith("~")  # encoded: no space, nothing to escape
    assert cluster.url("a lib", "f 1", "photo.png", None) == (
        f"https://front.example/files/1234/{names}"
    )
    assert single.url("a lib", "f 1", "photo.png", None) == f"https://sync.example/files/{names}"
