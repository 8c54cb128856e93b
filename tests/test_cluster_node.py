"""A cluster node: the `[cluster]` section wires the placement table to the engine's fence.

A node serves only its slots' libraries and refuses the others as `@verdant-web/store` can
recover from (503, 5030, `Retry-After`, the websocket held before its refusal), before any shard
exists; a re-read table (`Server.reload`, and SIGHUP in the daemon) releases the slots lost
(sockets closed with 1012, shards closed) and serves the slots gained.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from verdant_trio.client import connect, timestamp
from verdant_trio.service.cluster.node import ClusterNode, PlacementRefused
from verdant_trio.service.cluster.placement import SLOT_COUNT, Placement, generate, slot_of
from verdant_trio.service.cluster.tablefile import write_placement
from verdant_trio.service.config import LoadedConfig, load_config
from verdant_trio.service.daemon import Server
from verdant_trio.storage.names import encode_id
from verdant_trio.sync.tokens import TokenProvider

from .interop.harness import free_port

SECRET = "cluster-node-secret-0123456789abcdef"
REFUSAL_DELAY_S = 0.3


def library_of(placement: Placement, node: str, skip: int = 0) -> str:
    """A library id whose slot `node` owns (the `skip`-th one found)."""
    found = (f"lib-{i}" for i in range(100_000) if placement.owner_of(f"lib-{i}") == node)
    for _ in range(skip):
        next(found)
    return next(found)


# -- the node's view of the table, without I/O ------------------------------------------------


def test_a_node_serves_its_slots_and_changes_with_a_newer_table() -> None:
    table = generate(["n1", "n2"])
    node = ClusterNode("n1", table)
    ours, theirs = library_of(table, "n1"), library_of(table, "n2")
    assert (node.owns(ours), node.owns(theirs), node.slots_owned) == (True, False, SLOT_COUNT // 2)
    moved = table.moved([slot_of(ours)], "n2")
    node.update(moved)
    assert not node.owns(ours) and node.slots_owned == SLOT_COUNT // 2 - 1
    node.update(moved)  # the same table again: nothing
    with pytest.raises(PlacementRefused, match="older"):
        node.update(table)
    with pytest.raises(PlacementRefused, match="other contents"):
        node.update(Placement(moved.version, table.owners))
    assert node.placement is moved
    back = moved.moved([slot_of(ours)], "n1")
    node.update(back)
    assert node.owns(ours)
    node.fence([slot_of(ours)])
    assert not node.owns(ours) and node.placement is back
    node.unfence([slot_of(ours)])
    assert node.owns(ours)


def test_a_node_says_when_slots_become_served() -> None:
    """`on_change` (wired to the core's `ownership_changed`, which ends held refusals) is called
    by a newer table and by a fence lifted, not by a fence raised or the same table again."""
    table = generate(["n1", "n2"])
    node = ClusterNode("n1", table)
    calls: list[str] = []
    node.on_change = lambda: calls.append("changed")
    node.fence([0])
    assert calls == []
    node.unfence([0])
    moved = table.moved([0], "n2")
    node.update(moved)
    node.update(moved)
    assert calls == ["changed", "changed"]


# -- a node in process ------------------------------------------------------------------------


def write_node_config(
    directory: Path, node: str, placement_path: Path, port: int, **cluster: Any
) -> Path:
    lines = [
        "[server]", f"port = {port}",
        "[auth]", f'token_secret = "{SECRET}"',
        "[storage]", f'databases_dir = "{directory / "dbs"}"',
        "[files]", f'root = "{directory / "files"}"', 'public_url = "http://front.example"',
        "[cluster]", f'node_id = "{node}"', f'placement_file = "{placement_path}"',
        f"refusal_delay_s = {REFUSAL_DELAY_S}",
        *(f"{key} = {value}" for key, value in cluster.items()),
    ]  # fmt: skip
    path = directory / f"{node}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Node:
    server: Server
    url: str
    config_path: Path
    placement_path: Path
    loaded: LoadedConfig
    directory: Path

    def token(self, library: str, user: str = "alice") -> str:
        return TokenProvider(SECRET).get_token(library, user, self.url + "/verdant")

    def shard(self, library: str) -> Path:
        return self.directory / "dbs" / f"{encode_id(library, 'library id')}.sqlite"

    def reload(self, placement: Placement) -> None:
        """What SIGHUP does, in process: the file re-read, the settings applied."""
        write_placement(self.placement_path, placement)
        new = load_config(self.config_path)
        self.server.reload(new, self.loaded)
        self.loaded = new

    async def metrics(self) -> str:
        async with httpx.AsyncClient(base_url=self.url) as http:
            return (await http.get("/metrics")).text


@contextlib.asynccontextmanager
async def node_server(tmp_path: Path, placement: Placement, node: str = "n1") -> AsyncIterator[Node]:
    placement_path = tmp_path / "placement.map"
    write_placement(placement_path, placement)
    config_path = write_node_config(tmp_path, node, placement_path, free_port())
    loaded = load_config(config_path)
    server = Server(loaded.settings)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(server.serve, shutdown=shutdown))
        url = f"http://127.0.0.1:{binds[0].rsplit(':', 1)[1]}"
        try:
            yield Node(server, url, config_path, placement_path, loaded, tmp_path)
        finally:
            shutdown.set()


async def raw_upgrade(url: str, token: str) -> tuple[bytes, float]:
    """An upgrade request as a browser sends it; the raw answer and how long it took."""
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"GET /verdant HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Protocol: Bearer, {token}\r\n\r\n"
    ).encode()
    started = trio.current_time()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(request)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    return answer, trio.current_time() - started


def initialize(oid: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"oid": oid, "timestamp": timestamp(), "data": {"op": "initialize", "value": value}}


async def test_a_node_refuses_another_nodes_library_before_any_shard_exists(tmp_path: Path) -> None:
    table = generate(["n1", "n2"])
    ours, theirs = library_of(table, "n1"), library_of(table, "n2")
    with trio.fail_after(30):
        async with node_server(tmp_path, table) as node:
            async with connect(node.url + "/verdant", node.token(ours)) as client:
                assert (await client.sync("r1"))["type"] == "sync-resp"

            answer, waited_s = await raw_upgrade(node.url, node.token(theirs))
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503 "), answer
            assert b"\r\nretry-after: 1" in head.lower()
            assert b'"code":5030' in body
            assert waited_s >= REFUSAL_DELAY_S * 0.9, f"refused after {waited_s:.3f} s, not held"

            headers = {"Authorization": f"Bearer {node.token(theirs)}"}
            library, file = encode_id(theirs, "library id"), "f1"
            async with httpx.AsyncClient(base_url=node.url, headers=headers) as http:
                pushed = await http.post("/verdant", json={"messages": [
                    {"type": "heartbeat", "replicaId": "r1", "timestamp": timestamp()}
                ]})
                info = await http.get("/verdant/files/f1")
                upload = await http.post(
                    "/verdant/files/f1", files={"file": ("a.txt", b"x" * 1000, "text/plain")}
                )
                download = await http.get(f"/files/{slot_of(theirs)}/{library}/{file}/a.txt")
                unslotted = await http.get(f"/files/{library}/{file}/a.txt")
                wrong_slot = await http.get(f"/files/{(slot_of(theirs) + 1) % SLOT_COUNT}/{library}/{file}/a.txt")
                admin = await http.get(f"/admin/libraries/{theirs}")
            for response in (pushed, info, upload, download):
                assert (response.status_code, response.json()["code"]) == (503, 5030), response
                assert response.headers["retry-after"] == "1"
            assert unslotted.status_code == 307
            assert unslotted.headers["location"] == f"/files/{slot_of(theirs)}/{library}/{file}/a.txt"
            assert wrong_slot.status_code == 404
            assert admin.status_code == 404  # no admin token here: the admin API is off

            metrics = await node.metrics()
            assert 'verdant_cluster_node_info{node="n1"} 1.0' in metrics
            assert f"verdant_cluster_slots_owned {float(SLOT_COUNT // 2)}" in metrics
            assert 'verdant_cluster_refusals_total{transport="websocket"} 1.0' in metrics
            assert 'verdant_cluster_refusals_total{transport="http"} 4.0' in metrics
            assert theirs not in metrics and ours not in metrics  # no library id in a label
    assert node.shard(ours).exists()
    assert not node.shard(theirs).exists()
    assert not (tmp_path / "files" / encode_id(theirs, "library id")).exists()


async def test_a_new_table_releases_the_slots_lost_and_serves_the_slots_gained(
    tmp_path: Path,
) -> None:
    table = generate(["n1", "n2"])
    moving, staying = library_of(table, "n1"), library_of(table, "n1", skip=1)
    coming = library_of(table, "n2")
    with trio.fail_after(30):
        async with node_server(tmp_path, table) as node:
            assert node.server.cluster is not None
            async with (
                connect(node.url + "/verdant", node.token(moving)) as client,
                connect(node.url + "/verdant", node.token(staying)) as bystander,
            ):
                await client.sync("r1")
                await bystander.sync("r2")
                await client.op("r1", [initialize("items/1", {"n": 1})])
                await client.wait_for("server-ack")

                v2 = table.moved([slot_of(moving)], "n2").moved([slot_of(coming)], "n1")
                node.reload(v2)
                assert await client.wait_closed() == 1012
                await node.server.cluster.wait_released()
                wal = Path(f"{node.shard(moving)}-wal")
                assert not wal.exists() or wal.stat().st_size == 0  # checkpointed and closed
                await bystander.send({"type": "heartbeat", "replicaId": "r2"})
                await bystander.wait_for("heartbeat-response")  # other slots untouched

            answer, _ = await raw_upgrade(node.url, node.token(moving))
            assert answer.startswith(b"HTTP/1.1 503 ")
            async with connect(node.url + "/verdant", node.token(coming)) as gained:
                assert (await gained.sync("r3"))["type"] == "sync-resp"
            metrics = await node.metrics()
            assert f"verdant_cluster_placement_version {float(v2.version)}" in metrics
            assert "verdant_cluster_libraries_released 1.0" in metrics

            node.reload(v2.moved([slot_of(moving)], "n1"))  # and back: served, data intact
            async with connect(node.url + "/verdant", node.token(moving)) as again:
                response = await again.sync("r4")
            assert [op["data"]["value"] for op in response["operations"]] == [{"n": 1}]


async def test_sighup_re_reads_the_placement_table(tmp_path: Path) -> None:
    """The daemon: a new table on disk and SIGHUP; the slot lost is released, then refused.
    A broken table is refused and the running one stays."""
    table = generate(["n1", "n2"])
    library = library_of(table, "n1")
    placement_path = tmp_path / "placement.map"
    write_placement(placement_path, table)
    port = free_port()
    config = write_node_config(tmp_path, "n1", placement_path, port)
    url = f"http://127.0.0.1:{port}"
    token = TokenProvider(SECRET).get_token(library, "alice", url + "/verdant")
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log, trio.fail_after(40):
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "verdant_trio.service.cli", "serve", "--config", str(config)],
            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            await wait_until_ready(url, process, log_path)
            async with connect(url + "/verdant", token) as client:
                await client.sync("r1")
                placement_path.write_text("#! verdant-trio placement format=1 slots=4096 version=9\n")
                process.send_signal(signal.SIGHUP)
                await wait_for_log(log_path, "reload failed")
                await client.send({"type": "heartbeat", "replicaId": "r1"})
                await client.wait_for("heartbeat-response")  # still served
                write_placement(placement_path, table.moved([slot_of(library)], "n2"))
                process.send_signal(signal.SIGHUP)
                assert await client.wait_closed() == 1012
            await wait_for_log(log_path, "slots released")
            answer, _ = await raw_upgrade(url, token)
            assert answer.startswith(b"HTTP/1.1 503 ")
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    text = log_path.read_text()
    assert "[cluster] placement_file:" in text and "2048 slots have no node" not in text
    assert "4096 slots have no node" in text


async def wait_until_ready(url: str, process: trio.Process, log_path: Path) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=2) as http:
        while True:
            assert process.returncode is None, log_path.read_text()
            try:
                if (await http.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.05)


async def wait_for_log(log_path: Path, text: str) -> None:
    while text not in log_path.read_text():
        await trio.sleep(0.05)
