"""Bad input gets a clear error, changes nothing, and everyone else keeps being served."""

from __future__ import annotations

import time
from typing import Any

import jwt
import orjson
import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from verdant_trio.client import connect, timestamp

from .conftest import SECRET, RunningServer

pytestmark = pytest.mark.trio


def sync_message(replica: str = "r1", **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "sync", "replicaId": replica, "timestamp": timestamp(), "operations": [],
        "baselines": [], "schemaVersion": 1, "since": None,
    }
    message.update(extra)
    return message


def forged_tokens(server: RunningServer) -> dict[str, tuple[str, int]]:
    now = int(time.time())
    claims = {"sub": "alice", "lib": "lib", "url": server.sync_url, "type": 0, "exp": now + 3600}
    return {
        "wrong secret": (jwt.encode(claims, "another-secret-another-secret-xx", algorithm="HS256"), 4011),
        "expired": (jwt.encode({**claims, "exp": now - 10}, SECRET, algorithm="HS256"), 4012),
        "alg none": (jwt.encode(claims, None, algorithm="none"), 4011),
        "other algorithm": (jwt.encode(claims, SECRET, algorithm="HS512"), 4011),
        "garbage": ("not-a-jwt", 4011),
        "no subject": (jwt.encode({k: v for k, v in claims.items() if k != "sub"}, SECRET, algorithm="HS256"), 4011),
        "unknown type": (jwt.encode({**claims, "type": 42}, SECRET, algorithm="HS256"), 4011),
    }


async def test_bad_tokens_get_401_with_verdant_code_on_http(server: RunningServer) -> None:
    async with server.http() as http:
        response = await http.post("/verdant", json={"messages": [sync_message()]})
        assert response.status_code == 401 and response.json()["code"] == 4010
        for name, (token, code) in forged_tokens(server).items():
            response = await http.post(
                "/verdant", json={"messages": [sync_message()]},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 401, name
            assert response.json()["code"] == code, name
    assert not list((server.data_dir / "dbs").glob("*.sqlite"))


async def test_bad_tokens_are_refused_before_the_upgrade(server: RunningServer) -> None:
    ws_url = server.sync_url.replace("http", "ws")
    cases = {name: token for name, (token, _) in forged_tokens(server).items()}
    for name, token in cases.items():
        with pytest.raises(HandshakeError) as info:
            async with open_websocket_url(ws_url, subprotocols=["Bearer", token]):
                pass
        assert getattr(info.value, "status_code", None) == 401, name
        body = orjson.loads(getattr(info.value, "body", b"{}") or b"{}")
        assert body.get("code") == forged_tokens(server)[name][1], name
    with pytest.raises(HandshakeError) as info:
        async with open_websocket_url(ws_url):
            pass
    assert getattr(info.value, "status_code", None) == 401


async def test_token_in_query_string_works(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token(), via="query") as client:
        response = await client.sync("rq")
        assert response["type"] == "sync-resp"


@pytest.mark.parametrize(
    "frame, fragment",
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"type": "teleport", "replicaId": "r"}', "unknown message type"),
        ('{"type": "op", "replicaId": "r", "timestamp": "t"}', "'operations' must be an array"),
        ('{"type": "op", "replicaId": 5, "timestamp": "t", "operations": []}', "'replicaId' must be a string"),
        ('{"type": "op", "replicaId": "r", "timestamp": "t", "operations": [{"oid": "a/1", "timestamp": "t", "data": {"op": "explode"}}]}', "unknown patch operation"),
        ('{"type": "op", "replicaId": "r", "timestamp": "t", "operations": [{"oid": "a/1", "timestamp": "t", "data": {"op": "list-delete", "index": "0", "count": 1}}]}', "'index' must be a number"),
        ('{"type": "sync", "replicaId": "r", "timestamp": "t", "operations": [], "baselines": [7], "since": null}', "a baseline must be an object"),
        ('{"type": "sync", "replicaId": "r", "timestamp": "t", "operations": [], "baselines": []}', "'since' is required"),
        ('{"type": "op", "replicaId": "r", "timestamp": "t", "operations": [{"oid": "a/1", "timestamp": "t", "data": {"op": "list-delete", "index": 123456789012345678901234567890, "count": 1}}]}', "'index' must be a number"),
        ('{"type": "op", "replicaId": "r", "timestamp": "' + "t" * 1000 + '", "operations": []}', "longer than"),
        ("[" * 5000 + "]" * 5000, "malformed JSON"),
    ],
)
async def test_malformed_messages_get_an_error_and_change_nothing(
    server: RunningServer, frame: str, fragment: str
) -> None:
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="bystander")) as bystander:
            await bystander.sync("rbystander")
            async with connect(server.sync_url, server.token()) as client:
                await client.send_raw(frame)
                error = await client.wait_for("error")
                assert error["code"] == 4000
                assert fragment in error["message"]
                # the connection still works
                assert (await client.sync("r-ok"))["type"] == "sync-resp"
            await bystander.send({"type": "heartbeat"})
            assert (await bystander.wait_for("heartbeat-response"))["type"] == "heartbeat-response"
    async with server.http() as http:
        info = (await http.get("/admin/libraries/lib", headers=server.admin_headers())).json()
    assert info["operationsCount"] == 0


async def test_binary_frames_are_refused(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token()) as client:
        await client.send_raw(orjson.dumps(sync_message()))
        error = await client.wait_for("error")
        assert "binary frames" in error["message"]


async def test_too_many_invalid_messages_close_the_connection(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token()) as client:
        for _ in range(20):
            try:
                await client.send_raw("nope")
            except Exception:
                break
        assert await client.wait_closed() == 1008


async def test_oversized_frames_close_with_1009(server_factory: Any) -> None:
    async with server_factory(max_message_bytes=64 * 1024) as server:
        async with connect(server.sync_url, server.token()) as client:
            await client.send_raw("x" * (200 * 1024))
            assert await client.wait_closed(timeout_s=5) == 1009
        async with connect(server.sync_url, server.token()) as client:
            assert (await client.sync("r"))["type"] == "sync-resp"


async def test_malformed_http_bodies(server: RunningServer) -> None:
    headers = {"Authorization": f"Bearer {server.token()}"}
    async with server.http() as http:
        response = await http.post("/verdant", content=b"{nope", headers=headers)
        assert response.status_code == 400 and response.json()["code"] == 4000
        response = await http.post("/verdant", json={"msgs": []}, headers=headers)
        assert response.status_code == 400 and response.json()["code"] == 4001
        # one bad message refuses the whole batch: the good one before it is not stored either
        response = await http.post("/verdant", json={"messages": [
            {"type": "op", "replicaId": "r", "timestamp": timestamp(), "operations": [
                {"oid": "items/1", "timestamp": timestamp(), "data": {"op": "initialize", "value": {}}}]},
            {"type": "op", "replicaId": "r"},
        ]}, headers=headers)
        assert response.status_code == 400
        assert "messages" not in response.json()["message"] and "required" in response.json()["message"]
        assert not list((server.data_dir / "dbs").glob("*.sqlite"))


async def test_oversized_http_body_is_413(server_factory: Any) -> None:
    async with server_factory(app={"max_body_bytes": 10_000}) as server:
        async with server.http() as http:
            response = await http.post(
                "/verdant",
                content=b'{"messages": [' + b" " * 20_000 + b"]}",
                headers={"Authorization": f"Bearer {server.token()}", "Content-Type": "application/json"},
            )
        assert response.status_code == 413


@pytest.mark.parametrize("library", ["../escape", "a/b", "..", "with space", "ünïcode", "x" * 120])
async def test_unsafe_library_ids_never_become_raw_paths(server: RunningServer, library: str) -> None:
    async with connect(server.sync_url, server.token(library=library)) as client:
        response = await client.sync("r", operations=[
            {"oid": "items/1", "timestamp": timestamp(), "data": {"op": "initialize", "value": {"v": 1}}}
        ])
        assert response["type"] == "sync-resp"
    files = [p for p in server.data_dir.rglob("*") if p.is_file()]
    for path in files:
        assert path.resolve().is_relative_to((server.data_dir / "dbs").resolve()), path
    names = [p.name for p in (server.data_dir / "dbs").iterdir()]
    assert any(name.endswith(".sqlite") for name in names)


@pytest.mark.parametrize("library", ["nul\x00byte", "bell\x07", "y" * 400])
async def test_impossible_library_ids_are_refused_clearly(server: RunningServer, library: str) -> None:
    async with server.http() as http:
        response = await http.post(
            "/verdant", json={"messages": [sync_message()]},
            headers={"Authorization": f"Bearer {server.token(library=library)}"},
        )
    assert response.status_code == 400
    assert "library id" in response.json()["message"]


async def test_safe_library_id_keeps_the_node_file_name(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token(library="my-app_lib.1")) as client:
        await client.sync("r")
    assert (server.data_dir / "dbs" / "my-app_lib.1.sqlite").exists()


async def test_admin_api_requires_the_admin_token(server: RunningServer) -> None:
    async with server.http() as http:
        assert (await http.get("/admin/libraries/lib")).status_code == 401
        response = await http.get("/admin/libraries/lib", headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401
        response = await http.get("/admin/libraries/nope", headers=server.admin_headers())
        assert response.status_code == 404 and response.json()["code"] == 4040


MALFORMED_KEY = "%%%not-an-authz-key%%%"


def initialize(oid: str, authz: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"oid": oid, "timestamp": timestamp(), "data": {"op": "initialize", "value": {"id": oid}}}
    if authz is not None:
        op["authz"] = authz
    return op


def bad_authz_message(kind: str, replica: str) -> tuple[dict[str, Any], str]:
    """A message whose good parts come before one malformed key; the field it names."""
    if kind == "op":
        return {"type": "op", "replicaId": replica, "timestamp": timestamp(), "operations": [
            initialize("items/good"), initialize("items/bad", MALFORMED_KEY)]}, "operations[1]"
    return sync_message(
        replica, since=timestamp(), operations=[initialize("items/good")],
        baselines=[{"oid": "items/bad", "snapshot": {}, "timestamp": timestamp(), "authz": MALFORMED_KEY}],
    ), "baselines[0]"


async def library_counts(server: RunningServer) -> tuple[int, int]:
    async with server.http() as http:
        info = (await http.get("/admin/libraries/lib", headers=server.admin_headers())).json()
    return info["operationsCount"], info["baselinesCount"]


async def oids_a_fresh_replica_sees(server: RunningServer, user: str = "alice") -> set[str]:
    status, body = await server.http_sync(server.token(user=user), [
        sync_message(f"fresh-{timestamp()}", resyncAll=True)])
    assert status == 200
    (response,) = body["messages"]
    return {item["oid"] for item in response["operations"] + response["baselines"]}


@pytest.mark.parametrize("kind", ["op", "sync"])
async def test_a_malformed_authz_key_refuses_the_whole_message_over_the_websocket(
    server: RunningServer, kind: str
) -> None:
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token()) as client:
            assert (await client.sync("r1", operations=[initialize("items/seed")]))["type"] == "sync-resp"
            before = await library_counts(server)
            message, field = bad_authz_message(kind, "r1")
            await client.send(message)
            error = await client.wait_for("error")
            assert error["code"] == 4000
            assert f"'{kind}' message {field}: 'authz' is not base64" in error["message"]
            # the connection keeps working, and what it sends next is the only thing stored
            await client.op("r1", [initialize("items/after")])
            await client.wait_for("server-ack")
    assert await library_counts(server) == (before[0] + 1, before[1])
    assert await oids_a_fresh_replica_sees(server) == {"items/seed", "items/after"}


@pytest.mark.parametrize("kind", ["op", "sync"])
async def test_a_malformed_authz_key_over_http_is_a_400_before_any_message_is_handled(
    server: RunningServer, kind: str
) -> None:
    token = server.token()
    status, _ = await server.http_sync(token, [sync_message("r1", operations=[initialize("items/seed")])])
    assert status == 200
    before = await library_counts(server)
    message, field = bad_authz_message(kind, "r1")
    # a well-formed op first: it is not handled either
    status, body = await server.http_sync(token, [
        {"type": "op", "replicaId": "r1", "timestamp": timestamp(), "operations": [initialize("items/first")]},
        message,
    ])
    assert status == 400 and body["code"] == 4000
    assert f"'{kind}' message {field}: 'authz'" in body["message"]
    assert await library_counts(server) == before
    status, body = await server.http_sync(token, [
        {"type": "op", "replicaId": "r1", "timestamp": timestamp(), "operations": [initialize("items/after")]}])
    assert status == 200 and [m["type"] for m in body["messages"]] == ["server-ack"]
    assert await oids_a_fresh_replica_sees(server) == {"items/seed", "items/after"}
