"""Replicas that come and go leave no memory behind (issue 11, part 8).

`tests/churn.py` drives a real server process: cycles of 150 websockets over 15 libraries, each
a replica never seen before that syncs, writes one operation, sends a presence update and goes
(half with a close handshake, half by dropping TCP). `churn_probe.py`, run inside the server,
reports what it holds after chosen cycles.

Truancy is 6 s here, so departed replicas stop holding compaction back and their operations are
folded into baselines: a new replica's initial sync then stays the same size, and what is left
to measure is what the departed replicas themselves leave. (With the default of 7 days every
departed replica holds the history back, each new replica downloads one more operation per
departed one, and the RSS follows that growing data: see the README.)

`VERDANT_HEAVY=1` runs the issue's 96 cycles (14,400 connections); `VERDANT_CHURN_CYCLES`
sets any number. `VERDANT_CHURN_LEAK_BYTES=1800` makes the server leak 1.8 KB per departed
websocket on purpose: the test must then fail (that is how its bounds were checked).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from .churn import ProbedServer, churn

pytestmark = [pytest.mark.trio, pytest.mark.slow]

HEAVY = bool(os.environ.get("VERDANT_HEAVY"))
CYCLES: Final = int(os.environ.get("VERDANT_CHURN_CYCLES") or (96 if HEAVY else 36))
CONNECTIONS: Final = 150
WARMUP: Final = 4
"""Cycles before the first measure: libraries open, caches and the allocator's pools fill."""
LEAK_BYTES: Final = int(os.environ.get("VERDANT_CHURN_LEAK_BYTES") or 0)

WINDOW: Final = 4
"""Probes averaged at the middle and at the end: Python's block count moves by about a
thousand between two probes (work in flight in the library tasks), an average of four
settles it."""
RSS_BYTES_PER_CONNECTION: Final = 1200
"""What the second half of the run may add to the RSS per departed connection.

Measured here (a loaded 2-core machine, eight runs): 110-600 bytes, SQLite's page cache
following the table of known replicas (a row per replica id, kept as the reference keeps it)
and the allocator's pools still filling. A leak of 1.8 KB per connection (the issue's) adds its
1.8 KB on top of that: twice the bound's margin either way. An RSS moves in pages and in 1 MiB
pymalloc arenas, so the bound is an average over at least 2,400 connections. Not a ratio of the
second half to the first: the first still holds the warm-up (about 3 MiB here), which depends
on the machine, and a ratio would let a leak pass where the warm-up is larger."""
BLOCKS_PER_CONNECTION: Final = 1.0
"""Python memory blocks (objects) still referenced, per departed connection, between the two
windows: measured here -0.3 to +0.3; the shard caches this test was written for held about 4
per connection (two replica id strings, a user id, a time)."""


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


async def test_departed_replicas_leave_no_memory_behind(tmp_path: Path) -> None:
    assert CYCLES >= WARMUP + 4 * WINDOW, "too few cycles to measure two halves"
    middle = WARMUP + (CYCLES - WARMUP) // 2
    windows = (range(middle - WINDOW + 1, middle + 1), range(CYCLES - WINDOW + 1, CYCLES + 1))
    probes: dict[int, dict[str, Any]] = {}
    server = ProbedServer(
        tmp_path / "server",
        storage={"truancy_minutes": 0.1},
        probe_dir=tmp_path / "probe",
        leak_bytes=LEAK_BYTES,
    )

    async def after_cycle(number: int) -> None:
        if number == WARMUP or any(number in window for window in windows):
            probes[number] = await server.probe(f"cycle{number}")

    with trio.fail_after(60 + 10 * CYCLES):
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            try:
                stats = await churn(
                    server, CYCLES, connections=CONNECTIONS, after_cycle=after_cycle
                )
            finally:
                with trio.CancelScope(shield=True):
                    await server.stop()

    departed = CONNECTIONS * (CYCLES - middle)
    """Between the middle and the end, and between the windows' centres alike."""
    rss_first_kib = probes[middle]["rss_kib"] - probes[WARMUP]["rss_kib"]
    rss_second_kib = probes[CYCLES]["rss_kib"] - probes[middle]["rss_kib"]
    blocks = [mean([probes[n]["allocated_blocks"] for n in window]) for window in windows]
    blocks_grown = blocks[1] - blocks[0]
    curve = ", ".join(
        f"{n}: {kib / 1024:.1f}" for n, kib in enumerate(stats.rss_kib) if n % 4 == 0
    )
    print(
        f"churn: {CYCLES} cycles of {CONNECTIONS} replicas; RSS MiB by cycle {curve}; "
        f"RSS +{rss_first_kib} KiB over cycles {WARMUP}-{middle}, +{rss_second_kib} KiB over "
        f"{middle}-{CYCLES} ({rss_second_kib * 1024 / departed:.0f} B per departed connection); "
        f"Python blocks {blocks_grown:+.0f} ({blocks_grown / departed:+.2f} per connection); "
        f"SQLite {probes[middle]['sqlite_bytes'] // 1024} -> "
        f"{probes[CYCLES]['sqlite_bytes'] // 1024} KiB"
    )
    assert stats.failures == [], stats.failures[:5]

    # Nothing of a departed replica is referenced: no connection, no cached replica, no peer,
    # no presence, no departure or attach still pending.
    census = probes[CYCLES]["census"]
    held = {
        key: census[key]
        for key in (
            "shard_owners", "shard_touched", "peers", "presence", "detached", "attach_queued",
            "http_leases", "connections", "admitted", "handshake_borrowers", "sync_borrowers",
        )
        if census[key]
    }
    held.update({name: count for name, count in census["objects"].items()
                 if count and name.startswith("verdant_trio.")})
    assert held == {}, f"left behind by departed replicas: {held}; held by {census['holders']}"

    # Python objects: flat.
    assert blocks_grown < BLOCKS_PER_CONNECTION * departed, (
        f"{blocks_grown:.0f} more Python blocks after {departed} more departed connections"
    )
    # And the RSS levels off.
    assert rss_second_kib * 1024 < RSS_BYTES_PER_CONNECTION * departed, (
        f"RSS grew {rss_second_kib} KiB over the last {departed} connections"
    )
