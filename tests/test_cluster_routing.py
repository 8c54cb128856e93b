"""HAProxy (the real one, Debian's 2.6) routes each request to the node that owns its library.

The claim: for every library id the server accepts, and tokens minted by PyJWT (our
`TokenProvider`, which writes `\\uXXXX` escapes) or by Node's `jsonwebtoken` (Verdant's own
`TokenProvider`, raw UTF-8), the node HAProxy picks under the generated configuration is the
owner that a node computes from the token it verifies, whichever way the token travels
(`Authorization`, the websocket subprotocol, `?token=`). Behind HAProxy are stub nodes that
answer with their name and the library and owner they read from the request.

Without `haproxy` or `node` these tests fail with the command that installs them; they never skip.
"""

from __future__ import annotations

import base64
import contextlib
import random
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
import orjson
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from verdant_trio.service.cluster.haproxy import (
    NODE_HEADER,
    SLOT_HEADER,
    HaproxySettings,
    NodeAddress,
    map_entries,
    render_config,
    replace_map_commands,
)
from verdant_trio.service.cluster.placement import (
    SLOT_COUNT,
    Placement,
    generate,
    render,
    slot_of,
)
from verdant_trio.storage.names import encode_id, is_safe_name
from verdant_trio.sync.tokens import TokenProvider, TokenVerifier

from .cluster_front import (
    Front,
    HttpClient,
    StubNode,
    answering_nodes_config,
    pipelined,
    run_haproxy,
    short_tempdir,
    stub_nodes,
)
from .cluster_ids import SEED, library_ids
from .interop.harness import NODE_DIR, node_binary
from .procserver import free_port

pytestmark = pytest.mark.trio

SECRET = "cluster-routing-secret-0123456789abcdef"
NODES = ("n1", "n2", "n3")

def scattered_placement(seed: int = SEED) -> Placement:
    """Neighbouring slots on different nodes, so a slot computed wrongly lands elsewhere."""
    rng = random.Random(seed)
    return Placement(1, tuple(rng.choice(NODES) for _ in range(SLOT_COUNT)))


def payload(token: str) -> bytes:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


async def jsonwebtoken_tokens(ids: Sequence[str], url: str) -> list[str]:
    node = shutil.which(node_binary())
    assert node, f"`{node_binary()}` (Node.js >= 20) is not on PATH: this test needs it"
    script = NODE_DIR / "mint_tokens.mjs"
    assert (NODE_DIR / "node_modules" / "jsonwebtoken").is_dir(), (
        "jsonwebtoken is not installed: run `npm ci --prefix tests/interop/node`"
    )
    request = orjson.dumps({"secret": SECRET, "url": url, "user": "alice", "ids": list(ids)})
    result = await trio.run_process(
        [node, str(script)], stdin=request, capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    tokens: list[str] = orjson.loads(result.stdout)
    assert len(tokens) == len(ids)
    return tokens


@dataclass
class Cluster:
    front: Front
    nodes: dict[str, StubNode]
    """The stub nodes (empty when HAProxy plays them: `answering`)."""
    placement: Placement
    map_path: Path
    answering: Front | None = None


@contextlib.asynccontextmanager
async def cluster(
    placement: Placement, *, log: bool = True, fast_nodes: bool = False, **stub_options: Any
) -> AsyncIterator[Cluster]:
    """Nodes for `NODES` and HAProxy in front of them with the generated configuration.

    The nodes are `StubNode`s, or with `fast_nodes` a second HAProxy whose ports answer their
    node's name (for the bulk test: tens of thousands of requests in a few seconds).
    """
    directory = short_tempdir()
    try:
        async with contextlib.AsyncExitStack() as stack:
            nodes: dict[str, StubNode] = {}
            answering: Front | None = None
            if fast_nodes:
                ports = {name: free_port() for name in NODES}
                (directory / "nodes").mkdir()
                socket = directory / "nodes" / "haproxy.sock"
                answering = await stack.enter_async_context(run_haproxy(
                    answering_nodes_config(ports, socket), directory / "nodes",
                    ports[NODES[0]], socket,
                ))
            else:
                verifier = TokenVerifier(SECRET)
                nodes = await stack.enter_async_context(
                    stub_nodes(NODES, placement, verifier, **stub_options)
                )
                ports = {name: node.port for name, node in nodes.items()}
            map_path = directory / "placement.map"
            map_path.write_text(render(placement))
            port = free_port()
            settings = HaproxySettings(
                placement_path=map_path,
                bind_port=port,
                stats_port=free_port(),
                runtime_socket=directory / "haproxy.sock",
                check_interval_s=0.2,
                check_fall=1,
                check_rise=1,
                refusal_delay_s=0.5,
                log_target="stderr" if log else None,
            )
            addresses = [NodeAddress(name, "127.0.0.1", ports[name]) for name in NODES]
            config = render_config(placement, addresses, settings)
            front = await stack.enter_async_context(
                run_haproxy(config, directory, port, directory / "haproxy.sock")
            )
            await front.wait_for_states(
                lambda states: all(
                    states.get((f"node_{name}", name), "").startswith("UP") for name in NODES
                )
            )
            yield Cluster(front, nodes, placement, map_path, answering)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


UPGRADE = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
]
TRANSPORTS = ("authorization", "subprotocol", "query")


def sync_request(transport: str, token: str) -> tuple[str, str, list[tuple[str, str]], bytes]:
    """The request a Verdant client makes on `transport` (method, target, headers, body)."""
    if transport == "authorization":
        headers = [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")]
        return "POST", "/verdant", headers, b'{"messages":[]}'
    if transport == "subprotocol":
        return "GET", "/verdant", [*UPGRADE, ("Sec-WebSocket-Protocol", f"Bearer, {token}")], b""
    return "GET", f"/verdant?token={token}", UPGRADE, b""


async def run_requests(
    port: int, requests: Sequence[tuple[str, str, list[tuple[str, str]], bytes]], workers: int = 12
) -> list[Any]:
    """Every request through the front, on `workers` keep-alive connections; replies in order."""
    replies: list[Any] = [None] * len(requests)

    async def worker(first: int) -> None:
        client = HttpClient(port)
        try:
            for index in range(first, len(requests), workers):
                replies[index] = await client.request(*requests[index])
        finally:
            await client.aclose()

    async with trio.open_nursery() as nursery:
        for first in range(workers):
            nursery.start_soon(worker, first)
    return replies


async def test_haproxy_routes_every_library_to_the_owner_of_its_slot_for_both_minters() -> None:
    ids = library_ids(10_000)
    placement = scattered_placement()
    url = "http://front.example/verdant"
    provider = TokenProvider(SECRET)
    tokens = {
        "pyjwt": [provider.get_token(lib, "alice", url, expires_in="1h") for lib in ids],
        "jsonwebtoken": await jsonwebtoken_tokens(ids, url),
    }
    # the two encodings this test is about are really there
    assert any(b"\\u" in payload(t) for t in tokens["pyjwt"])
    assert not any(max(payload(t)) >= 0x80 for t in tokens["pyjwt"])
    assert any(max(payload(t)) >= 0x80 for t in tokens["jsonwebtoken"])
    verifier = TokenVerifier(SECRET)
    for minter, minted in tokens.items():
        decoded = [verifier.verify(t).library_id for t in minted]
        assert decoded == ids, f"{minter} tokens do not carry the ids they were minted for"

    cases = [(m, t, i) for m in tokens for t in TRANSPORTS for i in range(len(ids))]
    requests = [sync_request(t, tokens[m][i]) for m, t, i in cases]
    with trio.fail_after(120):
        async with cluster(placement, log=False, fast_nodes=True) as c:
            replies = await pipelined(c.front.port, requests)
            assert c.answering is not None
            served = {
                name: int(row["req_tot"])
                for name in NODES
                for row in await c.answering.stat_rows()
                if row["pxname"] == f"stub_{name}" and row["svname"] == "FRONTEND"
            }

    wrong = []
    for (minter, transport, index), reply in zip(cases, replies, strict=True):
        lib = ids[index]
        owner = placement.owner_of(lib)
        seen = (
            reply.status,
            reply.headers.get(NODE_HEADER.lower()),  # the backend HAProxy chose
            reply.json().get("node") if reply.status == 200 else None,  # the node that answered
            reply.headers.get(SLOT_HEADER.lower()),
        )
        if seen != (200, owner, owner, str(slot_of(lib))):
            wrong.append(f"{minter}/{transport} {lib!r}: status, chosen, answered, slot = {seen};"
                         f" expected {owner}, slot {slot_of(lib)}")
    assert not wrong, f"{len(wrong)} of {len(cases)} misrouted:\n" + "\n".join(wrong[:10])
    # every node had its share (a third each, give or take): the slots really spread
    assert sum(served.values()) >= len(cases), served
    assert all(count > len(cases) // 4 for count in served.values()), served


async def test_file_downloads_and_admin_requests_are_routed_by_their_urls() -> None:
    placement = generate(NODES)  # ranges in the map file, as the CLI writes them
    ids = library_ids(400, seed=SEED + 1)
    requests, expected = [], []
    for lib in ids:
        library, file = quote(encode_id(lib, "library id"), safe=""), quote(encode_id("f-1"))
        requests.append(("GET", f"/files/{slot_of(lib)}/{library}/{file}/photo.png", [], b""))
        expected.append((lib, placement.owner_of(lib)))
        requests.append(("POST", f"/admin/libraries/{quote(lib, safe='')}/evict", [], b""))
        expected.append((lib, placement.owner_of(lib)))
        if is_safe_name(lib):  # a single-node file URL: the safe name is its own routing key
            requests.append(("GET", f"/files/{library}/{file}/photo.png", [], b""))
            expected.append((lib, placement.owner_of(lib)))
    boundaries = [r.first for r in placement.ranges()] + [r.last for r in placement.ranges()]
    for slot in boundaries:
        requests.append(("GET", f"/files/{slot}/lib/f/name", [], b""))
        expected.append(("lib", placement.owner(slot)))
    with trio.fail_after(60):
        async with cluster(placement) as c:
            replies = await run_requests(c.front.port, requests)
    wrong = [
        f"{method} {target}: {reply.status} {reply.body[:200]!r}, expected {owner} for {lib!r}"
        for (method, target, _, _), (lib, owner), reply in zip(requests, expected, replies, strict=True)
        if reply.status != 200
        or reply.headers.get(NODE_HEADER.lower()) != owner
        or reply.json().get("node") != owner
        or reply.json().get("lib") != lib
    ]
    assert not wrong, f"{len(wrong)} of {len(requests)} misrouted:\n" + "\n".join(wrong[:10])
    single_node_form = [r for r in requests if r[1].startswith("/files/") and r[1].count("/") == 4]
    assert len(single_node_form) > 50


async def test_requests_that_name_no_library_go_to_any_healthy_node() -> None:
    no_lib = jwt_without_lib()
    requests = [
        ("OPTIONS", "/verdant", [("Origin", "http://app"), ("Access-Control-Request-Method", "POST")], b""),
        ("POST", "/verdant", [], b"{}"),
        ("POST", "/verdant", [("Authorization", "Bearer not.a-token")], b"{}"),
        ("POST", "/verdant", [("Authorization", f"Bearer {no_lib}")], b"{}"),
        ("GET", "/verdant", UPGRADE, b""),
        ("GET", "/auth/some-library?userId=alice", [], b""),
        ("GET", f"/files/{encode_id('a library')}/f/name", [], b""),  # encoded: nodes redirect
    ] * 3
    with trio.fail_after(30):
        async with cluster(generate(NODES)) as c:
            replies = await run_requests(c.front.port, requests, workers=1)
    for request, reply in zip(requests, replies, strict=True):
        assert reply.status == 200, (request, reply)
        assert reply.headers.get(SLOT_HEADER.lower()) is None, (request, reply.headers)
        assert reply.json()["node"] == reply.headers[NODE_HEADER.lower()], reply
    assert {reply.json()["node"] for reply in replies} == set(NODES)  # round robin over all


def jwt_without_lib() -> str:
    return jwt.encode({"sub": "alice", "url": "http://x/verdant"}, SECRET, algorithm="HS256")


async def test_real_websockets_reach_the_owner_through_the_tunnel() -> None:
    ids = library_ids(60, seed=SEED + 2)
    placement = scattered_placement(SEED + 2)
    url = "http://front.example/verdant"
    provider = TokenProvider(SECRET)
    minted = {
        "pyjwt": [provider.get_token(lib, "alice", url) for lib in ids],
        "jsonwebtoken": await jsonwebtoken_tokens(ids, url),
    }
    with trio.fail_after(60):
        async with cluster(placement, accept_websockets=True) as c:
            for minter, tokens in minted.items():
                for transport in ("subprotocol", "query"):
                    for lib, token in zip(ids, tokens, strict=True):
                        answer = await websocket_answer(c.front.port, transport, token)
                        owner = placement.owner_of(lib)
                        assert (answer["node"], answer["lib"]) == (owner, lib), (minter, transport, lib)


async def websocket_answer(port: int, transport: str, token: str) -> dict[str, Any]:
    """Open a websocket through the front as a Verdant client does; the stub's first message."""
    ws = WSConnection(ConnectionType.CLIENT)
    if transport == "subprotocol":
        request = Request(host=f"127.0.0.1:{port}", target="/verdant", subprotocols=["Bearer", token])
    else:
        request = Request(host=f"127.0.0.1:{port}", target=f"/verdant?token={token}")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(ws.send(request))
        accepted, text = False, ""
        while True:
            data = await stream.receive_some(65536)
            assert data, "the front closed the websocket before the stub's message"
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, TextMessage):
                    text += event.data
                    if event.message_finished:
                        assert accepted
                        answer: dict[str, Any] = orjson.loads(text)
                        return answer


async def test_a_library_whose_node_is_down_is_refused_after_a_delay_and_others_are_served() -> None:
    placement = generate(NODES)
    provider = TokenProvider(SECRET)
    by_owner = {name: next(f"lib-{i}" for i in range(10_000) if placement.owner_of(f"lib-{i}") == name)
                for name in NODES}
    tokens = {name: provider.get_token(lib, "alice", "http://x/verdant") for name, lib in by_owner.items()}
    with trio.fail_after(60):
        async with cluster(placement) as c:
            down = c.nodes["n2"]
            port = down.port
            down.stop()
            await c.front.wait_for_states(lambda s: s[("node_n2", "n2")].startswith("DOWN"))
            client = HttpClient(c.front.port)
            started = trio.current_time()
            refused = await client.request(*sync_request("authorization", tokens["n2"]))
            waited_s = trio.current_time() - started
            assert refused.status == 503
            assert refused.json()["code"] == 5030
            assert refused.headers[NODE_HEADER.lower()] == "n2"
            assert waited_s >= 0.45, f"refused after {waited_s:.3f} s, not held for 0.5 s"
            for name in ("n1", "n3"):
                served = await HttpClient(c.front.port).request(*sync_request("authorization", tokens[name]))
                assert (served.status, served.json()["node"]) == (200, name)
            # the node comes back on its address: served again, by it
            async with trio.open_nursery() as nursery:
                back = StubNode("n2", placement, TokenVerifier(SECRET), port=port)
                await nursery.start(back.run)
                await c.front.wait_for_states(lambda s: s[("node_n2", "n2")].startswith("UP"))
                again = await HttpClient(c.front.port).request(*sync_request("authorization", tokens["n2"]))
                assert (again.status, again.json()["node"]) == (200, "n2")
                back.stop()


async def test_the_runtime_api_moves_a_slot_without_a_reload_or_a_dropped_connection() -> None:
    placement = generate(NODES)
    provider = TokenProvider(SECRET)
    libs = [f"lib-{i}" for i in range(200) if placement.owner_of(f"lib-{i}") == "n1"][:2]
    moving, staying = libs
    moved = placement.moved([slot_of(moving)], "n3")
    token = {lib: provider.get_token(lib, "alice", "http://x/verdant") for lib in libs}
    with trio.fail_after(30):
        async with cluster(placement) as c:
            client = HttpClient(c.front.port)  # one keep-alive connection across the switch
            before = await client.request(*sync_request("authorization", token[moving]))
            assert before.json()["node"] == "n1"
            prepared = await c.front.runtime(f"prepare map {c.map_path}")
            assert prepared.startswith("New version created:"), prepared
            version = int(prepared.split(":")[1])
            answer = await c.front.runtime("; ".join(replace_map_commands(c.map_path, version, moved)))
            assert "rror" not in answer, answer
            after = await client.request(*sync_request("authorization", token[moving]))
            still = await client.request(*sync_request("authorization", token[staying]))
            assert (after.json()["node"], still.json()["node"]) == ("n3", "n1")
            assert c.front.process.returncode is None  # the same HAProxy process throughout
            shown = await c.front.runtime(f"show map {c.map_path}")
            assert [line.split()[1:] for line in shown.splitlines() if line] == [
                list(entry) for entry in map_entries(moved)
            ]
