"""The restored mark: a shard that came back from a replica says so, inside itself.

A restore from an asynchronous replica (Litestream) can end a little before what the server had
acknowledged. A library holding this mark must not trust its history to be complete: each
replica that syncs is first asked for its full history (the recovery, `sync.recovery`), and
the replicas that did so are recorded here.

Why inside the shard, in tables of our own: the mark travels with the data through every copy
(`verdant-trio backup`, Litestream, a `cp` of a stopped server, a cluster node taking over a
slot), so a copy of a shard that was still recovering is still recovering, and clearing the
mark is replicated like any other write. A sidecar file would be lost by each of those. The
tables carry our `vt_` prefix and are created outside the `_Migrations` versions, like our
indexes: the Node server's schema checks look only at `_Migrations`, so it opens such a shard
unchanged (and ignores the mark).

Plain functions over an `apsw.Connection`; the caller owns the transaction. Written by
`verdant-trio restore` (`service.replication.restore`), read and updated by the library that
opens the shard (through `Shard`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Final

import apsw

from ..sync.store import RestoreMark, ResyncedRow

MARK_TABLE: Final = "vt_Restored"
RESYNCED_TABLE: Final = "vt_RestoredResynced"

_SCHEMA: Final = (
    # At most one row: the latest restore. Restoring a shard again replaces it.
    f"""CREATE TABLE IF NOT EXISTS "{MARK_TABLE}" (
        "id" INTEGER PRIMARY KEY CHECK ("id" = 1),
        "restoredAtMs" INTEGER NOT NULL,
        "source" TEXT NOT NULL,
        "latestServerOrder" INTEGER NOT NULL,
        "newestTimestamp" TEXT,
        "replicaCount" INTEGER NOT NULL,
        "tool" TEXT NOT NULL
    )""",
    # The replicas that re-sent their history since the restore (filled by the recovery).
    f"""CREATE TABLE IF NOT EXISTS "{RESYNCED_TABLE}" (
        "replicaId" TEXT PRIMARY KEY,
        "resyncedAtMs" INTEGER NOT NULL,
        "recoveredOperations" INTEGER NOT NULL DEFAULT 0
    )""",
)


def _scalar(conn: apsw.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    assert row is not None, "an aggregate query returns a row"
    return row[0]


def _has_table(conn: apsw.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


def mark_restored(
    conn: apsw.Connection, *, source: str, restored_at_ms: int, tool: str
) -> RestoreMark:
    """Mark the shard as restored now; forgets replicas that resynced after an earlier restore
    (this restore may have lost what they sent). Returns the mark written."""
    for statement in _SCHEMA:
        conn.execute(statement)
    latest_server_order = int(_scalar(
        conn, 'SELECT COALESCE(MAX(serverOrder), 0) FROM "OperationHistory"'
    ))
    newest = _scalar(
        conn,
        'SELECT MAX(t) FROM (SELECT MAX(timestamp) AS t FROM "OperationHistory" '
        'UNION ALL SELECT MAX(timestamp) FROM "DocumentBaseline")',
    )
    replicas = int(_scalar(conn, 'SELECT COUNT(*) FROM "ReplicaInfo"'))
    mark = RestoreMark(
        restored_at_ms=restored_at_ms,
        source=source,
        latest_server_order=latest_server_order,
        newest_timestamp=None if newest is None else str(newest),
        replica_count=replicas,
        tool=tool,
    )
    conn.execute(f'DELETE FROM "{RESYNCED_TABLE}"')
    conn.execute(
        f'INSERT OR REPLACE INTO "{MARK_TABLE}" (id, restoredAtMs, source, latestServerOrder, '
        "newestTimestamp, replicaCount, tool) VALUES (1, ?, ?, ?, ?, ?, ?)",
        (
            mark.restored_at_ms, mark.source, mark.latest_server_order, mark.newest_timestamp,
            mark.replica_count, mark.tool,
        ),
    )
    return mark


def read_restore_mark(conn: apsw.Connection) -> RestoreMark | None:
    """The mark, or None for a shard never restored (or whose recovery is over)."""
    if not _has_table(conn, MARK_TABLE):
        return None
    row = conn.execute(
        "SELECT restoredAtMs, source, latestServerOrder, newestTimestamp, replicaCount, tool "
        f'FROM "{MARK_TABLE}" WHERE id = 1'
    ).fetchone()
    if row is None:
        return None
    return RestoreMark(int(row[0]), str(row[1]), int(row[2]), row[3], int(row[4]), str(row[5]))


def resynced_replicas(conn: apsw.Connection) -> set[str]:
    return {row.replica_id for row in resynced_rows(conn)}


def resynced_rows(conn: apsw.Connection) -> list[ResyncedRow]:
    """The replicas that re-sent their history since the restore, oldest first."""
    if not _has_table(conn, RESYNCED_TABLE):
        return []
    return [
        ResyncedRow(str(r[0]), int(r[1]), int(r[2]))
        for r in conn.execute(
            "SELECT replicaId, resyncedAtMs, recoveredOperations "
            f'FROM "{RESYNCED_TABLE}" ORDER BY resyncedAtMs, replicaId'
        )
    ]


def is_resynced(conn: apsw.Connection, replica_id: str) -> bool:
    """Whether the replica re-sent its history since the restore (one primary-key lookup; the
    caller asks only while the shard is marked)."""
    if not _has_table(conn, RESYNCED_TABLE):
        return False
    row = conn.execute(
        f'SELECT 1 FROM "{RESYNCED_TABLE}" WHERE replicaId = ?', (replica_id,)
    ).fetchone()
    return row is not None


def record_resynced(
    conn: apsw.Connection, replica_id: str, *, now_ms: int, recovered_operations: int
) -> None:
    """A replica re-sent its history after the restore (a no-op on an unmarked shard)."""
    if not _has_table(conn, RESYNCED_TABLE):
        return
    conn.execute(
        f'INSERT INTO "{RESYNCED_TABLE}" (replicaId, resyncedAtMs, recoveredOperations) '
        "VALUES (?, ?, ?) ON CONFLICT (replicaId) DO UPDATE SET "
        "resyncedAtMs = excluded.resyncedAtMs, "
        "recoveredOperations = recoveredOperations + excluded.recoveredOperations",
        (replica_id, now_ms, recovered_operations),
    )


def forget_resynced(conn: apsw.Connection, keep: Iterable[str]) -> None:
    """Every replica that resynced, except those in `keep`, must resync again."""
    if _has_table(conn, RESYNCED_TABLE):
        conn.execute(
            f'DELETE FROM "{RESYNCED_TABLE}" WHERE replicaId NOT IN (SELECT value FROM json_each(?))',
            (json.dumps(sorted(set(keep))),),
        )


def clear_restore_mark(conn: apsw.Connection) -> None:
    """The recovery is over: the shard is like one never restored (the tables stay, empty)."""
    if _has_table(conn, MARK_TABLE):
        conn.execute(f'DELETE FROM "{MARK_TABLE}"')
    if _has_table(conn, RESYNCED_TABLE):
        conn.execute(f'DELETE FROM "{RESYNCED_TABLE}"')
