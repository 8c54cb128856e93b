"""`verdant-trio restore`: libraries back from a Litestream replica into a databases directory.

For each shard: `litestream restore` writes it under a name Litestream's `*.sqlite` pattern does
not match; `PRAGMA integrity_check` must say "ok" and the file must be one of our shards (a
`_Migrations` version this server knows); the restored mark is written into it
(`storage.restored`); it is fsynced and renamed into place, so the databases directory never
holds a shard that is partial, unchecked or unmarked. A shard it replaces (`--force`) is moved
aside with its WAL, never deleted. Litestream's local tracking state for the shard is removed,
as Litestream asks for a database that is replaced under it: the next `litestream replicate`
sees the shard behind the replica and continues the same replica from it.

Refused, before anything changes: while the directory lock is held (the daemon serves the
directory) or a shard to replace is open in any process (Litestream, the Node server, ...), and
when a shard exists and `force` is not given. See `lock` for why both checks.

Synchronous: an operator's tool, run while the daemon is stopped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import apsw

from ...storage.names import decode_name, encode_id
from ...storage.restored import mark_restored
from ...storage.schema import LATEST_VERSION, current_version
from ...sync.store import RestoreMark
from .litestream import Replica, ReplicaError, metadata_dir, shard_names_in_file_replica
from .lock import DirectoryLock, shard_open_by

SUFFIX: Final = ".sqlite"
RESTORE_TIMEOUT_S: Final = 30 * 60.0
"""One shard's `litestream restore` (downloads, replays LTX files); a hung one is killed."""


class RestoreRefused(Exception):
    """Nothing was restored and nothing changed; the text says why."""


@dataclass(frozen=True, slots=True)
class RestoredShard:
    library_id: str
    path: Path
    operations: int
    baselines: int
    replicas: int
    mark: RestoreMark
    replaced: Path | None
    """Where the shard this one replaced was moved (with `force`)."""


@dataclass(frozen=True, slots=True)
class RestoreFailure:
    library_id: str
    error: str


def shard_file_name(library_id: str) -> str:
    return encode_id(library_id, "library id") + SUFFIX


def library_of(file_name: str) -> str:
    return decode_name(file_name[: -len(SUFFIX)])


def plan(
    databases_dir: Path,
    replica: Replica,
    library_ids: Sequence[str] | None,
    *,
    force: bool,
) -> list[str]:
    """The shard file names to restore; raises `RestoreRefused` if any of them may not be."""
    if library_ids:
        names = sorted({shard_file_name(library) for library in library_ids})
    elif replica.kind == "file":
        try:
            names = shard_names_in_file_replica(replica)
        except ReplicaError as exc:
            raise RestoreRefused(str(exc)) from None
        if not names:
            raise RestoreRefused(f"the replica {replica.display} holds no shards")
    else:
        raise RestoreRefused(
            "an S3 replica cannot be listed by this tool: name the libraries with --library "
            "(repeatable); each is at <replica>/<library id>.sqlite/"
        )
    problems: list[str] = []
    for name in names:
        destination = databases_dir / name
        pid = shard_open_by(destination)
        if pid is not None:
            problems.append(f"{destination} is open in process {pid} (Litestream? stop it first)")
        elif destination.exists() and not force:
            problems.append(f"{destination} exists (pass --force to replace it; it is kept aside)")
    if problems:
        raise RestoreRefused("; ".join(problems))
    return names


def _remove_leftovers(path: Path) -> None:
    for leftover in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", ".tmp"))):
        leftover.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _adopt(path: Path, directory: Path) -> None:
    """Run as root, give the file the directory owner's ids, so the daemon can write it."""
    if os.geteuid() == 0:
        st = directory.stat()
        os.chown(path, st.st_uid, st.st_gid)


def _litestream_restore(
    binary: Path, source: str, output: Path, timestamp: str | None
) -> None:
    command = [str(binary), "restore", "-o", str(output)]
    if timestamp is not None:
        command += ["-timestamp", timestamp]
    command.append(source)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=RESTORE_TIMEOUT_S,
            stdin=subprocess.DEVNULL, check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"litestream restore took longer than {RESTORE_TIMEOUT_S:.0f} s") from None
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise RuntimeError(f"litestream restore failed (exit {result.returncode}): {detail}")
    if not output.is_file():
        raise RuntimeError("litestream restore wrote no database")


def _count(conn: apsw.Connection, table: str) -> int:
    row = conn.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()
    assert row is not None, "an aggregate query returns a row"
    return int(row[0])


def _check_and_mark(path: Path, *, source: str, now_ms: int, tool: str) -> tuple[RestoreMark, int, int]:
    conn = apsw.Connection(str(path))
    try:
        conn.setbusytimeout(5000)
        result = conn.execute("PRAGMA integrity_check").fetchall()
        if result != [("ok",)]:
            raise apsw.CorruptError(f"integrity_check: {[r[0] for r in result[:5]]}")
        version = current_version(conn)
        if not 1 <= version <= LATEST_VERSION:
            raise RuntimeError(
                f"not a verdant shard this server can open (_Migrations version {version})"
            )
        with conn:
            mark = mark_restored(conn, source=source, restored_at_ms=now_ms, tool=tool)
        operations = _count(conn, "OperationHistory")
        baselines = _count(conn, "DocumentBaseline")
    finally:
        conn.close()  # the last connection: checkpoints and removes the WAL it made
    return mark, operations, baselines


def _aside(destination: Path) -> Path:
    """A free name for a replaced shard; Litestream's `*.sqlite` pattern does not match it."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    candidate = destination.with_name(f"{destination.name}.replaced-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = destination.with_name(f"{destination.name}.replaced-{stamp}-{n}")
    return candidate


def restore_shard(
    binary: Path,
    replica: Replica,
    name: str,
    databases_dir: Path,
    *,
    timestamp: str | None = None,
    meta_dir: Path | None = None,
    tool: str = "verdant-trio",
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> RestoredShard:
    """Restore one shard into `databases_dir` (see the module docstring for the steps)."""
    destination = databases_dir / name
    staging = databases_dir / f".{name}.restoring"
    _remove_leftovers(staging)
    try:
        _litestream_restore(binary, replica.for_shard(name), staging, timestamp)
        mark, operations, baselines = _check_and_mark(
            staging, source=replica.shard_display(name), now_ms=now_ms(), tool=tool
        )
        for sidecar in ("-wal", "-shm"):
            staging.with_name(staging.name + sidecar).unlink(missing_ok=True)
        _adopt(staging, databases_dir)
        _fsync(staging)
        replaced = None
        if destination.exists():
            replaced = _aside(destination)
            os.replace(destination, replaced)
            wal = destination.with_name(name + "-wal")
            if wal.exists():  # the WAL belongs with its database, or the aside copy is not whole
                os.replace(wal, replaced.with_name(replaced.name + "-wal"))
            destination.with_name(name + "-shm").unlink(missing_ok=True)
        # Litestream's state for the old database would not match the new one (its guidance
        # for a replaced database: reset it). Gone before the shard appears, so a Litestream
        # watching the directory starts from the replica, not from stale state.
        meta = metadata_dir(destination, meta_dir)
        if meta.is_dir():
            shutil.rmtree(meta)
        os.replace(staging, destination)
        _fsync(databases_dir)
    except BaseException:
        _remove_leftovers(staging)
        raise
    return RestoredShard(
        library_of(name), destination, operations, baselines, mark.replica_count, mark, replaced
    )


def restore_all(
    binary: Path,
    replica: Replica,
    databases_dir: Path,
    library_ids: Sequence[str] | None = None,
    *,
    force: bool = False,
    timestamp: str | None = None,
    meta_dir: Path | None = None,
    tool: str = "verdant-trio",
) -> tuple[list[RestoredShard], list[RestoreFailure]]:
    """Restore the named libraries (default: every shard of a file replica).

    Holds the directory lock throughout, so the daemon cannot start on the directory meanwhile.
    One shard's failure does not stop the others; it leaves nothing behind.
    """
    if not databases_dir.is_dir():
        databases_dir.mkdir(parents=True)
        _adopt(databases_dir, databases_dir.parent)  # a fresh disk: the daemon must own it
    done: list[RestoredShard] = []
    failed: list[RestoreFailure] = []
    with DirectoryLock(databases_dir, "verdant-trio restore"):
        names = plan(databases_dir, replica, library_ids, force=force)
        for name in names:
            try:
                shard = restore_shard(
                    binary, replica, name, databases_dir,
                    timestamp=timestamp, meta_dir=meta_dir, tool=tool,
                )
            except (apsw.Error, OSError, RuntimeError) as exc:
                failed.append(RestoreFailure(library_of(name), f"{type(exc).__name__}: {exc}"))
                continue
            done.append(shard)
    return done, failed
