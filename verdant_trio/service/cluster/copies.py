"""A slot's data on disk, for a move: described (a manifest), checked when it arrives,
installed, and removed from a node that no longer owns it.

Blocking code (SQLite, hashing, renames, fsync): `transfer` runs every function here in a worker
thread. The layout is the node's own: shards `<databases_dir>/<encoded id>.sqlite`, files
`<files_root>/<encoded library>/<encoded file id>/<name>` (`storage.names`, `storage.files`).

What makes a copy safe to take: the source has fenced the slots and released their libraries
(every shard closed after a checkpoint), so nothing writes to these files while they are read;
a WAL a crash left behind is folded in first (`describe`), or the move fails. What makes a copy
safe to serve: the target checks the bytes (size, sha256), `PRAGMA integrity_check` and the
counts of operations, baselines and replicas against the source's manifest before anything is
renamed into place, and a library the source does not have leaves no shard or files behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import apsw

from ...storage.files import UPLOAD_PREFIX
from ...storage.names import decode_name, encode_id, safe_file_name
from ...sync.errors import VerdantError
from .placement import SLOT_COUNT, slot_of

SHARD_SUFFIX: Final = ".sqlite"
SIDE_SUFFIXES: Final = ("-wal", "-shm", "-journal")
"""SQLite's files beside a shard: stale ones must never meet a copied shard."""
CHUNK_BYTES: Final = 256 * 1024
INCOMING_PREFIX: Final = ".incoming-"
"""Staging directories of a receive, inside the databases and files directories: a name no
shard or library directory can have (`storage.names` never starts one with a dot)."""
_SHA256: Final = re.compile(r"[0-9a-f]{64}")


class CopyError(Exception):
    """A copy that cannot be taken, or that does not match its manifest; nothing installed."""


@dataclass(frozen=True, slots=True)
class Counts:
    operations: int
    baselines: int
    replicas: int


@dataclass(frozen=True, slots=True)
class ShardCopy:
    name: str
    """The file name, `<encoded library id>.sqlite`."""
    size_bytes: int
    sha256: str
    counts: Counts


@dataclass(frozen=True, slots=True)
class FileCopy:
    path: str
    """`<encoded file id>/<name>`, relative to the library's files directory."""
    size_bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class LibraryCopy:
    library_id: str
    shard: ShardCopy | None
    """None: the library has files on the source but no database."""
    files: tuple[FileCopy, ...]

    @property
    def directory(self) -> str:
        """The library's directory name under the files root."""
        return encode_id(self.library_id, "library id")


@dataclass(frozen=True, slots=True)
class Totals:
    """What a manifest (or a verified receive) adds up to: the orchestrator compares both."""

    libraries: int = 0
    shards: int = 0
    files: int = 0
    size_bytes: int = 0
    operations: int = 0
    baselines: int = 0
    replicas: int = 0

    def to_json(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_json(cls, data: Any) -> Totals:
        if not isinstance(data, Mapping):
            raise ValueError("totals must be an object")
        return cls(**{name: _count(data.get(name), name) for name in cls.__slots__})


@dataclass(frozen=True, slots=True)
class Manifest:
    """Every library of the moved slots on the source: its shard and its files."""

    slots: frozenset[int]
    libraries: tuple[LibraryCopy, ...]

    @property
    def totals(self) -> Totals:
        shards = [lib.shard for lib in self.libraries if lib.shard is not None]
        files = [f for lib in self.libraries for f in lib.files]
        return Totals(
            libraries=len(self.libraries),
            shards=len(shards),
            files=len(files),
            size_bytes=sum(s.size_bytes for s in shards) + sum(f.size_bytes for f in files),
            operations=sum(s.counts.operations for s in shards),
            baselines=sum(s.counts.baselines for s in shards),
            replicas=sum(s.counts.replicas for s in shards),
        )

    def shard(self, name: str) -> ShardCopy | None:
        return next(
            (lib.shard for lib in self.libraries if lib.shard and lib.shard.name == name), None
        )

    def file(self, directory: str, path: str) -> FileCopy | None:
        for lib in self.libraries:
            if lib.directory == directory:
                return next((f for f in lib.files if f.path == path), None)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "slots": sorted(self.slots),
            "libraries": [
                {
                    "library": lib.library_id,
                    "shard": None if lib.shard is None else {
                        "name": lib.shard.name, "bytes": lib.shard.size_bytes,
                        "sha256": lib.shard.sha256,
                        "operations": lib.shard.counts.operations,
                        "baselines": lib.shard.counts.baselines,
                        "replicas": lib.shard.counts.replicas,
                    },
                    "files": [
                        {"path": f.path, "bytes": f.size_bytes, "sha256": f.sha256}
                        for f in lib.files
                    ],
                }
                for lib in self.libraries
            ],
        }

    @classmethod
    def from_json(cls, data: Any, slots: frozenset[int]) -> Manifest:
        """A manifest from a peer, checked: every name is one this node would have made itself
        for a library of `slots`, so nothing in it can point outside the staging directories."""
        if not isinstance(data, Mapping) or not isinstance(data.get("libraries"), list):
            raise ValueError("a manifest is an object with a list of libraries")
        if data.get("slots") != sorted(slots):
            raise ValueError("the manifest is for other slots than this move's")
        libraries: list[LibraryCopy] = []
        seen: set[str] = set()
        for item in data["libraries"]:
            if not isinstance(item, Mapping):
                raise ValueError("a manifest entry must be an object")
            library_id = item.get("library")
            if not isinstance(library_id, str):
                raise ValueError("a manifest entry needs its library id")
            try:
                directory = encode_id(library_id, "library id")
            except VerdantError as exc:
                raise ValueError(f"library {library_id!r}: {exc}") from None
            if slot_of(library_id) not in slots:
                raise ValueError(f"library {library_id!r} is not in the moved slots")
            if library_id in seen:
                raise ValueError(f"library {library_id!r} appears twice")
            seen.add(library_id)
            shard = None
            if item.get("shard") is not None:
                raw = item["shard"]
                if not isinstance(raw, Mapping) or raw.get("name") != directory + SHARD_SUFFIX:
                    raise ValueError(f"library {library_id!r}: its shard has another name")
                shard = ShardCopy(
                    raw["name"], _count(raw.get("bytes"), "bytes"), _sha256(raw.get("sha256")),
                    Counts(
                        _count(raw.get("operations"), "operations"),
                        _count(raw.get("baselines"), "baselines"),
                        _count(raw.get("replicas"), "replicas"),
                    ),
                )
            raw_files = item.get("files")
            if not isinstance(raw_files, list):
                raise ValueError(f"library {library_id!r}: files must be a list")
            files: list[FileCopy] = []
            for f in raw_files:
                if not isinstance(f, Mapping):
                    raise ValueError(f"library {library_id!r}: a file entry must be an object")
                files.append(FileCopy(
                    _file_path(f), _count(f.get("bytes"), "bytes"), _sha256(f.get("sha256"))
                ))
            if len({f.path for f in files}) != len(files):
                raise ValueError(f"library {library_id!r}: a file appears twice")
            libraries.append(LibraryCopy(library_id, shard, tuple(files)))
        return cls(slots, tuple(libraries))


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


def _file_path(entry: Mapping[str, Any]) -> str:
    """`<encoded file id>/<name>` as `storage.files` writes it, or `ValueError`."""
    path = entry.get("path")
    parts = path.split("/") if isinstance(path, str) else []
    if len(parts) != 2:
        raise ValueError(f"a file path is <file id>/<name>, got {path!r}")
    file_dir, name = parts
    try:
        well_formed = bool(file_dir) and encode_id(decode_name(file_dir)) == file_dir
    except (ValueError, UnicodeDecodeError, VerdantError):
        well_formed = False
    if not well_formed:
        raise ValueError(f"{path!r}: not an encoded file id")
    if not name or name != safe_file_name(name) or name.startswith(UPLOAD_PREFIX):
        raise ValueError(f"{path!r}: not a stored file name")
    return str(path)


# -- what a node holds --------------------------------------------------------------------------


def library_of(entry_name: str) -> str | None:
    """The library a shard file or files directory belongs to (None: not one of ours)."""
    name = entry_name.removesuffix(SHARD_SUFFIX)
    if not name or name.startswith("."):
        return None
    try:
        library_id = decode_name(name)
    except (ValueError, UnicodeDecodeError):
        return None
    try:
        return library_id if encode_id(library_id) == name else None
    except VerdantError:
        return None


def shards_in(databases_dir: Path, picks: Callable[[int], bool]) -> dict[str, Path]:
    """Library id -> shard path, for the shards whose slot `picks` chooses."""
    found: dict[str, Path] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(databases_dir):
            if entry.name.endswith(SHARD_SUFFIX) and entry.is_file():
                library_id = library_of(entry.name)
                if library_id is not None and picks(slot_of(library_id)):
                    found[library_id] = Path(entry.path)
    return found


def file_dirs_in(files_root: Path | None, picks: Callable[[int], bool]) -> dict[str, Path]:
    """Library id -> files directory, for the libraries whose slot `picks` chooses."""
    found: dict[str, Path] = {}
    if files_root is None:
        return found
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(files_root):
            if entry.is_dir(follow_symlinks=False):
                library_id = library_of(entry.name)
                if library_id is not None and picks(slot_of(library_id)):
                    found[library_id] = Path(entry.path)
    return found


def shards_per_slot(databases_dir: Path) -> list[int]:
    """How many shards each slot has on this node (for `cluster status`)."""
    counts = [0] * SLOT_COUNT
    for library_id in shards_in(databases_dir, lambda slot: True):
        counts[slot_of(library_id)] += 1
    return counts


# -- the source ---------------------------------------------------------------------------------


def settle_and_count(path: Path) -> Counts:
    """Fold any WAL into the shard, count what it holds, close it; the file is then whole.

    The library is released (closed after a checkpoint), so usually there is no WAL; one left by
    a crash holds acknowledged commits, and a copy of the main file alone would lose them. The
    checkpoint is TRUNCATE: if anything else holds the database open (a `verdant-trio backup`
    reading it), it fails and so does the move, rather than copying an incomplete file.
    """
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
        try:
            conn.setbusytimeout(2000)
            conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
            counts = _counts(conn)
        finally:
            conn.close()
    except apsw.Error as exc:
        raise CopyError(f"{path.name}: cannot settle the shard: {exc}") from None
    wal = Path(f"{path}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise CopyError(f"{path.name}: its WAL could not be checkpointed (is a backup running?)")
    return counts


def _counts(conn: apsw.Connection) -> Counts:
    def count(table: str) -> int:
        row = conn.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()
        return int(row[0]) if row else 0

    return Counts(count("OperationHistory"), count("DocumentBaseline"), count("ReplicaInfo"))


def hash_file(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _library_files(directory: Path) -> Iterator[tuple[str, Path]]:
    for file_dir in sorted(directory.iterdir()):
        if not file_dir.is_dir() or file_dir.name.startswith("."):
            continue
        for item in sorted(file_dir.iterdir()):
            if item.is_file() and not item.name.startswith("."):
                yield f"{file_dir.name}/{item.name}", item


def describe(databases_dir: Path, files_root: Path | None, slots: frozenset[int]) -> Manifest:
    """The manifest of the released slots' libraries (their shards settled first)."""
    shards = shards_in(databases_dir, slots.__contains__)
    file_dirs = file_dirs_in(files_root, slots.__contains__)
    libraries = []
    for library_id in sorted(set(shards) | set(file_dirs)):
        shard = None
        if library_id in shards:
            path = shards[library_id]
            counts = settle_and_count(path)
            size, digest = hash_file(path)
            shard = ShardCopy(path.name, size, digest, counts)
        files = []
        if library_id in file_dirs:
            for relative, item in _library_files(file_dirs[library_id]):
                size, digest = hash_file(item)
                files.append(FileCopy(relative, size, digest))
        libraries.append(LibraryCopy(library_id, shard, tuple(files)))
    return Manifest(slots, tuple(libraries))


def source_path(
    databases_dir: Path, files_root: Path | None, manifest: Manifest, kind: str, name: str
) -> tuple[Path, int] | None:
    """The file a peer may download, if the manifest lists it: (path, size)."""
    if kind == "shard":
        shard = manifest.shard(name)
        return None if shard is None else (databases_dir / shard.name, shard.size_bytes)
    directory, _, path = name.partition("/")
    found = manifest.file(directory, path)
    if found is None or files_root is None:
        return None
    return files_root / directory / found.path, found.size_bytes


# -- the target ---------------------------------------------------------------------------------


class Sink:
    """A file being received: written, hashed and counted chunk by chunk, fsynced at the end."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by finish/abort
        self._digest = hashlib.sha256()
        self.size_bytes = 0

    def write(self, chunk: bytes) -> None:
        self._handle.write(chunk)
        self._digest.update(chunk)
        self.size_bytes += len(chunk)

    def finish(self, size_bytes: int, sha256: str) -> None:
        """Flush and fsync; `CopyError` unless the bytes are exactly the expected ones."""
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
        finally:
            self._handle.close()
        if self.size_bytes != size_bytes or self._digest.hexdigest() != sha256:
            raise CopyError(
                f"{self.path.name}: received {self.size_bytes} bytes with sha256 "
                f"{self._digest.hexdigest()[:12]}…, the source has {size_bytes} bytes, "
                f"{sha256[:12]}…"
            )

    def abort(self) -> None:
        self._handle.close()


def check_shard(path: Path, expected: ShardCopy) -> None:
    """`PRAGMA integrity_check` and the counts of a received shard, against the manifest."""
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
        try:
            integrity = conn.execute("PRAGMA integrity_check").fetchall()
            counts = _counts(conn)
        finally:
            conn.close()
    except apsw.Error as exc:
        raise CopyError(f"{expected.name}: the received shard does not open: {exc}") from None
    if integrity != [("ok",)]:
        raise CopyError(f"{expected.name}: integrity_check says {integrity[:3]}")
    if counts != expected.counts:
        raise CopyError(f"{expected.name}: received {counts}, the source has {expected.counts}")


def staging_dirs(databases_dir: Path, files_root: Path | None, move_id: str) -> list[Path]:
    name = f"{INCOMING_PREFIX}{move_id}"
    return [databases_dir / name] + ([files_root / name] if files_root is not None else [])


def remove_staging(databases_dir: Path, files_root: Path | None) -> None:
    """Every staging directory (a receive that crashed leaves one; one move at a time)."""
    for root in (databases_dir, files_root):
        if root is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(root):
                if entry.name.startswith(INCOMING_PREFIX) and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)


def _remove_shard(path: Path) -> None:
    # the side files first: a shard without its WAL is whole (checkpointed), a WAL without
    # its shard is nothing, but a stale WAL beside another shard would be replayed into it
    for suffix in SIDE_SUFFIXES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def install(
    databases_dir: Path, files_root: Path | None, staging: list[Path], manifest: Manifest
) -> None:
    """Put the verified copies in place, each by one rename; whatever this node held for the
    slots' libraries before (stale copies, libraries the source no longer has) goes."""
    incoming_dbs = staging[0]
    incoming_files = staging[1] if len(staging) > 1 else None
    in_manifest = {lib.library_id for lib in manifest.libraries}
    picks = manifest.slots.__contains__
    for library_id, path in shards_in(databases_dir, picks).items():
        if library_id not in in_manifest:
            _remove_shard(path)
    old_files = file_dirs_in(files_root, picks)
    for library_id, path in old_files.items():
        if library_id not in in_manifest:
            shutil.rmtree(path, ignore_errors=True)
    for lib in manifest.libraries:
        if lib.shard is not None:
            final = databases_dir / lib.shard.name
            for suffix in SIDE_SUFFIXES:
                Path(f"{final}{suffix}").unlink(missing_ok=True)
            os.replace(incoming_dbs / lib.shard.name, final)
        else:
            _remove_shard(databases_dir / f"{lib.directory}{SHARD_SUFFIX}")
        if files_root is not None and incoming_files is not None:
            final_dir = files_root / lib.directory
            if lib.files:
                if final_dir.exists():  # moved aside, then the new one in: two renames
                    os.replace(final_dir, incoming_files / f"replaced-{lib.directory}")
                os.replace(incoming_files / lib.directory, final_dir)
            elif final_dir.exists():
                shutil.rmtree(final_dir, ignore_errors=True)
    for root in (databases_dir, files_root):
        if root is not None:
            fsync_directory(root)


def remove_slots(
    databases_dir: Path, files_root: Path | None, slots: Iterable[int]
) -> tuple[int, int]:
    """Delete every shard and files directory of the slots' libraries: (shards, directories).

    Only for slots this node does not own (the caller checks): their data is served elsewhere."""
    picks = frozenset(slots).__contains__
    shards = shards_in(databases_dir, picks)
    for path in shards.values():
        _remove_shard(path)
    directories = file_dirs_in(files_root, picks)
    for path in directories.values():
        shutil.rmtree(path, ignore_errors=True)
    for root in (databases_dir, files_root):
        if root is not None and root.exists():
            fsync_directory(root)
    return len(shards), len(directories)


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
