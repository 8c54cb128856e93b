"""The sync protocol over a real websocket, message path by message path (our Python client)."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
import trio

from verdant_trio.client import VerdantClient, connect, timestamp
from verdant_trio.sync.decisions import decode_nonce
from verdant_trio.sync.protocol import ReplicaType

from .conftest import RunningServer

pytestmark = pytest.mark.trio


def initialize(oid: str, value: dict[str, Any], ts: str | None = None, authz: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"oid": oid, "timestamp": ts or timestamp(), "data": {"op": "initialize", "value": value}}
    if authz:
        op["authz"] = authz
    return op


def set_op(oid: str, name: str, value: Any, ts: str | None = None) -> dict[str, Any]:
    return {"oid": oid, "timestamp": ts or timestamp(), "data": {"op": "set", "name": name, "value": value}}


async def admin_info(server: RunningServer, library: str = "lib") -> dict[str, Any]:
    async with server.http() as http:
        response = await http.get(f"/admin/libraries/{library}", headers=server.admin_headers())
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def received_before_a_heartbeat(client: VerdantClient) -> list[dict[str, Any]]:
    """Everything the server had handed to this connection before it read a new heartbeat:
    its answer is written after whatever was already queued, so it marks "so far"."""
    await client.send({"type": "heartbeat"})
    await client.wait_for("heartbeat-response")
    return client.drain()


async def admin_document(server: RunningServer, collection: str, doc_id: str, library: str = "lib") -> Any:
    async with server.http() as http:
        response = await http.get(
            f"/admin/libraries/{library}/documents/{collection}/{doc_id}",
            headers=server.admin_headers(),
        )
    return response.json() if response.status_code == 200 else None


async def test_first_replica_initializes_library_and_second_gets_everything(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="alice")) as a:
            assert a.subprotocol == "Bearer"
            resp = await a.sync("ra", operations=[initialize("items/1", {"content": "hi"})])
            assert resp["type"] == "sync-resp"
            assert resp["overwriteLocalData"] is False
            assert resp["operations"] == [] and resp["baselines"] == []
            assert resp["ackedTimestamp"]
            async with connect(server.sync_url, server.token(user="bob")) as b:
                resp_b = await b.sync("rb", resync_all=True)
                assert resp_b["overwriteLocalData"] is True
                assert [op["oid"] for op in resp_b["operations"]] == ["items/1"]
                assert resp_b["operations"][0]["data"] == {"op": "initialize", "value": {"content": "hi"}}
                nonce = resp_b["ackThisNonce"]
                assert decode_nonce(nonce) == 1
        assert await admin_document(server, "items", "1") == {"content": "hi"}


async def test_op_is_acked_to_sender_and_rebroadcast_to_others(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="alice")) as a, connect(
            server.sync_url, server.token(user="bob")
        ) as b:
            await a.sync("ra")
            await b.sync("rb")
            stamp = await a.op("ra", [initialize("items/2", {"content": "x"})])
            ack = await a.wait_for("server-ack")
            assert ack == {"type": "server-ack", "timestamp": stamp}
            rebroadcast = await b.wait_for("op-re")
            assert rebroadcast["replicaId"] == "ra"
            assert rebroadcast["operations"][0]["oid"] == "items/2"
            # the sender never gets its own operations back (b's op-re was handed to every
            # recipient at once, so a's would be in a's queue by now)
            assert not [m for m in await received_before_a_heartbeat(a) if m["type"] == "op-re"]


async def test_heartbeat_answered_with_both_client_generations(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token()) as a:
        await a.send({"type": "heartbeat"})  # Verdant HEAD
        assert (await a.wait_for("heartbeat-response")) == {"type": "heartbeat-response"}
        await a.send({"type": "heartbeat", "timestamp": timestamp(), "replicaId": "r"})  # 3.6.3
        assert (await a.wait_for("heartbeat-response")) == {"type": "heartbeat-response"}


async def test_presence_changed_reaches_everyone_and_offline_when_user_leaves(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="alice")) as a:
            await a.sync("ra")
            async with connect(server.sync_url, server.token(user="bob")) as b:
                await b.sync("rb")
                await b.send({"type": "presence-update", "replicaId": "rb", "presence": {"cursor": 3}})
                mine = await b.wait_for("presence-changed")
                theirs = await a.wait_for("presence-changed")
                for message in (mine, theirs):
                    assert message["replicaId"] == "rb"
                    assert message["userInfo"]["id"] == "bob"
                    assert message["userInfo"]["presence"] == {"cursor": 3}
                    assert message["userInfo"]["profile"] == {"id": "bob"}
            offline = await a.wait_for("presence-offline")
            assert offline == {"type": "presence-offline", "userId": "bob", "replicaId": "rb"}


async def test_sync_response_lists_peer_presence(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token(user="alice")) as a:
        await a.send({"type": "presence-update", "replicaId": "ra", "presence": {"x": 1}})
        await a.wait_for("presence-changed")
        async with connect(server.sync_url, server.token(user="bob")) as b:
            resp = await b.sync("rb")
            assert resp["peerPresence"]["alice"]["presence"] == {"x": 1}
            assert resp["peerPresence"]["alice"]["replicaId"] == "ra"


async def test_nonce_ack_moves_acked_server_order(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token(user="alice")) as a:
        await a.sync("ra", operations=[initialize("items/1", {}), initialize("items/2", {})])
    async with connect(server.sync_url, server.token(user="bob")) as b:
        resp = await b.sync("rb", resync_all=True)
        await b.send({"type": "ack", "replicaId": "rb", "nonce": resp["ackThisNonce"], "timestamp": timestamp()})
        await b.send({"type": "heartbeat"})
        await b.wait_for("heartbeat-response")
        with trio.fail_after(5):
            while True:
                info = await admin_info(server)
                replica = next(r for r in info["replicas"] if r["id"] == "rb")
                if replica["ackedServerOrder"] == 2:
                    break
                await trio.sleep(0.05)


async def test_replica_id_hijack_is_forbidden_and_stores_nothing(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token(user="alice")) as a:
        await a.sync("shared-replica")
    async with connect(server.sync_url, server.token(user="mallory")) as m:
        resp = await m.sync("shared-replica", operations=[initialize("items/evil", {"x": 1})])
        assert resp == {"type": "forbidden"}
        await m.op("shared-replica", [initialize("items/evil2", {"x": 1})])
        assert (await m.wait_for("forbidden")) == {"type": "forbidden"}
    info = await admin_info(server)
    assert info["operationsCount"] == 0
    assert [r["userId"] for r in info["replicas"]] == ["alice"]


async def test_read_only_token_cannot_write_but_keeps_receiving(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="alice")) as a:
            await a.sync("ra", operations=[initialize("items/1", {"v": 1})])
            async with connect(server.sync_url, server.token(user="reader", type=ReplicaType.READ_ONLY_REALTIME)) as r:
                resp = await r.sync("rr", resync_all=True)
                assert resp["type"] == "sync-resp"
                await r.op("rr", [set_op("items/1", "v", 666)])
                assert (await r.wait_for("forbidden")) == {"type": "forbidden"}
                # the refusal and any broadcast of that batch are handed over together
                assert not [m for m in await received_before_a_heartbeat(a) if m["type"] == "op-re"]
                await a.op("ra", [set_op("items/1", "v", 2)])
                assert (await r.wait_for("op-re"))["operations"][0]["data"]["value"] == 2
    assert await admin_document(server, "items", "1") == {"v": 2}


async def test_read_only_sync_with_local_edits_is_refused_and_reset(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token(user="alice")) as a:
        await a.sync("ra", operations=[initialize("items/1", {"v": 1})])
    async with connect(server.sync_url, server.token(user="reader", type=ReplicaType.READ_ONLY_REALTIME)) as r:
        await r.send({
            "type": "sync", "replicaId": "rr", "timestamp": timestamp(), "schemaVersion": 1,
            "operations": [set_op("items/1", "v", 999)], "baselines": [], "since": timestamp(),
        })
        assert (await r.wait_for("forbidden")) == {"type": "forbidden"}
        resp = await r.wait_for("sync-resp")
        assert resp["overwriteLocalData"] is True
        assert [op["data"] for op in resp["operations"]] == [{"op": "initialize", "value": {"v": 1}}]
    assert await admin_document(server, "items", "1") == {"v": 1}


async def test_server_that_lost_library_asks_for_full_history(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token(user="alice")) as a:
        resp = await a.sync("ra", since=timestamp())
        assert resp == {"type": "need-since", "since": None}
        resp = await a.sync("ra", operations=[initialize("items/9", {"v": 9})], since=None)
        assert resp["type"] == "sync-resp"
        assert resp["overwriteLocalData"] is False
    assert await admin_document(server, "items", "9") == {"v": 9}


async def test_private_operations_reach_only_their_user(server: RunningServer) -> None:
    alice_only = base64.b64encode(b"u:alice:*").decode()
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="alice")) as a, connect(
            server.sync_url, server.token(user="alice")
        ) as a2, connect(server.sync_url, server.token(user="bob")) as b:
            await a.sync("ra")
            await a2.sync("ra2")
            await b.sync("rb")
            await a.op("ra", [initialize("secrets/1", {"pin": 1234}, authz=alice_only), initialize("items/pub", {"v": 1})])
            got_a2 = await a2.wait_for("op-re")
            got_b = await b.wait_for("op-re")
            assert sorted(op["oid"] for op in got_a2["operations"]) == ["items/pub", "secrets/1"]
            assert [op["oid"] for op in got_b["operations"]] == ["items/pub"]
        async with connect(server.sync_url, server.token(user="bob")) as b2:
            resp = await b2.sync("rb2", resync_all=True)
            assert "pin" not in orjson.dumps(resp).decode()
        status, body = await server.http_sync(server.token(user="bob"), [
            {"type": "sync", "replicaId": "rb3", "timestamp": timestamp(), "operations": [], "baselines": [], "schemaVersion": 1, "since": None, "resyncAll": True}
        ])
        assert status == 200
        assert "secrets/1" not in orjson.dumps(body).decode()
        status, body = await server.http_sync(server.token(user="alice"), [
            {"type": "sync", "replicaId": "ra3", "timestamp": timestamp(), "operations": [], "baselines": [], "schemaVersion": 1, "since": None, "resyncAll": True}
        ])
        assert "secrets/1" in orjson.dumps(body).decode()


async def test_originator_placeholder_is_rewritten_for_the_initializing_user(server: RunningServer) -> None:
    only_me = base64.b64encode(b"u:$$_originator_$$:*").decode()
    async with connect(server.sync_url, server.token(user="carol")) as c:
        await c.sync("rc", operations=[initialize("notes/1", {"t": "mine"}, authz=only_me)])
    _status, body = await server.http_sync(server.token(user="carol"), [
        {"type": "sync", "replicaId": "rc2", "timestamp": timestamp(), "operations": [], "baselines": [], "schemaVersion": 1, "since": None, "resyncAll": True}
    ])
    ops = body["messages"][0]["operations"]
    assert base64.b64decode(ops[0]["authz"]) == b"u:carol:*"


async def test_http_push_pull(server: RunningServer) -> None:
    token = server.token(user="puller", type=ReplicaType.PUSH)
    status, body = await server.http_sync(token, [
        {"type": "presence-update", "replicaId": "rp", "presence": {"here": True}},
        {"type": "sync", "replicaId": "rp", "timestamp": timestamp(), "operations": [initialize("items/h", {"v": 1})], "baselines": [], "schemaVersion": 1, "since": None},
    ])
    assert status == 200
    types = [m["type"] for m in body["messages"]]
    assert types == ["presence-changed", "sync-resp"]
    status, body = await server.http_sync(token, [{"type": "op", "replicaId": "rp", "timestamp": timestamp(), "operations": [set_op("items/h", "v", 2)]}])
    assert [m["type"] for m in body["messages"]] == ["server-ack"]
    assert await admin_document(server, "items", "h") == {"v": 2}


async def test_disconnecting_removes_presence(server: RunningServer) -> None:
    async with connect(server.sync_url, server.token(user="alice")) as a:
        await a.sync("ra")
        async with connect(server.sync_url, server.token(user="bob")) as b:
            await b.sync("rb")
            await b.send({"type": "disconnecting", "replicaId": "rb", "reason": "unload"})
            assert (await a.wait_for("presence-offline"))["userId"] == "bob"


async def test_push_tokens_may_not_open_a_websocket(server: RunningServer) -> None:
    with pytest.raises(Exception) as info:
        async with connect(server.sync_url, server.token(type=ReplicaType.PUSH)):
            pass
    assert "403" in str(info.value)


async def visible_oids(server: RunningServer, user: str) -> set[str]:
    """What a fresh replica of `user` receives."""
    status, body = await server.http_sync(server.token(user=user), [
        {"type": "sync", "replicaId": f"fresh-{timestamp()}", "timestamp": timestamp(), "operations": [],
         "baselines": [], "schemaVersion": 1, "since": None, "resyncAll": True}
    ])
    assert status == 200
    (response,) = body["messages"]
    return {item["oid"] for item in response["operations"] + response["baselines"]}


async def test_data_private_to_another_user_is_forbidden_and_stores_nothing(server: RunningServer) -> None:
    """Mallory may not plant data that only bob sees, nor write into bob's private documents."""
    bob_only = base64.b64encode(b"u:bob:*").decode()
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="bob")) as b:
            await b.sync("rb", operations=[initialize("notes/bob", {"t": "bob's"}, authz=bob_only)])
            async with connect(server.sync_url, server.token(user="mallory")) as m:
                await m.sync("rm")
                before = await admin_info(server)
                await m.op("rm", [initialize("items/fine", {"v": 1}), set_op("notes/bob", "t", "pwned") | {"authz": bob_only}])
                assert (await m.wait_for("forbidden")) == {"type": "forbidden"}
                error = await m.wait_for("error")
                assert error["code"] == 4030 and "'op' message operations[1]" in error["message"]
                assert "base64('u:mallory:*')" in error["message"]
                resp = await m.sync("rm", since=timestamp(), operations=[initialize("items/fine2", {"v": 2})], baselines=[
                    {"oid": "notes/planted", "snapshot": {"t": "only bob sees this"}, "timestamp": timestamp(), "authz": bob_only}])
                assert resp == {"type": "forbidden"}
                assert "'sync' message baselines[0]" in (await m.wait_for("error"))["message"]
                # the connection keeps working
                await m.op("rm", [initialize("items/after", {"v": 3})])
                await m.wait_for("server-ack")
                # the first thing bob hears of is the op that was allowed
                assert [op["oid"] for op in (await b.wait_for("op-re"))["operations"]] == ["items/after"]
    after = await admin_info(server)
    assert after["operationsCount"] == before["operationsCount"] + 1
    assert after["baselinesCount"] == before["baselinesCount"]
    assert await visible_oids(server, "bob") == {"notes/bob", "items/after"}
    assert await admin_document(server, "notes", "bob") == {"t": "bob's"}
    # over HTTP: the same refusal among the answers, nothing stored
    status, body = await server.http_sync(server.token(user="mallory"), [
        {"type": "op", "replicaId": "rm", "timestamp": timestamp(), "operations": [initialize("notes/planted", {}, authz=bob_only)]}])
    assert status == 200
    assert [m["type"] for m in body["messages"]] == ["forbidden", "error"]
    assert body["messages"][1]["code"] == 4030
    assert (await admin_info(server))["operationsCount"] == after["operationsCount"]


async def test_offline_private_edits_with_the_placeholder_reach_the_senders_other_devices(
    server: RunningServer,
) -> None:
    """The client's opening `sync` carries its offline edits with the originator placeholder.
    The reference rewrote it only when the sync had nothing to send back, so edits made while
    someone else wrote were stored with it and reached nobody."""
    only_me = base64.b64encode(b"u:$$_originator_$$:*").decode()
    with trio.fail_after(20):
        async with connect(server.sync_url, server.token(user="carol")) as c:
            await c.sync("rc", operations=[initialize("items/1", {"v": 1})])
        async with connect(server.sync_url, server.token(user="dave")) as d:
            await d.sync("rd", resync_all=True)
            await d.op("rd", [initialize("items/2", {"v": 2})])  # while carol is offline
            await d.wait_for("server-ack")
        async with connect(server.sync_url, server.token(user="carol")) as c, connect(
            server.sync_url, server.token(user="carol")
        ) as c2:
            await c2.sync("rc2", resync_all=True)
            resp = await c.sync("rc", since=timestamp(), operations=[initialize("notes/offline", {"t": "mine"}, authz=only_me)])
            assert resp["type"] == "sync-resp" and resp["overwriteLocalData"] is False
            assert [op["oid"] for op in resp["operations"]] == ["items/2"]
            (op,) = (await c2.wait_for("op-re"))["operations"]
            assert op["oid"] == "notes/offline" and base64.b64decode(op["authz"]) == b"u:carol:*"
    assert await visible_oids(server, "carol") == {"items/1", "items/2", "notes/offline"}
    assert await visible_oids(server, "dave") == {"items/1", "items/2"}
