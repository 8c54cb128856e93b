"""Run inside a churn server before it starts (see `tests/churn.py`): diagnostics, test-only.

Its settings come as a JSON argument (`ProbedServer.command`). On SIGUSR1 it collects garbage
and writes `LABEL.json` in its directory (LABEL is read from `next-label` there), then
`LABEL.done`:
- `allocated_blocks`: memory blocks Python has handed out and not taken back
  (`sys.getallocatedblocks`): objects still referenced, whatever their type;
- `census`: what the server keeps per replica and per connection (each shard's caches, each
  library's peers, presence, departures, HTTP leases; the core's connections and limiters; the
  profile cache), the live objects of the classes a connection is made of, and who holds a
  leftover connection;
- `types`: live gc-tracked objects by type; `malloc` (glibc, all arenas: held from the system,
  in use, free), `pymalloc` (arenas and blocks), `sqlite_bytes`, `rss_kib`, `threads`.

`tracemalloc` also starts tracemalloc before the server is imported and writes
`LABEL.tracemalloc` snapshots (it slows the server several times and hides pymalloc's own
statistics). `leak_bytes` N makes every departing websocket leave N bytes behind, referenced
forever: a deliberate leak, to show that the churn test fails on one.
A label ending in `-trim` also calls `malloc_trim(0)` and records the RSS before and after: how
much of it was memory the allocator held free.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import tempfile
import threading
import tracemalloc
from collections import Counter
from pathlib import Path
from types import CoroutineType, FrameType
from typing import Any

_SETTINGS = json.loads(sys.argv.pop(1))  # put there by `ProbedServer.command`
PROBE_DIR = Path(_SETTINGS["dir"])
TRACEMALLOC = bool(_SETTINGS["tracemalloc"])
LEAK_BYTES = int(_SETTINGS["leak_bytes"])
PER_CONNECTION_CLASSES = (
    "verdant_trio.engine.connections.ReplicaConnection",
    "verdant_trio.transport.websocket.StreamWebSocket",
    "verdant_trio.engine.core._LimitedHost",
    "verdant_trio.sync.tokens.TokenInfo",
    "trio.MemorySendChannel",
    "trio.lowlevel.Task",
    "trio.Nursery",
    "trio.SocketStream",
)

if TRACEMALLOC:
    tracemalloc.start(16)

_leaked: list[Any] = []
if LEAK_BYTES:
    from verdant_trio.sync.decisions import LibraryCore

    _detach = LibraryCore.detach

    def _leaky_detach(self: LibraryCore, peer: Any) -> None:
        _leaked.append(bytes(LEAK_BYTES))  # written, so it is resident
        _detach(self, peer)

    LibraryCore.detach = _leaky_detach  # type: ignore[method-assign]


def _census(objects: list[Any]) -> dict[str, Any]:
    from verdant_trio.engine.core import VerdantCore
    from verdant_trio.engine.library import LibraryHost
    from verdant_trio.engine.profiles import CachedProfiles
    from verdant_trio.storage.shard import Shard

    out: dict[str, Any] = {
        "shard_owners": 0, "shard_touched": 0, "peers": 0, "presence": 0, "detached": 0,
        "attach_queued": 0, "http_leases": 0, "connections": 0, "admitted": 0,
        "upload_locks": 0, "handshake_borrowers": 0, "sync_borrowers": 0, "profiles": 0,
        "libraries": 0,
    }
    for obj in objects:
        if isinstance(obj, Shard) and not obj.closed:
            out["shard_owners"] += len(obj._owners)
            out["shard_touched"] += len(obj._touched_ms)
        elif isinstance(obj, LibraryHost) and obj.core is not None and not obj.closed.is_set():
            out["libraries"] += 1
            out["peers"] += len(obj.core.peers)
            out["presence"] += len(obj.core.presence)
            out["detached"] += len(obj._detached)
            out["attach_queued"] += len(getattr(obj, "_attach_queued", ()))
            out["http_leases"] += len(obj._upkeep.http_leases)
        elif isinstance(obj, VerdantCore):
            out["connections"] += len(obj.connections)
            out["admitted"] += obj._admitted
            out["upload_locks"] += len(obj.files._upload_locks)
            out["handshake_borrowers"] += len(obj.handshake_limiter.statistics().borrowers)
            out["sync_borrowers"] += len(obj.sync_limiter.statistics().borrowers)
        elif isinstance(obj, CachedProfiles):
            out["profiles"] += len(obj._cache)
    return out


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]


def _malloc() -> dict[str, int]:
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return {
        "arena_bytes": info.arena, "mmapped_bytes": info.hblkhd,
        "in_use_bytes": info.uordblks, "free_bytes": info.fordblks,
    }


def _pymalloc() -> dict[str, int]:
    """From `sys._debugmallocstats` (written to fd 2; empty while tracemalloc runs)."""
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
    stats: dict[str, int] = {}
    for line in text.splitlines():
        for key in ("arenas allocated current", "bytes in allocated blocks",
                    "bytes in available blocks"):
            if line.startswith("# " + key):
                stats[key] = int(line.split("=")[-1].replace(",", "").strip())
    return stats


def _describe(obj: Any) -> str:
    if isinstance(obj, FrameType):
        name = obj.f_code.co_filename.rsplit("/", 1)[-1]
        return f"frame {name}:{obj.f_lineno} {obj.f_code.co_name}"
    if isinstance(obj, CoroutineType):
        frame = obj.cr_frame
        where = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}" if frame else "?"
        return f"coroutine {obj.cr_code.co_qualname} at {where}"
    if isinstance(obj, dict):
        return "dict keys=" + ",".join(map(str, list(obj)[:6]))
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _holders(obj: Any, objects: list[Any], depth: int = 4) -> list[str]:
    """Who keeps a leftover connection alive: the first referrer at each level, outward."""
    chain: list[str] = []
    skip = {id(sys._getframe()), id(sys._getframe(1)), id(objects)}
    for _ in range(depth):
        referrers = [r for r in gc.get_referrers(obj) if id(r) not in skip]
        if not referrers:
            break
        skip.add(id(referrers))
        obj = referrers[0]
        more = f" (+{len(referrers) - 1} more)" if len(referrers) > 1 else ""
        chain.append(_describe(obj) + more)
    return chain


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _probe(signum: int, frame: FrameType | None) -> None:
    import apsw

    label = (PROBE_DIR / "next-label").read_text().strip()
    gc.collect()
    if TRACEMALLOC:
        tracemalloc.take_snapshot().dump(str(PROBE_DIR / f"{label}.tracemalloc"))
    objects = gc.get_objects()
    types = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objects)
    data: dict[str, Any] = {
        "allocated_blocks": sys.getallocatedblocks(),
        "census": {
            **_census(objects),
            "objects": {name: types.get(name, 0) for name in PER_CONNECTION_CLASSES},
        },
        "types": dict(types.most_common()),
        "malloc": _malloc(),
        "pymalloc": _pymalloc(),
        "sqlite_bytes": apsw.memory_used(),
        "rss_kib": _rss_kib(),
        "threads": threading.active_count(),
    }
    from verdant_trio.engine.connections import ReplicaConnection

    data["census"]["holders"] = [
        _holders(o, objects) for o in objects if isinstance(o, ReplicaConnection)
    ][:3]
    del objects
    if label.endswith("-trim"):
        ctypes.CDLL(None).malloc_trim(0)
        data["rss_kib_after_trim"] = _rss_kib()
        data["malloc_after_trim"] = _malloc()
    (PROBE_DIR / f"{label}.json").write_text(json.dumps(data, default=str))
    (PROBE_DIR / f"{label}.done").write_text("")


signal.signal(signal.SIGUSR1, _probe)
