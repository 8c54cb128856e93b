"""Online backups: a consistent copy of every library shard while the daemon keeps serving.

Each shard is copied with SQLite's backup API in a single step, that is inside one read
transaction: in WAL mode that sees exactly the commits made before it began (so everything the
server had acknowledged when the copy of that shard started), never blocks the daemon's writer,
and is never restarted by it. The source is opened read-only; the copy is written next to its
destination, switched to a self-contained rollback journal, optionally checked, fsynced and only
then renamed into place, so a backup directory never holds a half-written shard.

Restore: stop the daemon, copy the files into `[storage] databases_dir`, start it.

Run it as the daemon's user, or as root: SQLite gives the `-wal`/`-shm` files it may create the
database owner's uid when run as root, so the daemon can still open its shards afterwards.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import apsw

SHARD_SUFFIX = ".sqlite"


@dataclass(frozen=True, slots=True)
class ShardBackup:
    source: Path
    destination: Path
    size_bytes: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class BackupFailure:
    source: Path
    error: str


def list_shards(databases_dir: Path) -> list[Path]:
    found = databases_dir.glob(f"*{SHARD_SUFFIX}")
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup_shard(source: Path, destination: Path, *, verify: bool = True) -> ShardBackup:
    """Copy one shard consistently; raises `apsw.Error`/`OSError` (nothing left behind)."""
    started = time.monotonic()
    partial = destination.with_name(f".{destination.name}.partial")
    partial.unlink(missing_ok=True)
    src = apsw.Connection(str(source), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        src.setbusytimeout(10_000)
        dst = apsw.Connection(str(partial))
        try:
            with dst.backup("main", src, "main") as copy:
                copy.step(-1)  # all pages in one read transaction: a consistent snapshot
            dst.execute("PRAGMA journal_mode=DELETE").fetchall()  # one self-contained file
            if verify:
                result = dst.execute("PRAGMA quick_check").fetchall()
                if result != [("ok",)]:
                    raise apsw.CorruptError(f"the copy failed quick_check: {result[:3]}")
        finally:
            dst.close()
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, destination)
        _fsync_directory(destination.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        src.close()
    return ShardBackup(source, destination, destination.stat().st_size, time.monotonic() - started)


class ProgressBar:
    """`[######......] 12/40 libraries, 3.1 MB` on a terminal; silent otherwise."""

    def __init__(
        self, total: int, stream: TextIO | None = None, *, enabled: bool | None = None
    ) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self.bytes = 0

    def advance(self, size_bytes: int) -> None:
        self.done += 1
        self.bytes += size_bytes
        if self.enabled:
            width = 30
            filled = int(width * self.done / self.total) if self.total else width
            self.stream.write(
                f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} libraries, "
                f"{_megabytes(self.bytes)}"
            )
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def backup_all(
    databases_dir: Path,
    out_dir: Path,
    *,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
    shards: Sequence[Path] | None = None,
) -> tuple[list[ShardBackup], list[BackupFailure]]:
    """Back up every shard in `databases_dir` into `out_dir`; one failure does not stop the rest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[ShardBackup] = []
    failed: list[BackupFailure] = []
    for source in shards if shards is not None else list_shards(databases_dir):
        try:
            result = backup_shard(source, out_dir / source.name, verify=verify)
        except (apsw.Error, OSError) as exc:
            failed.append(BackupFailure(source, f"{type(exc).__name__}: {exc}"))
            if progress is not None:
                progress(0)
            continue
        done.append(result)
        if progress is not None:
            progress(result.size_bytes)
    return done, failed
