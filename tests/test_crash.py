"""Crash safety: SIGKILL the server again and again while several replicas flood it with writes.

After every kill, before the restart, the test opens the library's database itself and checks:
- `PRAGMA integrity_check` is ok;
- every operation the server had acknowledged (`server-ack`, or a `sync-resp` to a sync that
  offered it) is there: in history, or folded into its object's baseline;
- nothing is duplicated (one row per operation, one operation per server order).
Then the server restarts on the same data, the replicas reconnect and resend what was never
acknowledged, as Verdant clients do, and the flood goes on. At the end every replica, a fresh
replica and the server's own view of every document hold the same data.

A server that acknowledged before committing fails the second check as soon as a kill lands
between the two. Kills land at random points of the flood, several times: `VERDANT_HEAVY=1`
raises the number of kill cycles.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import apsw
import httpx
import orjson
import pytest
import trio
import trio.lowlevel
from trio_websocket import HandshakeError

from verdant_trio.client import Closed, connect

from .procserver import ServerProcess
from .replicas import Replica, initialize, set_property

pytestmark = [pytest.mark.trio, pytest.mark.slow]

HEAVY = bool(os.environ.get("VERDANT_HEAVY"))
KILLS = int(os.environ.get("VERDANT_CRASH_KILLS", 12 if HEAVY else 4))
WRITERS = 3
WINDOW = 8
OBJECTS_PER_WRITER = 4
LIBRARY = "crash"


class Writer:
    """A replica that floods while connected and reconnects after each crash."""

    def __init__(self, index: int) -> None:
        self.replica = Replica(f"writer{index}", f"user{index}", node=f"wr{index:05d}")
        self.oids = [f"items/w{index}-{k}" for k in range(OBJECTS_PER_WRITER)]
        self.sequence = 0
        self.flooding = True
        self.sessions = 0

    def next_operations(self) -> list[dict[str, Any]]:
        count = 1 + self.sequence % 3
        ops = []
        for _ in range(count):
            oid = self.oids[self.sequence % len(self.oids)]
            ops.append(set_property(self.replica, oid, f"p{self.replica.id}-{self.sequence}", self.sequence))
            self.sequence += 1
        return ops

    async def session(self, server: ServerProcess, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """One connection: sync (resending), then flood until the server goes away."""
        started = False
        try:
            async with connect(server.sync_url, server.token(LIBRARY, self.replica.user)) as client:
                await self.replica.sync(client)
                self.sessions += 1
                if self.sessions == 1:
                    await client.send(self.replica.op_message(
                        [initialize(self.replica, oid) for oid in self.oids]
                    ))
                task_status.started()
                started = True
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.replica.pump, client)
                    while self.flooding:
                        if len(self.replica.pending) >= WINDOW:
                            await self.replica.changed.wait()
                            continue
                        await client.send(self.replica.op_message(self.next_operations()))
                        await trio.lowlevel.checkpoint()
                    # not flooding: keep pumping until the server closes or we are cancelled
        except* (Closed, HandshakeError, OSError, trio.BrokenResourceError):
            if not started:
                raise


def check_database(path: Path, writers: list[Writer]) -> dict[str, int]:
    """The checks after a kill; returns counts for the failure message and the log."""
    conn = apsw.Connection(str(path))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute(
            'SELECT replicaId, oid, timestamp, serverOrder FROM "OperationHistory"'
        ).fetchall()
        keys = [(r[0], r[1], r[2]) for r in rows]
        assert len(keys) == len(set(keys)), "an operation is stored twice"
        orders = [r[3] for r in rows]
        assert len(orders) == len(set(orders)), "two operations share a server order"
        baselines = {
            oid: (orjson.loads(snapshot) if snapshot else None, stamp)
            for oid, snapshot, stamp in conn.execute(
                'SELECT oid, snapshot, timestamp FROM "DocumentBaseline"'
            )
        }
        in_history = set(keys)
        missing = []
        acked = 0
        for writer in writers:
            for op in writer.replica.acked:
                acked += 1
                if (writer.replica.id, op["oid"], op["timestamp"]) in in_history:
                    continue
                snapshot, stamp = baselines.get(op["oid"], (None, ""))
                data = op["data"]
                folded = snapshot is not None and stamp >= op["timestamp"] and (
                    data["op"] == "initialize" or snapshot.get(data["name"]) == data["value"]
                )
                if not folded:
                    missing.append((writer.replica.id, op["oid"], op["timestamp"], data))
        assert not missing, f"{len(missing)} acknowledged operations lost, e.g. {missing[:3]}"
        return {"acked": acked, "history": len(rows), "baselines": len(baselines)}
    finally:
        conn.close()


async def document(server: ServerProcess, oid: str) -> Any:
    collection, _, doc_id = oid.partition("/")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.get(
            f"/admin/libraries/{LIBRARY}/documents/{collection}/{doc_id}",
            headers=server.admin_headers(),
        )
    assert response.status_code == 200, response.text
    return response.json()


async def test_acknowledged_writes_survive_sigkill_and_replicas_converge(tmp_path: Path) -> None:
    rng = random.Random(os.environ.get("VERDANT_CRASH_SEED", "verdant"))
    writers = [Writer(i) for i in range(WRITERS)]
    server = ServerProcess(tmp_path / "server")
    shard = server.databases_dir / f"{LIBRARY}.sqlite"
    history: list[dict[str, int]] = []
    with trio.fail_after(60 + 40 * KILLS):
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            for cycle in range(KILLS):
                acked_before = sum(len(w.replica.acked) for w in writers)
                async with trio.open_nursery() as sessions:
                    for writer in writers:
                        await sessions.start(writer.session, server)
                    # a kill only proves something once this cycle has acknowledged writes
                    while sum(len(w.replica.acked) for w in writers) < acked_before + 30:
                        await writers[0].replica.changed.wait()
                    await trio.sleep(rng.uniform(0.0, 0.5))
                    await server.kill()
                # the sessions ended by themselves: the server went away under them
                counts = check_database(shard, writers)
                counts["cycle"] = cycle
                history.append(counts)
                await server.start(nursery)

            # the last round: no more writes; everyone resyncs and waits for everything
            for writer in writers:
                writer.flooding = False
            async with trio.open_nursery() as sessions:
                for writer in writers:
                    await sessions.start(writer.session, server)
                everything = {
                    (op["oid"], op["data"]["name"])
                    for w in writers for op in w.replica.acked if op["data"]["op"] == "set"
                }
                assert all(not w.replica.pending for w in writers), "resent writes were not taken"
                for writer in writers:
                    while not everything <= writer.replica.properties():
                        await writer.replica.changed.wait()
                sessions.cancel_scope.cancel()

            fresh = Replica("fresh", "fresh-user", node="fresh00")
            async with connect(server.sync_url, server.token(LIBRARY, fresh.user)) as client:
                await fresh.sync(client)
            for writer in writers:
                assert writer.replica.state == fresh.state
            for oid, props in fresh.state.items():
                assert await document(server, oid) == props
            check_database(shard, writers)
            await server.stop()
            nursery.cancel_scope.cancel()
    total = sum(len(w.replica.acked) for w in writers)
    print(f"crash cycles: {history}; acknowledged operations in total: {total}")
    assert len(history) == KILLS
    assert "Traceback" not in server.log()
