"""A cluster as users run it: `verdant-trio cluster-dev` (3 nodes, Debian's HAProxy) and real
`@verdant-web/store` 3.6.3 clients that only know the front's URL.

- clients of one library converge through the front, files included, and only the library's
  owner holds its shard;
- clients of 50 libraries converge, the libraries spread over every node, and each node's
  databases directory holds exactly the shards of its own slots;
- a node asked directly for another node's library refuses it as documented (503, 5030, held
  before the refusal) and never creates its shard, and a real client sent there retries at
  the pace of the hold, not in a tight loop;
- SIGKILL a node: its libraries are refused through the front, the others keep working; start
  it again: every operation it had acknowledged is there, and its clients catch up.

Without haproxy or node these tests fail (never skip).
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any

import apsw
import httpx
import orjson
import pytest
import trio

from verdant_trio.client import Closed, connect
from verdant_trio.service.cluster.placement import slot_of

from ..cluster_front import haproxy_binary
from ..replicas import Replica, initialize, set_property
from .devcluster import DevCluster, dev_cluster, run_pool
from .harness import NodeClient, converged, gather

pytestmark = pytest.mark.interop


@pytest.fixture
async def cluster(tmp_path: Path) -> Any:
    haproxy_binary()  # fails, naming the install command, where haproxy is missing
    async with dev_cluster(tmp_path) as running:
        yield running


async def open_client(cluster: DevCluster, log_dir: Path, name: str, library: str, **kw: Any) -> NodeClient:
    return await NodeClient.open(
        name=name, log_dir=log_dir, auth_endpoint=cluster.auth(library, name), **kw
    )


async def test_haproxy_runs_under_batch_scheduling_and_the_nodes_do_not(cluster: DevCluster) -> None:
    """What `systemd/haproxy.service.d` does in production: HAProxy, sharing the cores with the
    nodes, does not preempt a busy node for each message (see `dev.batch_scheduling`)."""
    haproxy = int(cluster.info["haproxy_pid"])
    threads = [int(t) for t in os.listdir(f"/proc/{haproxy}/task")]
    assert {os.sched_getscheduler(t) for t in threads} == {os.SCHED_BATCH}
    for name in cluster.names:
        assert os.sched_getscheduler(int(cluster.node(name)["pid"])) == os.SCHED_OTHER


async def test_real_clients_of_one_library_converge_through_the_front(
    cluster: DevCluster, interop_log_dir: Path
) -> None:
    library = "one-library-through-the-front"
    owner = cluster.owner(library)
    alice, bob, carol = await gather(
        *(lambda n=n: open_client(cluster, interop_log_dir, n, library) for n in ("alice", "bob", "carol"))
    )
    for i, client in enumerate((alice, bob, carol)):
        await client.put("items", {"id": f"item-{i}", "content": client.name, "tags": []})
    docs = await converged([alice, bob, carol], "items", timeout=20)
    assert [d["content"] for d in docs] == ["alice", "bob", "carol"]
    # a file: uploaded through the front, its URL names the front and the slot, bob gets it
    payload = bytes(range(256)) * 40
    await alice.attach_file("items", "item-0", "image", payload, name="pic.png", type="image/png")
    info = await bob.wait_until(lambda: _file_ready(bob, "items", "item-0", "image"), timeout=20)
    assert info["url"].startswith(f"{cluster.front}/files/{slot_of(library)}/"), info
    assert await bob.file_content("items", "item-0", "image") == payload
    # only the owner holds the library
    shard = cluster.shard_name(library)
    assert [name for name in cluster.names if shard in cluster.shards(name)] == [owner]


async def _file_ready(client: NodeClient, collection: str, doc: str, field: str) -> dict[str, Any] | None:
    info = await client.file_info(collection, doc, field)
    return info if info and info.get("url") and not info.get("loading") else None


async def test_clients_of_50_libraries_converge_and_each_node_holds_only_its_slots(
    cluster: DevCluster, interop_log_dir: Path
) -> None:
    libraries = [f"spread-{i}" for i in range(50)]
    owners = {library: cluster.owner(library) for library in libraries}
    assert set(owners.values()) == set(cluster.names)  # they really spread
    clients = [
        {"name": f"{library}-{user}", "library": library,
         "authEndpoint": cluster.auth(library, user)}
        for library in libraries for user in ("ann", "ben")
    ]  # fmt: skip
    random.Random(13).shuffle(clients)
    expected = {library: [f"{library}-ann", f"{library}-ben"] for library in libraries}
    pools = [clients[i::2] for i in range(2)]  # two Node processes of 50 clients each
    results = await gather(*(
        lambda i=i, pool=pool: run_pool(pool, expected, interop_log_dir / f"pool-{i}.log", timeout_s=60)
        for i, pool in enumerate(pools)
    ))
    lists = {name: items for result in results for name, items in result["lists"].items()}
    for library in libraries:
        assert lists[f"{library}-ann"] == lists[f"{library}-ben"] == expected[library], library
    assert all(result["ok"] and not result["errors"] for result in results), results
    for name in cluster.names:
        mine = {cluster.shard_name(lib) for lib, owner in owners.items() if owner == name}
        assert cluster.shards(name) == mine, name


async def test_a_node_asked_directly_for_another_nodes_library_refuses_it(
    cluster: DevCluster, interop_log_dir: Path
) -> None:
    n1, n2 = cluster.node("n1"), cluster.node("n2")
    library = cluster.library_on("n2", prefix="direct")
    async with httpx.AsyncClient(timeout=10) as http:
        token = (await http.get(cluster.auth(library, "dana"))).json()["accessToken"]
        started = trio.current_time()
        upgrade = await http.get(f"{n1['url']}/verdant", headers={
            "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Protocol": f"Bearer, {token}",
        })
        held_s = trio.current_time() - started
        pushed = await http.post(
            f"{n1['url']}/verdant", json={"messages": []}, headers={"Authorization": f"Bearer {token}"}
        )
        owner = await http.post(
            f"{n2['url']}/verdant", json={"messages": []}, headers={"Authorization": f"Bearer {token}"}
        )
    for response in (upgrade, pushed):
        assert (response.status_code, response.json()["code"]) == (503, 5030), response.text
        assert response.headers["retry-after"] == "1"
    assert held_s >= 0.9, f"the upgrade was refused after {held_s:.2f} s, not held for 1 s"
    assert owner.status_code == 200  # the owner serves it

    # A real client whose token names n1 directly: it never syncs, never makes n1 open the
    # library, and its reconnects are paced by the hold (3.6.3 retries a refusal at once).
    direct = await NodeClient.open(
        name="direct", log_dir=interop_log_dir, auth_endpoint=cluster.auth(library, "eve", n1["url"]),
        wait_for_sync=False,
    )
    before = await _refusals(n1["url"])
    await trio.sleep(4)  # the claim is a rate over this window, not an event to wait for
    refused = await _refusals(n1["url"]) - before
    status = await direct.status()
    await direct.aclose()
    assert not status["isConnected"]
    assert 2 <= refused <= 6, f"{refused} upgrades refused in 4 s"
    assert cluster.shard_name(library) not in cluster.shards("n1")


async def _refusals(url: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics")).text
    line = next(
        (ln for ln in text.splitlines() if ln.startswith('verdant_cluster_refusals_total{transport="websocket"}')),
        None,
    )
    return float(line.split()[-1]) if line else 0.0


async def test_a_killed_node_is_refused_the_others_keep_serving_and_it_loses_nothing(
    cluster: DevCluster, interop_log_dir: Path
) -> None:
    down_lib, up_lib = cluster.library_on("n2", prefix="down"), cluster.library_on("n1", prefix="up")
    writer = Replica("writer-r1", "wendy")
    up_a, up_b, down_a = await gather(
        lambda: open_client(cluster, interop_log_dir, "up-a", up_lib),
        lambda: open_client(cluster, interop_log_dir, "up-b", up_lib),
        lambda: open_client(cluster, interop_log_dir, "down-a", down_lib),
    )
    async with httpx.AsyncClient(timeout=10) as http:
        token = (await http.get(cluster.auth(down_lib, "wendy"))).json()["accessToken"]

    # a replica floods n2's library through the front until n2 is killed under it
    oid = "items/ledger"
    killed = trio.Event()

    async def flood() -> None:
        try:
            async with connect(f"{cluster.front}/verdant", token) as client:
                await writer.sync(client)
                await client.send(writer.op_message([initialize(writer, oid)]))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer.pump, client)
                    sequence = 0
                    while True:
                        if len(writer.pending) >= 8:
                            await writer.changed.wait()
                            continue
                        await client.send(writer.op_message([set_property(writer, oid, f"p{sequence}", sequence)]))
                        sequence += 1
                        await trio.sleep(0.002)
        except* (Closed, OSError, trio.BrokenResourceError):
            assert killed.is_set(), "the flood's connection ended before the kill"

    pid = cluster.node("n2")["pid"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        with trio.fail_after(20):
            while len(writer.acked) < 100:
                await writer.changed.wait()
        killed.set()
        os.kill(pid, signal.SIGKILL)  # mid-flood
    acked = list(writer.acked)
    await cluster.wait_for_state("n2", "DOWN")

    # n2's library: refused through the front (HAProxy's held 503); n1's: served throughout
    async with httpx.AsyncClient(timeout=10) as http:
        started = trio.current_time()
        refused = await http.post(f"{cluster.front}/verdant", json={"messages": []},
                                  headers={"Authorization": f"Bearer {token}"})
        held_s = trio.current_time() - started
    assert (refused.status_code, refused.json()["code"], refused.headers["x-verdant-node"]) == (503, 5030, "n2")
    assert held_s >= 0.9
    await up_a.put("items", {"id": "while-n2-is-down", "content": "served", "tags": []})
    await down_a.put("items", {"id": "offline-edit", "content": "made while n2 was down", "tags": []})
    assert [d["id"] for d in await converged([up_a, up_b], "items", timeout=20)] == ["while-n2-is-down"]

    # the shard as the kill left it: whole, and holding every acknowledged operation
    shard = Path(cluster.node("n2")["databases"]) / cluster.shard_name(down_lib)
    stored = _stored_properties(shard)
    lost = [op for op in acked if op["data"]["op"] == "set" and op["data"]["name"] not in stored]
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged operations lost"

    # start n2 again (as cluster-dev printed): it serves again, nothing lost, its client catches up
    with open(Path(cluster.node("n2")["log"]), "ab") as log:
        cluster.restarted.append(await trio.lowlevel.open_process(
            cluster.node("n2")["command"], stdout=log, stderr=log
        ))
    await cluster.wait_for_state("n2", "UP", timeout_s=30)
    down_b = await open_client(cluster, interop_log_dir, "down-b", down_lib)
    docs = await converged([down_a, down_b], "items", timeout=30)
    assert [d["id"] for d in docs] == ["offline-edit"]
    fresh = Replica("fresh-r2", "fred")
    async with connect(f"{cluster.front}/verdant", token) as client:
        await fresh.sync(client)
    seen = {name for (_, name) in fresh.properties()}
    assert {op["data"]["name"] for op in acked if op["data"]["op"] == "set"} <= seen
    assert cluster.shard_name(down_lib) not in cluster.shards("n1") | cluster.shards("n3")


def _stored_properties(shard: Path) -> set[str]:
    """Every property name a `set` operation stored, in history or folded into a baseline."""
    connection = apsw.Connection(str(shard), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
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
