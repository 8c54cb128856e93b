"""Moving a slot in a running cluster (`verdant-trio cluster-dev`: 3 nodes, Debian's HAProxy)
with `verdant-trio cluster move`, as an operator runs it, while clients write through the front:

- a replica on our client floods the library and reconnects at once whenever its socket closes
  (as 3.6.3 does): every operation the server acknowledged, before, during and after the move,
  is in the new owner's shard, and the old owner holds none;
- real `@verdant-web/store` 3.6.3 clients whose tokens were minted before the move keep writing
  through it and end up on the new owner by themselves (same token, HAProxy routes by library):
  what they write after the move reaches a client that joined after it, and the new owner's
  shard; all of them converge;
- the move's unavailability, as the command reports it (fence to served again) and as the
  writer saw it (its longest wait between two acknowledgements), is printed;
- `cluster status` shows the table version every node and HAProxy's map are on.

Without haproxy or node these tests fail (never skip).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import apsw
import httpx
import orjson
import pytest
import trio
from trio_websocket import HandshakeError

from verdant_trio.client import Closed, connect
from verdant_trio.service.cluster.placement import slot_of

from ..cluster_front import haproxy_binary
from ..replicas import Replica, initialize, set_property
from .devcluster import DevCluster, dev_cluster
from .harness import REPO_ROOT, NodeClient, converged, gather

pytestmark = pytest.mark.interop


@pytest.fixture
async def cluster(tmp_path: Path) -> Any:
    haproxy_binary()  # fails, naming the install command, where haproxy is missing
    async with dev_cluster(tmp_path) as running:
        yield running


async def cli(cluster: DevCluster, *args: str) -> tuple[int, str, str]:
    """`verdant-trio cluster ...` against the dev cluster, from node n1's configuration."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with trio.fail_after(90):
        result = await trio.run_process(
            [sys.executable, "-m", "verdant_trio.service.cli", "cluster", *args,
             "--config", cluster.node("n1")["config"],
             "--haproxy-socket", cluster.info["runtime_socket"]],
            capture_stdout=True, capture_stderr=True, check=False, env=env,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


class Writer:
    """A replica that floods a library through the front and reconnects at once when its
    socket closes or its upgrade is refused; it records when acknowledgements came."""

    def __init__(self, front: str, token: str, oid: str) -> None:
        self.replica = Replica("mover-r1", "wendy")
        self.front, self.token, self.oid = front, token, oid
        self.ack_times: list[float] = []
        self.closes: list[int | None] = []
        self.refused = 0
        self.sequence = 0

    async def run(self, stop: trio.Event) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._observe)
            await self._write(stop)
            nursery.cancel_scope.cancel()

    async def _observe(self) -> None:
        seen = 0
        while True:
            await self.replica.changed.wait()
            if len(self.replica.acked) > seen:
                seen = len(self.replica.acked)
                self.ack_times.append(trio.current_time())

    async def _write(self, stop: trio.Event) -> None:
        replica = self.replica
        initialized = False
        while not stop.is_set():
            try:
                async with connect(f"{self.front}/verdant", self.token) as client:
                    await replica.sync(client)
                    if not initialized:
                        await client.send(replica.op_message([initialize(replica, self.oid)]))
                        initialized = True
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(replica.pump, client)
                        while not stop.is_set():
                            if len(replica.pending) >= 8:
                                with trio.move_on_after(0.5):
                                    await replica.changed.wait()
                                continue
                            await client.send(replica.op_message(
                                [set_property(replica, self.oid, f"p{self.sequence}", self.sequence)]
                            ))
                            self.sequence += 1
                            await trio.sleep(0.005)
                        nursery.cancel_scope.cancel()
            except* Closed as group:
                self.closes.extend(e.code for e in group.exceptions if isinstance(e, Closed))
            except* HandshakeError:
                self.refused += 1  # a held 503 while the slot moves
            except* (OSError, trio.BrokenResourceError):
                pass

    def longest_gap_s(self, start: float, end: float) -> float:
        """The longest time without an acknowledgement between `start` and `end`."""
        times = [t for t in self.ack_times if start <= t <= end]
        edges = [start, *times, end]
        return max(b - a for a, b in itertools.pairwise(edges))


def stored_properties(shard: Path) -> set[str]:
    """Every property a `set` stored in a shard (history or baselines), read while it runs."""
    connection = apsw.Connection(str(shard), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        names = {
            orjson.loads(data)["name"]
            for (data,) in connection.execute('SELECT data FROM "OperationHistory"')
            if orjson.loads(data).get("op") == "set"
        }
        for (snapshot,) in connection.execute('SELECT snapshot FROM "DocumentBaseline"'):
            if snapshot:
                names.update(orjson.loads(snapshot))
    finally:
        connection.close()
    return names


def stored_items(shard: Path) -> set[str]:
    """The ids of the `items` documents a real client's operations created in a shard."""
    connection = apsw.Connection(str(shard), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        oids = {oid for (oid,) in connection.execute('SELECT oid FROM "OperationHistory"')}
        oids |= {oid for (oid,) in connection.execute('SELECT oid FROM "DocumentBaseline"')}
    finally:
        connection.close()
    return {oid.split("/", 1)[1].split(":", 1)[0] for oid in oids if oid.startswith("items/")}


async def test_moving_a_slot_while_clients_write_loses_nothing_and_they_follow_it(
    cluster: DevCluster, interop_log_dir: Path
) -> None:
    library = cluster.library_on("n1", prefix="moving")
    bystander_lib = cluster.library_on("n1", prefix="staying")
    assert slot_of(library) != slot_of(bystander_lib)
    # tokens minted before the move; the real clients cache theirs forever
    alice, bob, stay = await gather(
        lambda: NodeClient.open(name="alice", log_dir=interop_log_dir, auth_endpoint=cluster.auth(library, "alice")),
        lambda: NodeClient.open(name="bob", log_dir=interop_log_dir, auth_endpoint=cluster.auth(library, "bob")),
        lambda: NodeClient.open(name="stay", log_dir=interop_log_dir, auth_endpoint=cluster.auth(bystander_lib, "sam")),
    )
    async with httpx.AsyncClient(timeout=10) as http:
        token = (await http.get(cluster.auth(library, "wendy"))).json()["accessToken"]
    writer = Writer(cluster.front, token, "items/ledger")
    written: dict[str, list[str]] = {"alice": [], "bob": []}

    async def keep_putting(client: NodeClient, stop: trio.Event) -> None:
        while not stop.is_set():
            item = f"{client.name}-{len(written[client.name])}"
            await client.put("items", {"id": item, "content": client.name, "tags": []})
            written[client.name].append(item)
            await trio.sleep(0.05)

    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run, stop)
        nursery.start_soon(keep_putting, alice, stop)
        nursery.start_soon(keep_putting, bob, stop)
        with trio.fail_after(20):
            while len(writer.replica.acked) < 100:
                await writer.replica.changed.wait()
        started = trio.current_time()
        code, out, err = await cli(cluster, "move", "--library", library, "--to", "n3", "--json")
        assert code == 0, f"{out}\n{err}"
        with trio.fail_after(20):  # keep writing until the new owner has acknowledged plenty
            acked_at_move = len(writer.replica.acked)
            while len(writer.replica.acked) < acked_at_move + 100:
                await writer.replica.changed.wait()
        finished = trio.current_time()
        stop.set()
    [report] = json.loads(out)
    assert report["ok"] and (report["source"], report["target"]) == ("n1", "n3"), report
    gap_s = writer.longest_gap_s(started, finished)
    print(
        f"\nmove of slot {slot_of(library)} n1 -> n3 while writing: unavailable "
        f"{report['unavailable_s']:.3f} s (fence to served, as the command measured it; "
        f"release {report['timings']['release_s']:.3f} s, copy {report['timings']['copy_s']:.3f} s, "
        f"commit {report['timings']['commit_s']:.3f} s); the writer's longest wait between two "
        f"acknowledgements {gap_s:.3f} s; its socket closed with {sorted(set(writer.closes))}, "
        f"{writer.refused} upgrades refused meanwhile; {len(writer.replica.acked)} operations "
        f"acknowledged, {report['totals']['size_bytes']} bytes moved"
    )
    assert report["unavailable_s"] < 5
    assert 1012 in writer.closes

    # the writer offers what it never had acknowledged, through the front, to the new owner
    async with connect(f"{cluster.front}/verdant", token) as client:
        await writer.replica.sync(client)
    assert not writer.replica.pending
    shard = Path(cluster.node("n3")["databases"]) / cluster.shard_name(library)
    acked = {op["data"]["name"] for op in writer.replica.acked if op["data"]["op"] == "set"}
    lost = acked - stored_properties(shard)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged operations are not on n3"
    assert cluster.shard_name(library) not in cluster.shards("n1") | cluster.shards("n2")

    # the real clients followed the slot by themselves; a client that joins now sees it all
    await alice.put("items", {"id": "after-the-move", "content": "alice", "tags": []})
    carol = await NodeClient.open(name="carol", log_dir=interop_log_dir, auth_endpoint=cluster.auth(library, "carol"))
    docs = await converged([alice, bob, carol], "items", timeout=30)
    everything = {*written["alice"], *written["bob"], "after-the-move"}
    assert {d["id"] for d in docs} == everything
    assert (await alice.status())["isConnected"] and (await bob.status())["isConnected"]
    with trio.fail_after(10):  # what alice wrote after the move is on the new owner
        while "after-the-move" not in stored_items(shard):
            await trio.sleep(0.05)
    assert everything <= stored_items(shard)
    # the other slot's client never noticed
    await stay.put("items", {"id": "unmoved", "content": "sam", "tags": []})
    assert [d["id"] for d in await converged([stay], "items")] == ["unmoved"]
    assert (await stay.status())["isConnected"]

    code, out, err = await cli(cluster, "status")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[1:4]] == [["n1", "v2"], ["n2", "v2"], ["n3", "v2"]], out
    assert "HAProxy's map: table v2" in out, out
    for client in (alice, bob, carol, stay):
        await client.aclose()
