"""The on-disk schema: exactly the Node server's `sqlShard` migrations v1 and v2.

Same tables, columns, primary keys and `_Migrations` rows, so a `verdant-dbs/` directory written
by the Node server opens unchanged and one written by us opens in the Node server. The only
additions are indexes (invisible to the Node server), created idempotently outside the migration
versions, because acknowledgements look operations up by timestamp and sync reads by server order.
"""

from __future__ import annotations

import time
from typing import Final

import apsw

MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            """CREATE TABLE IF NOT EXISTS "_Migrations" (
                "id" INTEGER PRIMARY KEY,
                "appliedAt" TEXT NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS "DocumentBaseline" (
                "oid" TEXT PRIMARY KEY,
                "snapshot" TEXT,
                "timestamp" TEXT NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS "OperationHistory" (
                "oid" TEXT NOT NULL,
                "timestamp" TEXT NOT NULL,
                "data" TEXT NOT NULL,
                "serverOrder" INTEGER NOT NULL DEFAULT 0,
                "replicaId" TEXT NOT NULL,
                PRIMARY KEY ("replicaId", "oid", "timestamp")
            )""",
            """CREATE TABLE IF NOT EXISTS "ReplicaInfo" (
                "id" TEXT PRIMARY KEY,
                "clientId" TEXT NOT NULL,
                "lastSeenWallClockTime" INTEGER,
                "ackedLogicalTime" TEXT,
                "type" INTEGER NOT NULL DEFAULT 0,
                "ackedServerOrder" INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE IF NOT EXISTS "FileMetadata" (
                "fileId" TEXT PRIMARY KEY,
                "name" TEXT NOT NULL,
                "type" TEXT NOT NULL,
                "pendingDeleteAt" INTEGER
            )""",
        ),
    ),
    (
        2,
        (
            'ALTER TABLE "OperationHistory" ADD COLUMN "authz" TEXT DEFAULT NULL',
            'ALTER TABLE "DocumentBaseline" ADD COLUMN "authz" TEXT DEFAULT NULL',
        ),
    ),
)
LATEST_VERSION: Final = MIGRATIONS[-1][0]

INDEXES: Final = (
    'CREATE INDEX IF NOT EXISTS "vt_OperationHistory_serverOrder" '
    'ON "OperationHistory" ("serverOrder")',
    'CREATE INDEX IF NOT EXISTS "vt_OperationHistory_oid_timestamp" '
    'ON "OperationHistory" ("oid", "timestamp")',
    'CREATE INDEX IF NOT EXISTS "vt_OperationHistory_timestamp" '
    'ON "OperationHistory" ("timestamp")',
)


class SchemaError(RuntimeError):
    """The database was written by a newer server than this one understands."""


def current_version(conn: apsw.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_Migrations'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute('SELECT id FROM "_Migrations" ORDER BY id DESC LIMIT 1').fetchone()
    return int(row[0]) if row else 0


def migrate(conn: apsw.Connection) -> int:
    """Bring a shard to the latest version in one transaction; returns the version found.

    Like the reference, one row with the latest version is recorded after the pending steps
    (its `appliedAt` is milliseconds since the epoch, as text).
    """
    with conn:
        found = current_version(conn)
        if found > LATEST_VERSION:
            raise SchemaError(
                f"database schema version {found} is newer than this server's {LATEST_VERSION}"
            )
        if found < LATEST_VERSION:
            for _version, steps in MIGRATIONS[found:]:
                for step in steps:
                    conn.execute(step)
            conn.execute(
                'INSERT INTO "_Migrations" (id, appliedAt) VALUES (?, ?)',
                (LATEST_VERSION, str(int(time.time() * 1000))),
            )
        for statement in INDEXES:
            conn.execute(statement)
    return found
