"""Shards: the Node server's `sqlShard` schema, opened both ways, and safe file names."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import orjson
import pytest

from verdant_trio.client import connect
from verdant_trio.storage.names import decode_name, encode_id, safe_file_name
from verdant_trio.storage.schema import LATEST_VERSION, migrate
from verdant_trio.storage.shard import Shard

from .conftest import RunningServer

# The reference's migrations v1 and v2 as its `migrateToLatest` runs them (better-sqlite3), kept
# here verbatim as test data: a database "written by the Node server" for the compatibility test.
NODE_V1 = [
    'CREATE TABLE IF NOT EXISTS "_Migrations" ("id" INTEGER PRIMARY KEY, "appliedAt" TEXT NOT NULL);',
    'CREATE TABLE IF NOT EXISTS "DocumentBaseline" ("oid" TEXT PRIMARY KEY, "snapshot" TEXT, "timestamp" TEXT NOT NULL);',
    'CREATE TABLE IF NOT EXISTS "OperationHistory" ("oid" TEXT NOT NULL, "timestamp" TEXT NOT NULL, "data" TEXT NOT NULL, "serverOrder" INTEGER NOT NULL DEFAULT 0, "replicaId" TEXT NOT NULL, PRIMARY KEY ("replicaId", "oid", "timestamp"));',
    'CREATE TABLE IF NOT EXISTS "ReplicaInfo" ("id" TEXT PRIMARY KEY, "clientId" TEXT NOT NULL, "lastSeenWallClockTime" INTEGER, "ackedLogicalTime" TEXT, "type" INTEGER NOT NULL DEFAULT 0, "ackedServerOrder" INTEGER NOT NULL DEFAULT 0);',
    'CREATE TABLE IF NOT EXISTS "FileMetadata" ("fileId" TEXT PRIMARY KEY, "name" TEXT NOT NULL, "type" TEXT NOT NULL, "pendingDeleteAt" INTEGER);',
]
NODE_V2 = [
    'ALTER TABLE "OperationHistory" ADD COLUMN "authz" TEXT DEFAULT NULL;',
    'ALTER TABLE "DocumentBaseline" ADD COLUMN "authz" TEXT DEFAULT NULL;',
]


def node_database(path: Path, *, versions: int = 2) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    for step in NODE_V1 + (NODE_V2 if versions >= 2 else []):
        db.execute(step)
    db.execute('INSERT INTO "_Migrations" (id, appliedAt) VALUES (?, ?)', (versions, 1732000000000))
    now_ms = 1_800_000_000_000
    db.execute(
        'INSERT INTO "DocumentBaseline" (oid, snapshot, timestamp) VALUES (?, ?, ?)',
        ("items/1", orjson.dumps({"content": "from node", "tags": ["a"]}).decode(), "0001-old-1"),
    )
    db.execute(
        'INSERT INTO "OperationHistory" (oid, timestamp, data, serverOrder, replicaId) VALUES (?, ?, ?, ?, ?)',
        ("items/1", "0001-old-2", orjson.dumps({"op": "set", "name": "content", "value": "edited in node"}).decode(), 7, "node-replica"),
    )
    db.execute(
        'INSERT INTO "ReplicaInfo" (id, clientId, lastSeenWallClockTime, ackedLogicalTime, type, ackedServerOrder) VALUES (?, ?, ?, ?, ?, ?)',
        ("node-replica", "alice", now_ms, "0001-old-2", 0, 7),
    )
    db.execute(
        'INSERT INTO "FileMetadata" (fileId, name, type, pendingDeleteAt) VALUES (?, ?, ?, ?)',
        ("file-1", "photo.png", "image/png", None),
    )
    db.commit()
    db.close()


def table_columns(path: Path) -> dict[str, list[tuple[str, str, int, object, int]]]:
    db = sqlite3.connect(path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    result = {
        t: [(r[1], r[2], r[3], r[4], r[5]) for r in db.execute(f'PRAGMA table_info("{t}")')]
        for t in tables
    }
    db.close()
    return result


def test_fresh_shard_has_exactly_the_reference_schema(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.sqlite", tmp_path / "theirs.sqlite"
    Shard.open(ours).close()
    node_database(theirs)
    assert table_columns(ours) == table_columns(theirs)
    db = sqlite3.connect(ours)
    assert [r[0] for r in db.execute('SELECT id FROM "_Migrations"')] == [LATEST_VERSION]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_node_database_opens_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "lib.sqlite"
    node_database(path)
    before = table_columns(path)
    shard = Shard.open(path)
    try:
        assert shard.latest_server_order() == 7
        baseline = shard.baseline("items/1")
        assert baseline is not None and baseline.snapshot() == {"content": "from node", "tags": ["a"]}
        assert shard.replica("node-replica").user_id == "alice"  # type: ignore[union-attr]
        assert shard.file("file-1").name == "photo.png"  # type: ignore[union-attr]
        order, inserted = shard.insert_operations("r2", [{"oid": "items/2", "timestamp": "0001-new", "data": {"op": "initialize", "value": {}}}])
        assert (order, inserted) == (8, 1)
    finally:
        shard.close()
    assert table_columns(path) == before
    db = sqlite3.connect(path)
    assert [r[0] for r in db.execute('SELECT id FROM "_Migrations"')] == [2]


def test_version_1_database_is_migrated_like_the_reference(tmp_path: Path) -> None:
    path = tmp_path / "v1.sqlite"
    node_database(path, versions=1)
    Shard.open(path).close()
    db = sqlite3.connect(path)
    assert [r[0] for r in db.execute('SELECT id FROM "_Migrations" ORDER BY id')] == [1, 2]
    columns = [r[1] for r in db.execute('PRAGMA table_info("OperationHistory")')]
    assert columns[-1] == "authz"


def test_migration_is_idempotent(tmp_path: Path) -> None:
    import apsw

    conn = apsw.Connection(str(tmp_path / "x.sqlite"))
    assert migrate(conn) == 0
    assert migrate(conn) == LATEST_VERSION
    conn.close()


@pytest.mark.trio
async def test_server_syncs_a_node_written_directory(server: RunningServer) -> None:
    node_database(server.data_dir / "dbs" / "lib.sqlite")
    async with connect(server.sync_url, server.token(user="bob")) as client:
        response = await client.sync("rb", resync_all=True)
    assert response["overwriteLocalData"] is True
    assert response["baselines"][0]["snapshot"] == {"content": "from node", "tags": ["a"]}
    assert response["operations"][0]["data"]["value"] == "edited in node"
    async with server.http() as http:
        doc = (await http.get("/admin/libraries/lib/documents/items/1", headers=server.admin_headers())).json()
    assert doc == {"content": "edited in node", "tags": ["a"]}


@pytest.mark.parametrize("library", ["simple", "a-b_c.d", "../x", "a/b", "..", ".hidden", "sp ace", "ünï", "~tilde"])
def test_library_ids_encode_reversibly_and_safely(library: str) -> None:
    name = encode_id(library)
    assert "/" not in name and "\\" not in name and name not in (".", "..")
    assert not name.startswith(".")
    assert decode_name(name) == library
    if library in ("simple", "a-b_c.d"):
        assert name == library  # the Node server's file name, kept


def test_safe_and_encoded_names_never_collide() -> None:
    assert encode_id("~abc") != "~abc"
    assert encode_id("~abc").startswith("~")


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd", "_.._etc_passwd"),
    ("a/b", "a_b"),
    ("nul\x00byte.txt", "nul_byte.txt"),
    ("..", "file"),
    (".bashrc", "bashrc"),
    ("photo.png", "photo.png"),
])
def test_file_names_are_made_safe(name: str, expected: str) -> None:
    assert safe_file_name(name) == expected


def test_long_file_names_keep_their_extension() -> None:
    name = safe_file_name("x" * 500 + ".jpeg")
    assert name.endswith(".jpeg") and len(name.encode()) <= 240


def test_the_per_replica_caches_are_bounded(tmp_path: Path) -> None:
    """Replica ids that never depart through a websocket (HTTP replicas) still cannot grow the
    caches without bound: past the bound the oldest goes, and is read again when it speaks."""
    from verdant_trio.storage.shard import REPLICA_CACHE_ENTRIES, Shard
    from verdant_trio.sync.protocol import ReplicaType

    shard = Shard.open(tmp_path / "lib.sqlite")
    ids = [f"r{i}" for i in range(REPLICA_CACHE_ENTRIES + 10)]
    with shard.transaction():
        for replica_id in ids:
            shard.create_replica(replica_id, "alice", ReplicaType.PUSH)
            assert shard.replica_owner(replica_id) == "alice"
            shard.touch_replica(replica_id)
    reads: list[str] = []
    shard.conn.exec_trace = lambda cursor, sql, bindings: reads.append(sql) or True
    assert shard.replica_owner(ids[-1]) == "alice"  # the newest: still cached
    assert reads == []
    assert shard.replica_owner(ids[0]) == "alice"  # the oldest: dropped, read again
    assert len(reads) == 1
    shard.conn.exec_trace = None
    assert len(shard._owners) <= REPLICA_CACHE_ENTRIES
    assert len(shard._touched_ms) <= REPLICA_CACHE_ENTRIES
    shard.close()
