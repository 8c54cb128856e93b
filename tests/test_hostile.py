"""Hostile input at scale: generated malformed and edge-case messages at a running server.

Hypothesis generates what a broken or malicious client could send: wrong types, missing or
huge fields, integers past 64 bits, infinities, nesting past the parser's depth, megabyte
strings, invalid UTF-8 in text frames, unknown operations in patches; and, separately, messages
that are valid but odd (integers at the edge of 64 bits, deep values, long strings, list
indices far beyond any list, `__proto__` as a property name). For every example:

- malformed: the sender gets an `error` frame (or a close with a protocol code), never an
  acknowledgement; nothing is stored; a bystander on the same library is still answered;
- valid but odd: each message is acknowledged or refused, the library's documents can still be
  read (compaction and reading apply the odd patches), a new replica can still sync;
- always: no reply carries a traceback and the server logs none (a logged traceback means an
  unexpected path); the HTTP endpoints answer with a status below 500 and a JSON body.

The server runs as a separate process for the whole module. `VERDANT_HEAVY=1` runs ten times
as many examples.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from trio_websocket import HandshakeError

from bench.wire import LeanSocket, WsClosed
from verdant_trio.client import connect, timestamp

from .procserver import ServerProcess

HEAVY = bool(os.environ.get("VERDANT_HEAVY"))
EXAMPLES = int(os.environ.get("VERDANT_HOSTILE_EXAMPLES", 600 if HEAVY else 60))
PROTOCOL_CLOSE_CODES = {1007, 1008, 1009}
LEAK_MARKERS = ("Traceback", 'File "', "site-packages")

HOSTILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=not HEAVY,
    # in CI a failure is reported as found: shrinking megabyte frames can take many minutes
    phases=list(Phase) if HEAVY else [Phase.explicit, Phase.reuse, Phase.generate],
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server process for the module (the hypothesis tests are synchronous and run each
    example in its own `trio.run`)."""
    process = ServerProcess(tmp_path_factory.mktemp("hostile"), limits={"max_connections": 200})
    process.start_blocking()
    try:
        yield process
    finally:
        process.stop_blocking()
    unexpected = [line for line in process.log().splitlines() if "Traceback" in line]
    assert not unexpected, "\n".join(unexpected)[-5000:]


# -- what a client could send -----------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)


def ops_message(replica: str, operations: list[Any]) -> dict[str, Any]:
    return {"type": "op", "replicaId": replica, "timestamp": timestamp(), "operations": operations}


def a_set(oid: str = "items/a", name: Any = "title", value: Any = 1) -> dict[str, Any]:
    return {"oid": oid, "timestamp": timestamp(), "data": {"op": "set", "name": name, "value": value}}


def valid_bases(replica: str) -> list[dict[str, Any]]:
    return [
        ops_message(replica, [a_set()]),
        ops_message(replica, [{"oid": "items/b", "timestamp": timestamp(),
                               "data": {"op": "list-insert", "index": 0, "value": 1}}]),
        {"type": "sync", "replicaId": replica, "timestamp": timestamp(), "operations": [a_set()],
         "baselines": [{"oid": "items/c", "snapshot": {}, "timestamp": timestamp()}],
         "schemaVersion": 1, "since": None},
        {"type": "ack", "replicaId": replica, "timestamp": timestamp()},
        {"type": "presence-update", "replicaId": replica, "presence": {}, "internal": {}},
    ]


BREAKERS = [
    # (path into the message, replacement); None deletes the key
    (("type",), 7), (("type",), None), (("type",), "teleport"), (("type",), ["op"]),
    (("replicaId",), None), (("replicaId",), 12), (("replicaId",), {"id": 1}), (("replicaId",), ""),
    (("replicaId",), "r" * 200_000), (("timestamp",), None), (("timestamp",), 3.5),
    (("timestamp",), "t" * 600),
]
OP_BREAKERS = [
    (("operations",), None), (("operations",), {"0": {}}), (("operations",), "ops"),
    (("operations", 0), 5), (("operations", 0, "oid"), None), (("operations", 0, "oid"), 1),
    (("operations", 0, "data"), "set"), (("operations", 0, "data"), None),
    (("operations", 0, "data", "op"), "explode"), (("operations", 0, "data", "op"), 1),
    (("operations", 0, "data", "op"), None), (("operations", 0, "data", "op"), "SET"),
    (("operations", 0, "authz"), 5),
]
RAW_FRAMES = [
    b"", b"{", b"null", b"[]", b"42", b'"op"', b"[" * 5000 + b"]" * 5000,
    b'{"type": "op", "replicaId": "r", "timestamp": "t", "operations": [{"oid": "items/a", '
    b'"timestamp": "t", "data": {"op": "list-set", "index": 1e400, "value": 1}}]}',
    b'{"type": "op", "replicaId": "r", "timestamp": "t", "operations": [{"oid": "items/a", '
    b'"timestamp": "t", "data": {"op": "list-delete", "index": 123456789012345678901234567890, '
    b'"count": 1}}]}',
    b'{"type": "ack", "replicaId": "\xff\xfe"}',  # invalid UTF-8 in a text frame
    b'{"type": "ack", "replicaId": "\\ud800"}',  # a lone surrogate
    b'{"type": "heartbeat"' + b" " * 100,
]


def _apply(message: Any, path: tuple[Any, ...], replacement: Any) -> Any:
    if not path:
        return replacement
    target = message
    for key in path[:-1]:
        target = target[key]
    if replacement is None and isinstance(target, dict):
        target.pop(path[-1], None)
    else:
        target[path[-1]] = replacement
    return message


@st.composite
def malformed_frame(draw: st.DrawFn, replica: str) -> bytes:
    kind = draw(st.sampled_from(["breaker", "patch", "raw", "wrap", "deep"]))
    if kind == "raw":
        return draw(st.sampled_from(RAW_FRAMES))
    if kind == "deep":
        depth = draw(st.integers(1030, 3000))
        return (b'{"type":"op","replicaId":"' + replica.encode() + b'","timestamp":"t","operations":'
                + b"[" * depth + b"]" * depth + b"}")
    if kind == "wrap":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return orjson.dumps(value)
    bases = valid_bases(replica)
    if kind == "patch":
        message = bases[draw(st.integers(0, 1))]
        path, replacement = draw(st.sampled_from(OP_BREAKERS))
    else:
        message = draw(st.sampled_from(bases))
        path, replacement = draw(st.sampled_from(BREAKERS))
        if message["type"] == "ack" and path == ("timestamp",) and replacement is None:
            replacement = 3.5  # an ack without a timestamp is valid
        if message["type"] == "presence-update" and path[0] == "timestamp":
            path, replacement = ("internal",), "not an object"
    return orjson.dumps(_apply(message, path, replacement))


# -- checks -----------------------------------------------------------------------------------


def assert_no_leak(payload: bytes | str) -> None:
    text = payload if isinstance(payload, str) else payload.decode("utf-8", "replace")
    for marker in LEAK_MARKERS:
        assert marker not in text, text[:2000]


async def library_info(server: ServerProcess, library: str) -> tuple[int, Any]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.get(f"/admin/libraries/{library}", headers=server.admin_headers())
    assert_no_leak(response.content)
    return response.status_code, response.json()


async def bystander_is_served(server: ServerProcess, library: str) -> None:
    async with connect(server.sync_url, server.token(library, "bystander")) as client:
        await client.send({"type": "heartbeat"})
        await client.wait_for("heartbeat-response", timeout_s=5)


async def send_malformed(server: ServerProcess, library: str, frames: list[bytes]) -> None:
    sock = await LeanSocket.connect(server.sync_url, server.token(library, "mallory"))
    replies: list[bytes] = []
    closed: int | None = None
    try:
        for frame in frames:
            await sock.send(frame)
        await sock.send(b'{"type":"heartbeat"}')
        with trio.fail_after(20):
            while True:
                reply = await sock.receive()
                replies.append(reply)
                if b"heartbeat-response" in reply:
                    break
    except WsClosed as exc:
        closed = exc.code
    finally:
        await sock.aclose()
    kinds = [orjson.loads(r).get("type") for r in replies]
    for reply in replies:
        assert_no_leak(reply)
    # presence messages are other replicas coming and going (the bystander)
    assert set(kinds) <= {"error", "heartbeat-response", "presence-offline", "presence-changed"}, kinds
    not_utf8 = [i for i, frame in enumerate(frames) if not _is_utf8(frame)]
    if not_utf8:
        # the websocket layer fails the connection at the first invalid text frame, with the
        # close code RFC 6455 gives it
        assert "heartbeat-response" not in kinds
        assert closed == 1007, closed
        assert kinds.count("error") <= not_utf8[0]
    elif closed is None:
        assert kinds.count("error") == len(frames), (kinds, [f[:200] for f in frames])
    else:
        assert closed in PROTOCOL_CLOSE_CODES, closed


def _is_utf8(frame: bytes) -> bool:
    try:
        frame.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@HOSTILE
@given(data=st.data())
def test_malformed_messages_are_refused_and_store_nothing(server: ServerProcess, data: st.DataObject) -> None:
    library = f"hostile-{uuid.uuid4().hex[:12]}"
    frames = data.draw(st.lists(malformed_frame("mallory-r"), min_size=1, max_size=6), label="frames")

    async def example() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_malformed, server, library, frames)
                nursery.start_soon(bystander_is_served, server, library)
            status, body = await library_info(server, library)
            assert status == 404, body  # the library holds no replica, operation or baseline

    trio.run(example)


# -- valid but odd ----------------------------------------------------------------------------

indices = st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False,
                                                   min_value=-(2**53), max_value=2**53)
names = st.text(max_size=12) | st.sampled_from(["__proto__", "constructor", "length", "0", "-1",
                                                "4294967295", "toString"]) | st.integers(-5, 5)
refs = st.builds(lambda i: {"@@type": "ref", "id": f"items/a:{i}"}, st.integers(0, 3))
values = json_values | refs | st.just("x" * 100_000)


@st.composite
def odd_patch(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from([
        "initialize", "set", "remove", "list-set", "list-push", "list-add", "list-insert",
        "list-delete", "list-move-by-index", "list-move-by-ref", "list-remove", "delete", "touch",
    ]))
    patch: dict[str, Any] = {"op": op}
    if op == "initialize":
        patch["value"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), json_values, max_size=4),
                                        st.lists(json_values, max_size=5), json_values))
    elif op in ("set", "remove"):
        patch["name"] = draw(names)
        if op == "set":
            patch["value"] = draw(values)
    elif op == "list-set":
        patch.update(index=draw(indices), value=draw(values))
    elif op in ("list-push", "list-add"):
        patch["value"] = draw(values)
    elif op == "list-insert":
        patch["index"] = draw(indices)
        if draw(st.booleans()):
            patch["values"] = draw(st.lists(values, max_size=4))
        else:
            patch["value"] = draw(values)
    elif op == "list-delete":
        patch.update(index=draw(indices), count=draw(indices))
    elif op == "list-move-by-index":
        patch.update({"from": draw(indices), "to": draw(indices)})
    elif op == "list-move-by-ref":
        patch.update(value=draw(refs), index=draw(indices))
    elif op == "list-remove":
        patch["value"] = draw(values)
        if draw(st.booleans()):
            patch["only"] = draw(st.sampled_from(["first", "last"]))
    return patch


OIDS = ["items/a", "items/a:0", "items/a:1", "items/b"]


@HOSTILE
@given(data=st.data())
def test_odd_but_valid_messages_never_break_the_library(server: ServerProcess, data: st.DataObject) -> None:
    library = f"odd-{uuid.uuid4().hex[:12]}"
    batches = data.draw(st.lists(
        st.lists(st.tuples(st.sampled_from(OIDS), odd_patch()), min_size=1, max_size=4),
        min_size=1, max_size=5,
    ), label="batches")

    async def example() -> None:
        with trio.fail_after(60):
            async with connect(server.sync_url, server.token(library, "odd")) as client:
                await client.sync("odd-r")
                for batch in batches:
                    ops = [{"oid": oid, "timestamp": timestamp(), "data": patch} for oid, patch in batch]
                    stamp = await client.op("odd-r", ops)
                    reply = await client.wait_for(
                        lambda m, stamp=stamp: (
                            m.get("type") == "server-ack" and m.get("timestamp") == stamp
                        ) or m.get("type") == "error"
                    )
                    assert_no_leak(orjson.dumps(reply))
                    assert reply["type"] == "server-ack", reply
                # everything acknowledged: compaction may fold it (it runs within ~0.1 s idle)
                await client.send({"type": "heartbeat"})
                await client.wait_for("heartbeat-response")
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                for oid in OIDS:
                    if ":" in oid:
                        continue
                    collection, _, doc = oid.partition("/")
                    response = await http.get(
                        f"/admin/libraries/{library}/documents/{collection}/{doc}",
                        headers=server.admin_headers(),
                    )
                    assert_no_leak(response.content)
                    assert response.status_code in (200, 404), response.text
            async with connect(server.sync_url, server.token(library, "late")) as late:
                response = await late.sync("late-r")
                assert response["type"] == "sync-resp"

    trio.run(example)


# -- HTTP -------------------------------------------------------------------------------------

http_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(orjson.dumps, json_values),
    st.builds(lambda frames: b'{"messages": [' + b",".join(frames) + b"]}",
              st.lists(malformed_frame("http-r"), min_size=1, max_size=3)),
    st.just(b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
)
weird_ids = st.text(min_size=1, max_size=30).filter(lambda s: s not in (".", ".."))


@HOSTILE
@given(body=http_bodies, library=weird_ids, content_type=st.sampled_from(
    ["application/json", "text/plain", "multipart/form-data; boundary=x", "", "application/json; charset=latin-1"]
))
def test_http_endpoints_answer_hostile_requests_cleanly(
    server: ServerProcess, body: bytes, library: str, content_type: str
) -> None:
    async def example() -> None:
        token = server.token(f"http-{uuid.uuid4().hex[:8]}", "mallory")
        requests = {
            "sync": ("POST", "/verdant", {"Authorization": f"Bearer {token}", "Content-Type": content_type}),
            "sync with a forged token": ("POST", "/verdant", {"Authorization": "Bearer x.y.z"}),
            "upload": ("POST", f"/verdant/files/{uuid.uuid4().hex}",
                       {"Authorization": f"Bearer {token}", "Content-Type": content_type}),
            "admin": ("GET", "/admin/libraries/" + quote(library, safe="/"), server.admin_headers()),
        }
        # A connection per request: a refused request can hang its keep-alive connection
        # (`test_a_request_refused_before_its_body_arrives_keeps_its_connection_usable`).
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as http:
            for name, (method, path, headers) in requests.items():
                try:
                    response = await http.request(
                        method, path, content=body if method == "POST" else None, headers=headers
                    )
                except httpx.HTTPError as exc:
                    raise AssertionError(
                        f"{name}: {exc!r} (body of {len(body)} bytes, {content_type!r})"
                    ) from None
                assert response.status_code < 500, (name, response.status_code, response.text)
                assert_no_leak(response.content)
                if response.status_code >= 400 and response.content:
                    assert isinstance(response.json(), dict), name

    trio.run(example)


# -- connection floods ------------------------------------------------------------------------


@pytest.mark.trio
async def test_connection_floods_beyond_the_limit_are_refused_cleanly(tmp_path: Path) -> None:
    """With `max_connections` = 20, 60 clients connecting at once: at most 20 get in, every
    other one gets a 503 before the upgrade (no reset, no hang), and once some leave, others
    get in again."""
    limit = 20
    server = ServerProcess(tmp_path / "server", limits={"max_connections": limit})
    outcomes: list[str] = []
    admitted: list[Any] = []
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await server.start(nursery)
            release = trio.Event()
            all_decided = trio.Event()

            def decided(outcome: str) -> None:
                outcomes.append(outcome)
                if len(outcomes) == 60:
                    all_decided.set()

            async def attempt(i: int) -> None:
                try:
                    async with connect(server.sync_url, server.token("flood", f"u{i}")) as client:
                        response = await client.sync(f"r{i}")
                        decided(response["type"])
                        admitted.append(client)
                        await release.wait()
                except HandshakeError as exc:
                    decided(f"refused {getattr(exc, 'status_code', '?')}")

            async with trio.open_nursery() as attempts:
                for i in range(60):
                    attempts.start_soon(attempt, i)
                await all_decided.wait()
                synced = outcomes.count("sync-resp")
                refused = {o for o in outcomes if o != "sync-resp"}
                open_now = await _connections_open(server)
                release.set()
            async with connect(server.sync_url, server.token("flood", "later")) as client:
                assert (await client.sync("r-later"))["type"] == "sync-resp"
            await server.stop()
            nursery.cancel_scope.cancel()
    assert refused == {"refused 503"}, f"{synced} of 60 admitted with max_connections={limit}: {outcomes}"
    assert 1 <= synced <= limit, f"{synced} connections admitted with max_connections={limit}"
    assert open_now == synced
    assert "Traceback" not in server.log()


async def _connections_open(server: ServerProcess) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(server.url + "/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith('verdant_connections_open{replica_type="realtime",transport="websocket"')
    )


@pytest.mark.trio
async def test_a_send_racing_hypercorns_close_is_a_disconnect() -> None:
    """What the hostile runs above hit about once in a hundred connections, made deterministic:
    the send callable fails the way hypercorn's does when its own close is in progress."""
    from verdant_trio.sync.errors import Disconnected
    from verdant_trio.transport.app import AsgiWebSocket

    async def receive() -> dict[str, Any]:
        await trio.sleep_forever()
        raise AssertionError

    async def send(event: Any) -> None:
        raise trio.BusyResourceError("another task is currently sending data on this SocketStream")

    with pytest.raises(Disconnected):
        await AsgiWebSocket(receive, send).send(b'{"type":"heartbeat-response"}')


@pytest.mark.trio
async def test_a_request_refused_before_its_body_arrives_keeps_its_connection_usable(
    server: ServerProcess,
) -> None:
    """What a client with an expired token does: its POST is refused, it retries on the same
    connection. The hostile HTTP runs hit this by chance about once in a thousand requests."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        body = b'{"messages": []}'
        await stream.send_all(
            b"POST /verdant HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer x.y.z\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        with trio.fail_after(10):
            first = await stream.receive_some(65536)  # refused before the body was sent
        assert first.startswith(b"HTTP/1.1 401")
        if b"connection: close" in first.lower():
            return  # the server closes this connection: the client will open a new one
        await stream.send_all(body)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            second = await stream.receive_some(65536)
        assert second.startswith(b"HTTP/1.1 200"), second[:200]


@pytest.mark.trio
async def test_a_multipart_body_without_its_boundary_is_refused_not_a_500(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.post(
            f"/verdant/files/{uuid.uuid4().hex}",
            content=b"x" * (2 * 1024 * 1024),
            headers={
                "Authorization": f"Bearer {server.token('multipart', 'mallory')}",
                "Content-Type": "multipart/form-data; boundary=x",
            },
        )
    assert_no_leak(response.content)
    assert response.status_code in (400, 413), (response.status_code, response.text[:200])
