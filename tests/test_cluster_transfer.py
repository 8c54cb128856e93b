"""Moving slots between real nodes in one process (three `Server`s, their internal listeners,
the orchestration of `cluster move`), without HAProxy: what the nodes do.

- a move while a replica writes: its socket is closed with 1012, every operation the old owner
  acknowledged and every file is on the new owner, which serves them; the old owner refuses
  the library and holds no copy; a library of another slot keeps its socket;
- a copy that does not match its source is refused by the target, the move is undone, the
  source serves again with everything, and nothing is left on the target;
- the internal listener answers only with the cluster secret, and only on its own port;
- a lease ends a move whose orchestrator went away: the source serves again and refuses the
  late commit; a target drops what it had received;
- a rebalance onto a node that owned nothing moves the libraries of its new slots to it.

With HAProxy and real `@verdant-web/store` clients: `interop/test_cluster_move.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from verdant_trio.client import Closed, connect
from verdant_trio.service.cluster import copies
from verdant_trio.service.cluster.move import move_slots, rebalance_slots
from verdant_trio.service.cluster.peer import Peer, PeerError, open_peers
from verdant_trio.service.cluster.placement import (
    Placement,
    format_slots,
    generate,
    rebalance,
    render,
    slot_of,
)
from verdant_trio.service.cluster.tablefile import read_placement, write_placement
from verdant_trio.service.config import load_config
from verdant_trio.service.daemon import Server
from verdant_trio.storage.names import encode_id
from verdant_trio.sync.tokens import TokenProvider

from .interop.harness import free_port
from .replicas import Replica, initialize, set_property

SECRET = "transfer-token-secret-0123456789abcdef"
CLUSTER_SECRET = "transfer-cluster-secret-0123456789"


@dataclass
class Node:
    name: str
    server: Server
    url: str
    internal_url: str
    directory: Path

    def token(self, library: str, user: str = "alice") -> str:
        return TokenProvider(SECRET).get_token(library, user, self.url + "/verdant")

    def shard(self, library: str) -> Path:
        return self.directory / "dbs" / f"{encode_id(library, 'library id')}.sqlite"

    def files(self, library: str) -> Path:
        return self.directory / "files" / encode_id(library, "library id")

    @property
    def table(self) -> Placement:
        return read_placement(self.directory / "placement.map")


@contextlib.asynccontextmanager
async def running_nodes(
    tmp_path: Path, table: Placement, names: tuple[str, ...] = ("n1", "n2", "n3"),
    *, lease_s: float = 30.0,
) -> AsyncIterator[dict[str, Node]]:
    ports = {name: (free_port(), free_port()) for name in names}
    async with trio.open_nursery() as nursery:
        shutdown = trio.Event()
        nodes = {}
        for name in names:
            directory = tmp_path / name
            directory.mkdir()
            write_placement(directory / "placement.map", table)
            peers = ", ".join(f'{other} = "http://127.0.0.1:{ports[other][1]}"'
                              for other in names if other != name)
            (directory / "node.toml").write_text("\n".join([
                "[server]", f"port = {ports[name][0]}",
                "[auth]", f'token_secret = "{SECRET}"',
                "[storage]", f'databases_dir = "{directory / "dbs"}"',
                "[files]", f'root = "{directory / "files"}"',
                "[cluster]", f'node_id = "{name}"',
                f'placement_file = "{directory / "placement.map"}"',
                f'secret = "{CLUSTER_SECRET}"', f"internal_port = {ports[name][1]}",
                f"peers = {{ {peers} }}", "refusal_delay_s = 0.1", f"move_timeout_s = {lease_s}",
            ]) + "\n")
            server = Server(load_config(directory / "node.toml").settings)
            await nursery.start(partial(server.serve, shutdown=shutdown))
            nodes[name] = Node(name, server, f"http://127.0.0.1:{ports[name][0]}",
                               f"http://127.0.0.1:{ports[name][1]}", directory)
        try:
            yield nodes
        finally:
            shutdown.set()


@contextlib.asynccontextmanager
async def apis(nodes: dict[str, Node]) -> AsyncIterator[dict[str, Peer]]:
    async with open_peers({n.name: n.internal_url for n in nodes.values()}, CLUSTER_SECRET) as peers:
        yield peers


def library_on(table: Placement, node: str, prefix: str = "lib") -> str:
    return next(f"{prefix}-{i}" for i in range(100_000) if table.owner_of(f"{prefix}-{i}") == node)


async def fresh_properties(node: Node, library: str, oid: str) -> set[str]:
    """What a new replica syncing with `node` learns of an object."""
    reader = Replica(f"reader-{trio.current_time():.6f}"[-20:], "rita")
    async with connect(node.url + "/verdant", node.token(library, "rita")) as client:
        await reader.sync(client)
    return set(reader.state.get(oid, {}))


async def test_a_move_brings_every_acknowledged_operation_and_file_to_the_new_owner(
    tmp_path: Path,
) -> None:
    table = generate(["n1", "n2", "n3"])
    library, bystander = library_on(table, "n1"), library_on(table, "n1", "other")
    assert slot_of(library) != slot_of(bystander)
    oid = "items/ledger"
    with trio.fail_after(60):
        async with running_nodes(tmp_path, table) as nodes, apis(nodes) as peers:
            n1, n2 = nodes["n1"], nodes["n2"]
            async with httpx.AsyncClient(base_url=n1.url) as http:
                upload = await http.post(
                    "/verdant/files/f1", files={"file": ("notes.txt", b"moved bytes" * 500, "text/plain")},
                    headers={"Authorization": f"Bearer {n1.token(library)}"},
                )
                assert upload.status_code == 200, upload.text
            writer = Replica("writer-r1", "wendy")
            closed: list[int | None] = []
            enough = trio.Event()

            async def write() -> None:
                try:
                    async with connect(n1.url + "/verdant", n1.token(library, "wendy")) as client:
                        await writer.sync(client)
                        await client.send(writer.op_message([initialize(writer, oid)]))
                        async with trio.open_nursery() as inner:
                            inner.start_soon(writer.pump, client)
                            sequence = 0
                            while True:
                                if len(writer.acked) >= 50:
                                    enough.set()
                                if len(writer.pending) >= 8:
                                    await writer.changed.wait()
                                    continue
                                await client.send(writer.op_message(
                                    [set_property(writer, oid, f"p{sequence}", sequence)]
                                ))
                                sequence += 1
                                await trio.sleep(0.002)
                except* Closed as group:
                    closed.extend(exc.code for exc in group.exceptions if isinstance(exc, Closed))

            async with connect(n1.url + "/verdant", n1.token(bystander)) as other:
                await other.sync("bystander-r")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write)
                    await enough.wait()
                    reports = await move_slots(peers, None, {slot_of(library)}, "n2")
                assert closed and set(closed) == {1012}, closed  # the fence closed the socket
                # the other slot's socket stayed open through the move
                await other.send({"type": "heartbeat", "replicaId": "bystander-r"})
                await other.wait_for("heartbeat-response")

            [report] = reports
            assert report.ok, report.summary()
            print(f"\nmove while writing: {report.summary()}")
            assert report.totals["libraries"] == 1 and report.totals["files"] == 1
            acked = {op["data"]["name"] for op in writer.acked if op["data"]["op"] == "set"}
            assert len(acked) >= 50
            assert acked <= await fresh_properties(n2, library, oid)
            # the writer comes back (to the new owner) with what was never acknowledged
            async with connect(n2.url + "/verdant", n2.token(library, "wendy")) as client:
                await writer.sync(client)
            assert not writer.pending
            every = {op["data"]["name"] for op in writer.acked if op["data"]["op"] == "set"}
            assert every <= await fresh_properties(n2, library, oid)

            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {n2.token(library)}"}) as http:
                info = (await http.get(f"{n2.url}/verdant/files/f1")).json()
                assert info["url"].startswith(f"{n2.url}/files/{slot_of(library)}/"), info
                assert (await http.get(info["url"])).content == b"moved bytes" * 500
                refused = await http.get(f"{n1.url}/verdant/files/f1",
                                         headers={"Authorization": f"Bearer {n1.token(library)}"})
                assert (refused.status_code, refused.json()["code"]) == (503, 5030)
            assert not n1.shard(library).exists() and not n1.files(library).exists()
            assert n2.shard(library).exists() and n2.files(library).exists()
            assert {node.table.version for node in nodes.values()} == {2}
            status = await peers["n1"].call("GET", "/cluster/status")
            assert (status["move"], status["fenced"], status["stray_shards"]) == (None, "", 0)


async def test_a_copy_that_does_not_match_is_refused_and_the_move_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = generate(["n1", "n2", "n3"])
    library = library_on(table, "n1")
    writer = Replica("writer-r2", "wendy")
    oid = "items/1"

    real_write = copies.Sink.write

    def corrupting(self: copies.Sink, chunk: bytes) -> None:  # a byte flipped on the way
        if self.size_bytes == 0 and self.path.name.endswith(".sqlite"):
            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        real_write(self, chunk)

    with trio.fail_after(60):
        async with running_nodes(tmp_path, table) as nodes, apis(nodes) as peers:
            n1, n2 = nodes["n1"], nodes["n2"]
            closed: list[int | None] = []
            async with connect(n1.url + "/verdant", n1.token(library, "wendy")) as client:
                await writer.sync(client)
                async with trio.open_nursery() as nursery:

                    async def pump() -> None:
                        try:
                            await writer.pump(client)
                        except Closed as exc:
                            closed.append(exc.code)

                    nursery.start_soon(pump)
                    await client.send(writer.op_message([initialize(writer, oid)]))
                    await client.send(writer.op_message([set_property(writer, oid, "kept", 1)]))
                    while writer.pending:
                        await writer.changed.wait()
                    monkeypatch.setattr(copies.Sink, "write", corrupting)
                    reports = await move_slots(peers, None, {slot_of(library)}, "n2")
            monkeypatch.undo()
            assert closed == [1012]
            [report] = reports
            assert report.undone and not report.committed, report.summary()
            assert "does not match" in (report.error or "") and "sha256" in (report.error or "")
            print(f"\nundone move: {report.summary()}")
            # the source serves again, with everything; the target kept nothing
            assert await fresh_properties(n1, library, oid) == {"kept"}
            assert not n2.shard(library).exists()
            assert not any(p.name.startswith(copies.INCOMING_PREFIX) for p in (n2.directory / "dbs").iterdir())
            assert {node.table.version for node in nodes.values()} == {1}
            for name in nodes:
                status = await peers[name].call("GET", "/cluster/status")
                assert (status["move"], status["fenced"]) == (None, ""), status


async def test_the_internal_listener_wants_the_cluster_secret_and_is_not_the_public_port(
    tmp_path: Path,
) -> None:
    table = generate(["n1", "n2"])
    with trio.fail_after(30):
        async with running_nodes(tmp_path, table, ("n1", "n2")) as nodes:
            n1 = nodes["n1"]
            async with httpx.AsyncClient() as http:
                for headers in ({}, {"Authorization": "Bearer wrong"},
                                {"Authorization": f"Basic {CLUSTER_SECRET}"}):
                    refused = await http.get(f"{n1.internal_url}/cluster/status", headers=headers)
                    assert refused.status_code == 401, refused.text
                    assert CLUSTER_SECRET not in refused.text
                locked = await http.post(
                    f"{n1.internal_url}/cluster/lock", headers={"Authorization": "Bearer nope"},
                    json={"move": "m1", "role": "bystander", "slots": "0", "version": 1},
                )
                assert locked.status_code == 401
                good = {"Authorization": f"Bearer {CLUSTER_SECRET}"}
                status = await http.get(f"{n1.internal_url}/cluster/status", headers=good)
                assert status.status_code == 200 and status.json()["move"] is None
                public = await http.get(f"{n1.url}/cluster/status", headers=good)
                assert public.status_code == 404
                bad = await http.post(f"{n1.internal_url}/cluster/lock", headers=good,
                                      json={"move": "../x", "role": "source", "slots": "0", "version": 1})
                assert bad.status_code == 400


async def test_a_lease_ends_a_move_whose_orchestrator_went_away(tmp_path: Path) -> None:
    table = generate(["n1", "n2"])
    library = library_on(table, "n1")
    slot = format_slots([slot_of(library)])
    moved = render(table.moved([slot_of(library)], "n2"))
    with trio.fail_after(60):
        async with running_nodes(tmp_path, table, ("n1", "n2"), lease_s=1.5) as nodes, \
                apis(nodes) as peers:
            n1, n2 = nodes["n1"], nodes["n2"]
            async with connect(n1.url + "/verdant", n1.token(library)) as client:
                assert (await client.sync("r1"))["type"] == "sync-resp"
            base = {"slots": slot, "version": 1}
            await peers["n1"].call("POST", "/cluster/lock", {**base, "move": "m1", "role": "source", "peer": "n2"})
            await peers["n2"].call("POST", "/cluster/lock", {**base, "move": "m1", "role": "target", "peer": "n1"})
            released = await peers["n1"].call("POST", "/cluster/release", {"move": "m1"})
            assert released["fenced"] and released["totals"]["shards"] == 1
            await peers["n2"].call("POST", "/cluster/receive", {"move": "m1"})
            assert n2.shard(library).exists()
            with pytest.raises(PeerError) as other:  # one move at a time
                await peers["n1"].call("POST", "/cluster/lock", {**base, "move": "m2", "role": "bystander"})
            assert other.value.status == 409 and "locked by move m1" in other.value.message
            # ... and then nobody comes back: both leases run out
            for name in ("n1", "n2"):
                while (await peers[name].call("GET", "/cluster/status"))["move"] is not None:
                    await trio.sleep(0.05)
            async with connect(n1.url + "/verdant", n1.token(library)) as client:
                assert (await client.sync("r1"))["type"] == "sync-resp"  # served again
            assert not n2.shard(library).exists()  # the target dropped what it had received
            with pytest.raises(PeerError) as late:
                await peers["n1"].call("POST", "/cluster/placement", {"move": "m1", "table": moved})
            assert late.value.status == 409
            assert n1.table.version == 1


async def test_a_rebalance_onto_a_new_node_moves_its_new_slots_libraries_to_it(tmp_path: Path) -> None:
    table = generate(["n1", "n2"])  # n3 runs, owns nothing yet
    libraries = [f"spread-{i}" for i in range(12)]
    with trio.fail_after(90):
        async with running_nodes(tmp_path, table) as nodes, apis(nodes) as peers:
            for library in libraries:
                owner = nodes[table.owner_of(library)]
                async with connect(owner.url + "/verdant", owner.token(library)) as client:
                    assert (await client.sync("r1"))["type"] == "sync-resp"
            reports = await rebalance_slots(peers, None, ["n1", "n2", "n3"], max_slots=400)
            assert reports and all(report.ok for report in reports), [r.summary() for r in reports]
            final = nodes["n1"].table
            assert final.owners == rebalance(table, ["n1", "n2", "n3"]).owners
            assert {node.table.version for node in nodes.values()} == {1 + len(reports)}
            for library in libraries:
                owner = final.owner_of(library)
                holders = [name for name, node in nodes.items() if node.shard(library).exists()]
                assert holders == [owner], (library, holders)
            assert any(final.owner_of(library) == "n3" for library in libraries)
