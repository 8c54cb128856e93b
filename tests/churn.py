"""Replicas that come and go (issue 11, part 8): the churn load, and the server RSS after it.

A cycle opens `connections` websockets over `libraries` libraries at once. Each is a replica
never seen before (a new tab or device: a new replica id; its user is one of a few per library)
and does what a short-lived client does: sync, acknowledge the sync's nonce, write one operation
(waiting for its `server-ack`), send a presence update (waiting for its own `presence-changed`),
then goes: even-numbered ones with a clean close handshake, odd-numbered ones by dropping TCP
(an RST, no close frame). A cycle ends once the server reports no realtime connection open, and
then the server's RSS (and SQLite's share of it) is read.

Waiting for each reply before the next step keeps every cycle the same work for the server, so
the RSS curve shows what departed replicas leave behind, not how a race fell.

`tests/test_churn.py` runs it. By hand, to record a curve, with `--probe DIR` what the server
holds after chosen cycles (`churn_probe.py`; `--tracemalloc` adds snapshots), and `--compare`
to diff two of them:

    python -m tests.churn --cycles 96 [--probe /tmp/churn --probe-at 10,60 [--tracemalloc]]
    python -m tests.churn --probe /tmp/churn --compare cycle010 cycle060
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import orjson
import trio

from bench.wire import LeanSocket, WsClosed
from verdant_trio.client import sync_message, timestamp

from .procserver import REPO, ServerProcess

USERS_PER_LIBRARY: Final = 10
OPEN_METRIC: Final = 'verdant_connections_open{replica_type="realtime"'
SQLITE_METRIC: Final = "verdant_sqlite_memory_bytes"
PROBE: Final = REPO / "tests" / "churn_probe.py"
_PRELUDE: Final = (
    "import sys, runpy; runpy.run_path(sys.argv.pop(1)); "
    "from verdant_trio.service.cli import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass
class ProbedServer(ServerProcess):
    """A server process that, with `probe_dir`, runs `churn_probe.py` before it starts: then
    `probe(label)` returns what the server holds (see that module)."""

    probe_dir: Path | None = None
    tracemalloc: bool = False
    leak_bytes: int = 0
    """A deliberate leak per departed websocket (`churn_probe`), to show a test fails on one."""

    def command(self) -> list[str]:
        command = super().command()
        if self.probe_dir is None:
            return command
        settings = {
            "dir": str(self.probe_dir), "tracemalloc": self.tracemalloc,
            "leak_bytes": self.leak_bytes,
        }
        assert command[1:3] == ["-m", "verdant_trio.service.cli"]
        return [sys.executable, "-c", _PRELUDE, str(PROBE), json.dumps(settings), *command[3:]]

    async def probe(self, label: str, timeout_s: float = 120.0) -> dict[str, Any]:
        assert self.probe_dir is not None
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        (self.probe_dir / "next-label").write_text(label)
        done = self.probe_dir / f"{label}.done"
        os.kill(self.pid, signal.SIGUSR1)
        with trio.fail_after(timeout_s):
            while not done.exists():  # the server process writes it
                await trio.sleep(0.05)
        result = json.loads((self.probe_dir / f"{label}.json").read_text())
        assert isinstance(result, dict)
        return result


@dataclass
class ChurnStats:
    rss_kib: list[int] = field(default_factory=list)
    """Server RSS after each cycle (the first entry: before the first cycle)."""
    sqlite_kib: list[int] = field(default_factory=list)
    """What SQLite held at the same moments (`verdant_sqlite_memory_bytes`)."""
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def metric(server: ServerProcess, prefix: str) -> float:
    """The sum of the server's series that start with `prefix` (0 when there are none)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(server.url + "/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    )


async def open_connections(server: ServerProcess) -> float:
    return await metric(server, OPEN_METRIC)


async def _expect(sock: LeanSocket, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first message that matches; others (broadcasts of the neighbours) are skipped."""
    while True:
        message = orjson.loads(await sock.receive())
        if message.get("type") in ("error", "forbidden"):
            raise AssertionError(f"server refused: {message}")
        if predicate(message):
            assert isinstance(message, dict)
            return message


def abort(sock: LeanSocket) -> None:
    """Drop the TCP connection: SO_LINGER 0 makes the close send an RST, no close frame."""
    sock.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.stream.socket.close()


async def one_replica(
    server: ServerProcess, library: str, user: str, replica_id: str, *, clean: bool
) -> None:
    sock = await LeanSocket.connect(server.sync_url, server.token(library, user))
    try:
        node = replica_id[-7:].rjust(7, "0")
        await sock.send_json(sync_message(replica_id, ts=timestamp(node=node)))
        response = await _expect(sock, lambda m: m.get("type") == "sync-resp")
        nonce = response.get("ackThisNonce")
        if nonce:
            await sock.send_json(
                {"type": "ack", "replicaId": replica_id, "timestamp": timestamp(node=node),
                 "nonce": nonce}
            )
        stamp = timestamp(node=node)
        await sock.send_json({
            "type": "op", "replicaId": replica_id, "timestamp": stamp,
            "operations": [{
                "oid": f"items/{user}", "timestamp": stamp,
                "data": {"op": "set", "name": "seenBy", "value": replica_id},
            }],
        })
        await _expect(
            sock, lambda m: m.get("type") == "server-ack" and m.get("timestamp") >= stamp
        )
        await sock.send_json({
            "type": "presence-update", "replicaId": replica_id,
            "presence": {"cursor": replica_id}, "internal": {"viewId": None},
        })
        await _expect(
            sock,
            lambda m: m.get("type") == "presence-changed" and m.get("replicaId") == replica_id,
        )
    except BaseException:
        abort(sock)
        raise
    if clean:
        with trio.move_on_after(5):
            await sock.aclose()
            return
    abort(sock)


async def cycle(
    server: ServerProcess, number: int, *, connections: int = 150, libraries: int = 15,
    timeout_s: float = 60.0,
) -> list[str]:
    """One cycle; returns the failures (empty when every replica did all its steps)."""
    failures: list[str] = []

    async def run(i: int) -> None:
        library = f"churn-{i % libraries}"
        user = f"user{(i // libraries) % USERS_PER_LIBRARY}"
        replica_id = f"c{number:04d}r{i:04d}"
        try:
            await one_replica(server, library, user, replica_id, clean=i % 2 == 0)
        except (WsClosed, OSError, AssertionError, trio.TooSlowError) as exc:
            failures.append(f"{replica_id}: {exc!r}")

    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            for i in range(connections):
                nursery.start_soon(run, i)
        while await open_connections(server):
            await trio.sleep(0.05)
    return failures


async def churn(
    server: ServerProcess,
    cycles: int,
    *,
    connections: int = 150,
    libraries: int = 15,
    after_cycle: Callable[[int], Awaitable[None]] | None = None,
    report: Callable[[str], None] | None = None,
) -> ChurnStats:
    stats = ChurnStats()

    async def measure() -> None:
        stats.rss_kib.append(server.rss_kb())
        stats.sqlite_kib.append(int(await metric(server, SQLITE_METRIC)) // 1024)

    await measure()
    for number in range(1, cycles + 1):
        started = time.perf_counter()
        stats.failures += await cycle(
            server, number, connections=connections, libraries=libraries
        )
        if after_cycle is not None:
            await after_cycle(number)
        await measure()
        stats.seconds.append(time.perf_counter() - started)
        if report is not None:
            report(
                f"cycle {number:3d}: RSS {stats.rss_kib[-1] / 1024:6.1f} MiB, "
                f"SQLite {stats.sqlite_kib[-1] / 1024:5.1f} MiB "
                f"({stats.seconds[-1]:.2f} s, {len(stats.failures)} failures so far)"
            )
    return stats


async def _main(args: argparse.Namespace) -> None:
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="churn-"))
    storage = {"truancy_minutes": args.truancy_minutes} if args.truancy_minutes else {}
    server = ProbedServer(
        data_dir, storage=storage, probe_dir=Path(args.probe).resolve() if args.probe else None,
        tracemalloc=args.tracemalloc, leak_bytes=args.leak_bytes,
    )
    probe_at = {int(n) for n in args.probe_at.split(",") if n} if args.probe else set()

    async def after_cycle(number: int) -> None:
        if number in probe_at:
            await server.probe(f"cycle{number:03d}")
        if args.probe and number == args.cycles:
            await server.probe(f"cycle{number:03d}-trim")

    async with trio.open_nursery() as nursery:
        await server.start(nursery, timeout_s=120 if args.tracemalloc else 30)
        try:
            stats = await churn(
                server, args.cycles, connections=args.connections, libraries=args.libraries,
                after_cycle=after_cycle, report=print,
            )
        finally:
            with trio.CancelScope(shield=True):
                await server.stop()
    databases = sum(p.stat().st_size for p in server.databases_dir.glob("*.sqlite*"))
    result = {
        "cycles": args.cycles, "connections": args.connections, "libraries": args.libraries,
        "rss_mib": [round(kib / 1024, 2) for kib in stats.rss_kib],
        "sqlite_mib": [round(kib / 1024, 2) for kib in stats.sqlite_kib],
        "seconds": [round(s, 2) for s in stats.seconds],
        "failures": stats.failures[:20], "failure_count": len(stats.failures),
        "databases_bytes": databases,
    }
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


def compare(trace_dir: Path, before: str, after: str, top: int = 25) -> None:
    """What grew between two snapshots: allocation sites, then live objects by type."""
    import tracemalloc

    old = tracemalloc.Snapshot.load(str(trace_dir / f"{before}.tracemalloc"))
    new = tracemalloc.Snapshot.load(str(trace_dir / f"{after}.tracemalloc"))
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    old, new = old.filter_traces(ignore), new.filter_traces(ignore)
    for key_type, depth in (("lineno", 1), ("traceback", 6)):
        print(f"-- top growth by {key_type}")
        for stat in new.compare_to(old, key_type)[:top if key_type == "lineno" else 8]:
            print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+8d} blocks  "
                  + (str(stat.traceback[0]) if depth == 1 else ""))
            if depth > 1:
                for line in stat.traceback.format(limit=depth, most_recent_first=True):
                    print("      " + line)
    counts_old = json.loads((trace_dir / f"{before}.json").read_text())
    counts_new = json.loads((trace_dir / f"{after}.json").read_text())
    types_old, types_new = counts_old["types"], counts_new["types"]
    grown = sorted(
        ((types_new.get(t, 0) - types_old.get(t, 0), t) for t in set(types_old) | set(types_new)),
        reverse=True,
    )
    print("-- live objects by type (gc), growth")
    for diff, name in grown[:top]:
        print(f"{diff:+8d}  {name}  ({types_new.get(name, 0)})")
    for key in ("allocated_blocks", "sqlite_bytes", "rss_kib"):
        print(key, counts_old[key], "->", counts_new[key])
    print("census", json.dumps(counts_new["census"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="with --probe: compare two tracemalloc snapshots taken earlier")
    parser.add_argument("--cycles", type=int, default=96)
    parser.add_argument("--connections", type=int, default=150)
    parser.add_argument("--libraries", type=int, default=15)
    parser.add_argument("--data-dir")
    parser.add_argument("--probe", metavar="DIR", help="run churn_probe.py in the server")
    parser.add_argument("--probe-at", default="10,60", help="cycles after which to probe")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="with --probe: tracemalloc snapshots too (slows the server)")
    parser.add_argument("--leak-bytes", type=int, default=0,
                        help="with --probe: a deliberate leak per departed websocket")
    parser.add_argument("--out", help="write the curve as JSON here")
    parser.add_argument("--truancy-minutes", type=float, help="the server's [storage] setting")
    args = parser.parse_args()
    if args.compare:
        compare(Path(args.probe), *args.compare)
        return
    trio.run(_main, args)


if __name__ == "__main__":
    main()
