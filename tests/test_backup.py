"""Online backups: consistent copies with everything acknowledged before they began."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import apsw
import trio

from verdant_trio.client import connect, timestamp
from verdant_trio.service.backup import ProgressBar, backup_all
from verdant_trio.storage.shard import Shard

from .conftest import SECRET, RunningServer


def initialize(oid: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"oid": oid, "timestamp": timestamp(), "data": {"op": "initialize", "value": value}}


def stored_oids(path: Path) -> set[str]:
    """Objects with data in the shard (operations, or baselines once compaction folded them)."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {
            row[0]
            for row in conn.execute(
                'SELECT oid FROM "OperationHistory" UNION SELECT oid FROM "DocumentBaseline"'
            )
        }
    finally:
        conn.close()


async def test_backup_during_writes_holds_everything_acknowledged_before(
    server: RunningServer, tmp_path: Path
) -> None:
    acked: dict[str, set[str]] = {}
    with trio.fail_after(30):
        for n in range(4):
            library = f"lib-{n}"
            async with connect(server.sync_url, server.token(library=library)) as client:
                await client.sync("r")
                oids = [f"items/{n}-{i}" for i in range(25)]
                await client.op("r", [initialize(oid, {"i": i, "pad": "x" * 200}) for i, oid in enumerate(oids)])
                await client.wait_for("server-ack")
                acked[library] = set(oids)

        config = tmp_path / "verdant-trio.toml"
        config.write_text(
            f'[auth]\ntoken_secret = "{SECRET}"\n'
            f'[storage]\ndatabases_dir = "{server.settings.core.libraries.databases_dir}"\n'
        )
        out = tmp_path / "backup"
        written_during: list[str] = []

        async def keep_writing(stop: trio.Event) -> None:
            async with connect(server.sync_url, server.token(library="lib-0")) as writer:
                await writer.sync("w")
                while not stop.is_set():
                    oid = f"items/during-{len(written_during)}"
                    await writer.op("w", [initialize(oid, {})])
                    await writer.wait_for("server-ack")
                    written_during.append(oid)

        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing, stop)
            result = await trio.run_process(
                [sys.executable, "-m", "verdant_trio.service.cli", "backup", "--config", str(config),
                 "--out", str(out), "--progress"],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            stop.set()
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "4/4 libraries" in stderr
    assert "backed up 4 of 4 libraries" in result.stdout.decode()
    assert written_during, "the server kept acknowledging writes while the backup ran"
    for library, oids in acked.items():
        copy = out / f"{library}.sqlite"
        assert oids <= stored_oids(copy)
        assert not copy.with_name(copy.name + "-wal").exists()  # one self-contained file
    extra = stored_oids(out / "lib-0.sqlite") - acked["lib-0"]
    assert extra <= set(written_during)  # whatever else it holds was really written


def test_backup_reads_commits_still_in_the_wal_and_closed_shards(tmp_path: Path) -> None:
    dbs = tmp_path / "dbs"
    closed = Shard.open(dbs / "closed.sqlite")
    with closed.transaction():
        closed.insert_operations("r", [initialize("items/closed", {})])
    closed.close()
    live = Shard.open(dbs / "live.sqlite")
    live.conn.execute("PRAGMA wal_autocheckpoint=0")  # committed pages stay in the WAL
    try:
        with live.transaction():
            live.insert_operations("r", [initialize("items/live", {})])
        assert (dbs / "live.sqlite-wal").stat().st_size > 0
        (dbs / "broken.sqlite").write_bytes(b"this is not a database" * 100)
        progress = io.StringIO()
        bar = ProgressBar(3, progress, enabled=True)
        done, failed = backup_all(dbs, tmp_path / "out", progress=bar.advance)
        # a write after the copy began is not in it
        with live.transaction():
            live.insert_operations("r", [initialize("items/later", {})])
    finally:
        live.close()
    assert [d.destination.name for d in done] == ["closed.sqlite", "live.sqlite"]
    assert [f.source.name for f in failed] == ["broken.sqlite"]
    assert stored_oids(tmp_path / "out" / "live.sqlite") == {"items/live"}
    assert stored_oids(tmp_path / "out" / "closed.sqlite") == {"items/closed"}
    assert not (tmp_path / "out" / "broken.sqlite").exists()
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".partial")]
    assert "3/3 libraries" in progress.getvalue()


def test_backup_refuses_to_write_into_the_databases(tmp_path: Path) -> None:
    (tmp_path / "dbs").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "verdant_trio.service.cli", "backup", "--databases-dir", str(tmp_path / "dbs"),
         "--out", str(tmp_path / "dbs")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "--out must not be the databases directory" in result.stderr
