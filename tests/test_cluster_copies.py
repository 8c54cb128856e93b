"""A slot's data on disk, for a move (`service.cluster.copies`): what a source describes, what a
target accepts from a manifest, and what it installs.

- a WAL a crash left beside a shard is folded in before the copy is described (a copy of the
  main file alone would lose acknowledged commits);
- a manifest from a peer is refused if any name in it is not one this node would have made for
  a library of the moved slots (no path leaves the staging directories);
- a received shard with a flipped byte, a failed integrity check or other counts is refused;
- installing replaces stale copies, drops the side files of an old shard, removes libraries of
  the slots that the source no longer has, and leaves other slots alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import apsw
import pytest

from verdant_trio.service.cluster import copies
from verdant_trio.service.cluster.copies import CopyError, Counts, Manifest, Sink
from verdant_trio.service.cluster.placement import slot_of
from verdant_trio.storage.names import encode_id
from verdant_trio.storage.shard import Shard
from verdant_trio.sync.protocol import ReplicaType


def make_shard(directory: Path, library: str, operations: int, *, close: bool = True) -> Shard:
    shard = Shard.open(directory / f"{encode_id(library)}.sqlite")
    with shard.transaction():
        shard.create_replica("r1", "alice", ReplicaType.REALTIME)
        shard.insert_operations("r1", [
            {"oid": "items/1", "timestamp": f"t{i:04}", "data": {"op": "set", "name": f"p{i}", "value": i}}
            for i in range(operations)
        ])
    if close:
        shard.close()
    return shard


def make_files(root: Path, library: str, names: dict[str, bytes]) -> None:
    for file_id, data in names.items():
        directory = root / encode_id(library) / encode_id(file_id)
        directory.mkdir(parents=True)
        (directory / f"{file_id}.bin").write_bytes(data)


def test_a_wal_left_by_a_crash_is_folded_in_before_the_copy_is_described(tmp_path: Path) -> None:
    live, crashed = tmp_path / "live", tmp_path / "crashed"
    live.mkdir()
    crashed.mkdir()
    shard = make_shard(live, "lib", 30, close=False)  # open: its commits are in the WAL
    name = f"{encode_id('lib')}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(live / f"{name}{suffix}", crashed / f"{name}{suffix}")
    shard.close()
    assert (crashed / f"{name}-wal").stat().st_size > 0
    manifest = copies.describe(crashed, None, frozenset({slot_of("lib")}))
    [entry] = manifest.libraries
    assert entry.shard is not None and entry.shard.counts == Counts(30, 0, 1)
    wal = crashed / f"{name}-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert copies.hash_file(crashed / name) == (entry.shard.size_bytes, entry.shard.sha256)
    # the main file alone now holds every commit
    alone = tmp_path / "alone.sqlite"
    shutil.copyfile(crashed / name, alone)
    conn = apsw.Connection(str(alone))
    assert conn.execute('SELECT COUNT(*) FROM "OperationHistory"').fetchone() == (30,)
    conn.close()


def test_a_manifest_covers_shards_and_files_of_the_slots_only(tmp_path: Path) -> None:
    dbs, files = tmp_path / "dbs", tmp_path / "files"
    dbs.mkdir()
    make_shard(dbs, "mine", 3)
    make_shard(dbs, "other", 2)
    assert slot_of("mine") != slot_of("other")
    make_files(files, "mine", {"f1": b"one", "f2": b"two" * 100})
    make_files(files, "only-files", {"f3": b"three"})
    (files / encode_id("mine") / "f1" / ".upload-123.part").write_bytes(b"half an upload")
    slots = frozenset({slot_of("mine"), slot_of("only-files")})
    manifest = copies.describe(dbs, files, slots)
    assert [(lib.library_id, lib.shard is not None, [f.path for f in lib.files]) for lib in manifest.libraries] == [
        ("mine", True, ["f1/f1.bin", "f2/f2.bin"]), ("only-files", False, ["f3/f3.bin"]),
    ]
    assert manifest.totals.operations == 3 and manifest.totals.files == 3
    assert Manifest.from_json(manifest.to_json(), slots) == manifest


@pytest.mark.parametrize(("change", "problem"), [
    (lambda lib: lib.update(library="elsewhere"), "not in the moved slots"),
    (lambda lib: lib["shard"].update(name="../../etc/passwd"), "another name"),
    (lambda lib: lib["shard"].update(sha256="0" * 63), "sha256"),
    (lambda lib: lib["shard"].update(operations=-1), "non-negative"),
    (lambda lib: lib["files"].append({"path": "../x", "bytes": 1, "sha256": "0" * 64}), "file id"),
    (lambda lib: lib["files"].append({"path": "f9/.upload-1.part", "bytes": 1, "sha256": "0" * 64}), "stored file"),
    (lambda lib: lib["files"].append({"path": "f9/a/b", "bytes": 1, "sha256": "0" * 64}), "<file id>/<name>"),
    (lambda lib: lib["files"].append(dict(lib["files"][0])), "twice"),
])  # fmt: skip
def test_a_manifest_from_a_peer_is_refused_for_any_name_this_node_would_not_make(
    change: object, problem: str
) -> None:
    good = {"path": "f1/a.txt", "bytes": 3, "sha256": "a" * 64}
    data = {"slots": [slot_of("mine")], "libraries": [{
        "library": "mine", "files": [good],
        "shard": {"name": f"{encode_id('mine')}.sqlite", "bytes": 1, "sha256": "b" * 64,
                  "operations": 1, "baselines": 0, "replicas": 1},
    }]}
    Manifest.from_json(data, frozenset({slot_of("mine")}))  # as given, it is fine
    change(data["libraries"][0])  # type: ignore[operator]
    with pytest.raises(ValueError, match=problem):
        Manifest.from_json(data, frozenset({slot_of("mine")}))
    with pytest.raises(ValueError, match="other slots"):
        Manifest.from_json({**data, "slots": [0, 1]}, frozenset({slot_of("mine")}))


def test_a_received_shard_must_match_its_bytes_integrity_and_counts(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    make_shard(source, "lib", 20)
    manifest = copies.describe(source, None, frozenset({slot_of("lib")}))
    [entry] = manifest.libraries
    assert entry.shard is not None
    data = (source / entry.shard.name).read_bytes()

    sink = Sink(tmp_path / "in" / entry.shard.name)
    sink.write(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CopyError, match="sha256"):
        sink.finish(entry.shard.size_bytes, entry.shard.sha256)

    whole = tmp_path / "in" / entry.shard.name
    whole.write_bytes(data)
    copies.check_shard(whole, entry.shard)  # the true copy passes
    with pytest.raises(CopyError, match="received Counts"):
        copies.check_shard(whole, copies.ShardCopy(entry.shard.name, 0, "0" * 64, Counts(21, 0, 1)))
    page = 4096
    broken = bytearray(data)
    broken[page * 2 : page * 3] = b"\xff" * page  # a b-tree page of garbage
    whole.write_bytes(bytes(broken))
    with pytest.raises(CopyError):
        copies.check_shard(whole, entry.shard)


def test_install_replaces_stale_copies_and_drops_what_the_source_no_longer_has(tmp_path: Path) -> None:
    source_dbs, source_files = tmp_path / "s-dbs", tmp_path / "s-files"
    dbs, files = tmp_path / "dbs", tmp_path / "files"
    for directory in (source_dbs, dbs):
        directory.mkdir()
    moving = ["lib-a", "lib-b"]
    slots = frozenset(slot_of(lib) for lib in moving)
    gone = next(f"gone-{i}" for i in range(10_000) if slot_of(f"gone-{i}") in slots)
    elsewhere = next(f"kept-{i}" for i in range(10_000) if slot_of(f"kept-{i}") not in slots)
    make_shard(source_dbs, "lib-a", 5)
    make_files(source_files, "lib-a", {"f1": b"new"})
    make_shard(source_dbs, "lib-b", 7)
    # the target: a stale copy of lib-a (with a stale WAL beside it), a library of the slots
    # the source no longer has, and a library of another slot
    stale_dir = tmp_path / "stale"
    stale_dir.mkdir()
    stale = make_shard(stale_dir, "lib-a", 40, close=False)  # a crash: commits left in its WAL
    name = f"{encode_id('lib-a')}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(stale_dir / f"{name}{suffix}", dbs / f"{name}{suffix}")
    stale.close()
    assert (dbs / f"{name}-wal").stat().st_size > 0
    make_files(files, "lib-a", {"old": b"old"})
    make_shard(dbs, gone, 2)
    make_files(files, gone, {"f": b"gone"})
    make_shard(dbs, elsewhere, 4)

    manifest = copies.describe(source_dbs, source_files, slots)
    staging = copies.staging_dirs(dbs, files, "m1")
    for lib in manifest.libraries:
        if lib.shard is not None:
            (staging[0]).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_dbs / lib.shard.name, staging[0] / lib.shard.name)
        for f in lib.files:
            (staging[1] / lib.directory / f.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_files / lib.directory / f.path, staging[1] / lib.directory / f.path)
    copies.install(dbs, files, staging, manifest)
    copies.remove_staging(dbs, files)

    def count(library: str) -> int:
        conn = apsw.Connection(str(dbs / f"{encode_id(library)}.sqlite"))
        try:
            return int(conn.execute('SELECT COUNT(*) FROM "OperationHistory"').fetchone()[0])
        finally:
            conn.close()

    # the stale WAL is gone: replayed into the new shard it would have corrupted it
    assert (count("lib-a"), count("lib-b"), count(elsewhere)) == (5, 7, 4)
    copies.check_shard(dbs / name, manifest.libraries[0].shard)  # type: ignore[arg-type]
    assert not (dbs / f"{encode_id(gone)}.sqlite").exists() and not (files / encode_id(gone)).exists()
    assert sorted(p.name for p in (files / encode_id("lib-a")).rglob("*") if p.is_file()) == ["f1.bin"]
    assert not any(p.name.startswith(copies.INCOMING_PREFIX) for p in (*dbs.iterdir(), *files.iterdir()))
    assert copies.remove_slots(dbs, files, slots) == (2, 1)
    assert [p.name for p in dbs.iterdir()] == [f"{encode_id(elsewhere)}.sqlite"]


def test_install_removes_the_files_of_a_library_the_source_has_none_of(tmp_path: Path) -> None:
    source, dbs, files = tmp_path / "source", tmp_path / "dbs", tmp_path / "files"
    for directory in (source, dbs):
        directory.mkdir()
    make_shard(source, "lib-a", 3)
    make_files(files, "lib-a", {"stale": b"from long ago"})  # the target's stale files
    manifest = copies.describe(source, None, frozenset({slot_of("lib-a")}))
    staging = copies.staging_dirs(dbs, files, "m2")
    staging[0].mkdir(parents=True)
    shutil.copyfile(source / f"{encode_id('lib-a')}.sqlite", staging[0] / f"{encode_id('lib-a')}.sqlite")
    copies.install(dbs, files, staging, manifest)  # no file was staged at all
    assert not (files / encode_id("lib-a")).exists()
    assert (dbs / f"{encode_id('lib-a')}.sqlite").exists()
