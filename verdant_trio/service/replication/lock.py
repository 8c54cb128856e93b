"""Who is using a databases directory: the daemon's lock, and SQLite's own lock on each shard.

A restore replaces shard files, so it must never run beside a process that has them open or may
open them. Two checks, because each covers what the other cannot:

- `DirectoryLock`: an exclusive `flock` on `<databases_dir>/.verdant-trio.lock`, held by the
  daemon for as long as it serves that directory and by a restore for as long as it writes
  there. It covers shards the daemon has not opened yet (an idle library closes its shard, and
  opens it again on the next connection: a restore racing that open would put a new database
  file next to the old one's WAL). The kernel releases it when its process dies, SIGKILL
  included, so a crashed daemon never leaves a stale lock behind; the pid written in the file
  is only for the error message.
- `shard_open_by`: whether any other process has a shard open right now. Every SQLite
  connection to a WAL database keeps a shared POSIX lock on the "DMS" byte of its `-shm` file
  for as long as it is open (that is how SQLite knows who is last). `F_GETLK` asks the kernel
  whether someone holds it without taking anything. It covers what the directory lock cannot
  see: Litestream replicating the shard, the Node server, an app embedding the core, a
  `sqlite3` shell.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from types import TracebackType
from typing import Final, Self

LOCK_NAME: Final = ".verdant-trio.lock"
SHM_DMS_OFFSET: Final = 128
"""SQLite's unix VFS: the dead-man-switch byte of the `-shm` file, `(22 + 8) * 4 + 8`."""
_FLOCK: Final = "hhqqi4x"
"""Linux `struct flock` (l_type, l_whence, l_start, l_len, l_pid, padding to 32 bytes)."""


class DirectoryBusy(OSError):
    """The databases directory is in use (the message says by whom)."""


class DirectoryLock:
    """An exclusive, non-blocking lock on a databases directory; use as a context manager."""

    def __init__(self, databases_dir: Path, holder: str) -> None:
        self.path = databases_dir / LOCK_NAME
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> Self:
        """Take the lock or raise `DirectoryBusy` naming the holder; never waits."""
        writable = True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except PermissionError:
            writable = False
            # Someone else's file (root made it): flock needs no write access, only the pid
            # note is lost.
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.geteuid() == 0:
                # A restore run as root must not leave a lock file the daemon's user cannot
                # open for writing.
                st = self.path.parent.stat()
                os.fchown(fd, st.st_uid, st.st_gid)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _read_holder(fd)
            os.close(fd)
            raise DirectoryBusy(
                f"{self.path.parent} is in use by {who or 'another process'}; stop it first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.holder} pid={os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def shard_open_by(shard: Path) -> int | None:
    """The pid of a process that has `shard` open (None: nobody, or it is not a WAL database).

    Only other processes are seen (the kernel never reports a process's own POSIX locks back to
    it), which is what a restore needs: it opens nothing before asking.
    """
    shm = shard.with_name(shard.name + "-shm")
    try:
        fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, SHM_DMS_OFFSET, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    finally:
        os.close(fd)
    l_type, _whence, _start, _len, pid = struct.unpack(_FLOCK, answer)
    return None if l_type == fcntl.F_UNLCK else int(pid)
