"""Smoke tests for the interop harness: real Verdant 3.6.3 clients syncing
through the server under test (ours by default; see harness.server_command).
"""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import ClientFactory
from .harness import NodeClient, converged, gather

pytestmark = pytest.mark.interop


async def _doc_matches(client: NodeClient, collection: str, id: str, **expected: Any) -> Any:
    doc = await client.get(collection, id)
    if doc is None:
        return None
    return doc if all(doc.get(k) == v for k, v in expected.items()) else None


@pytest.mark.parametrize("transport", ["realtime", "pull"])
async def test_two_clients_converge_on_create_update_delete(
    make_client: ClientFactory, transport: str
) -> None:
    alice, bob = await gather(
        lambda: make_client("alice", transport=transport),
        lambda: make_client("bob", transport=transport),
    )

    # create on alice -> appears on bob
    item_id = await alice.put("items", {"id": "item-1", "content": "milk", "tags": ["dairy"]})
    assert item_id == "item-1"
    cat_id = await alice.put("categories", {"name": "groceries", "metadata": {"color": "green"}})
    seen = await bob.wait_until(lambda: _doc_matches(bob, "items", "item-1", content="milk"))
    assert seen["tags"] == ["dairy"]
    assert seen["purchased"] is False and seen["categoryId"] is None and seen["comments"] == []
    await bob.wait_until(
        lambda: _doc_matches(bob, "categories", cat_id, metadata={"color": "green"})
    )

    # nested updates on bob -> appear on alice
    await bob.update(
        "items",
        "item-1",
        set={"content": "oat milk", "purchased": True, "categoryId": cat_id},
        push={"tags": "vegan", "comments": {"id": "c1", "content": "buy 2", "authorId": "bob"}},
    )
    await bob.update("categories", cat_id, set={"metadata.color": "blue"})
    doc = await alice.wait_until(
        lambda: _doc_matches(alice, "items", "item-1", content="oat milk", purchased=True)
    )
    assert doc["categoryId"] == cat_id
    assert doc["tags"] == ["dairy", "vegan"]
    assert doc["comments"] == [{"id": "c1", "content": "buy 2", "authorId": "bob"}]
    await alice.wait_until(
        lambda: _doc_matches(alice, "categories", cat_id, metadata={"color": "blue"})
    )

    # list item removal on alice -> bob
    await alice.update("items", "item-1", remove_at={"tags": 0})
    await bob.wait_until(lambda: _doc_matches(bob, "items", "item-1", tags=["vegan"]))

    # delete on bob -> gone on alice; both converge on identical state
    await bob.delete("items", "item-1")
    assert await bob.get("items", "item-1") is None  # applied locally right away

    async def gone_on_alice() -> bool:
        return await alice.get("items", "item-1") is None

    await alice.wait_until(gone_on_alice)
    assert await converged([alice, bob], "items") == []
    cats = await converged([alice, bob], "categories")
    assert [c["name"] for c in cats] == ["groceries"]

    for c in (alice, bob):
        assert await c.errors() == []


async def test_late_joiner_gets_everything(make_client: ClientFactory) -> None:
    # the watcher proves the server has alice's changes before she crashes
    alice, watcher = await gather(lambda: make_client("alice"), lambda: make_client("watcher"))
    for i in range(5):
        await alice.put("items", {"id": f"i{i}", "content": f"item {i}", "tags": [str(i)]})
    await alice.update("items", "i1", set={"purchased": True}, push={"tags": "x"})
    await alice.update(
        "items", "i2", push={"comments": {"id": "c", "content": "hi", "authorId": "alice"}}
    )
    await alice.delete("items", "i3")
    expected = await alice.list("items")
    assert [d["id"] for d in expected] == ["i0", "i1", "i2", "i4"]
    assert await converged([alice, watcher], "items") == expected

    # alice's device crashes; a brand-new replica joins and gets everything
    await alice.kill()
    late = await make_client("late", user="alice")

    async def has_all() -> list[dict[str, Any]] | None:
        docs = await late.list("items")
        return docs if docs == expected else None

    await late.wait_until(has_all, message="late joiner receives full state")
    i1 = await late.get("items", "i1")
    assert i1 is not None and i1["tags"] == ["1", "x"]
    assert await late.get("items", "i3") is None
    # and it can write into the shared state
    await late.update("items", "i0", set={"content": "from late"})
    await watcher.wait_until(lambda: _doc_matches(watcher, "items", "i0", content="from late"))


async def test_peer_presence_with_profile(make_client: ClientFactory) -> None:
    # One after the other, not gathered: 3.6.3 applies a sync-resp's peer list (which replaces
    # all peers) only after that message's storage writes, and a presence-changed arriving just
    # after it is applied first, then erased. Had bob joined while alice's first sync-resp was
    # being handled, alice would not see him until his next update (a client race, not the
    # server's: the wire shows sync-resp, then bob's presence-changed; see the interop README).
    # `make_client` returns once alice's sync-resp presence step has run.
    alice = await make_client("alice", initial_presence={"status": "here", "cursor": 0})
    bob = await make_client("bob", initial_presence={"status": "away", "cursor": 5})

    async def alice_sees_bob() -> dict[str, Any] | None:
        return await _peer(alice, "bob")

    bob_info = await alice.wait_until(alice_sees_bob, message="alice sees bob's presence")
    assert bob_info["presence"] == {"status": "away", "cursor": 5}
    assert bob_info["profile"]["id"] == "bob"
    assert bob_info["replicaId"] == (await bob.status())["replicaId"]

    # own profile is filled in from the server too
    me = (await alice.presence())["self"]
    assert me["profile"]["id"] == "alice"
    assert me["id"] == "alice"

    # presence updates propagate
    await bob.presence_update({"cursor": 42})

    async def bob_moved() -> dict[str, Any] | None:
        info = await _peer(alice, "bob")
        return info if info and info["presence"].get("cursor") == 42 else None

    moved = await alice.wait_until(bob_moved, message="bob's presence update reaches alice")
    assert moved["presence"]["status"] == "away"

    # bob sees alice as well
    alice_info = await bob.wait_until(lambda: _peer(bob, "alice"), message="bob sees alice")
    assert alice_info["profile"]["id"] == "alice"

    # bob leaves -> alice sees him go
    await bob.close()

    async def bob_gone() -> bool:
        return "bob" not in (await alice.presence())["peers"]

    await alice.wait_until(bob_gone, message="bob leaves alice's peers after closing")


async def _peer(client: NodeClient, user: str) -> dict[str, Any] | None:
    peers: dict[str, dict[str, Any]] = (await client.presence())["peers"]
    return peers.get(user)


async def test_file_roundtrip_between_clients(make_client: ClientFactory) -> None:
    alice, bob = await gather(lambda: make_client("alice"), lambda: make_client("bob"))
    await alice.put("items", {"id": "with-file", "content": "photo"})
    payload = bytes(range(256)) * 8
    info = await alice.attach_file(
        "items", "with-file", "image", payload, name="pic.bin", type="image/x-test"
    )
    assert info["name"] == "pic.bin" and info["type"] == "image/x-test" and not info["loading"]
    assert await alice.file_content("items", "with-file", "image") == payload

    async def bob_has_file() -> dict[str, Any] | None:
        if await bob.get("items", "with-file") is None:
            return None
        fi = await bob.file_info("items", "with-file", "image")
        return fi if fi and not fi["loading"] and not fi["failed"] and fi["url"] else None

    remote = await bob.wait_until(bob_has_file, message="bob sees alice's uploaded file")
    assert remote["id"] == info["id"]
    assert remote["name"] == "pic.bin"
    assert remote["type"] == "image/x-test"

    # the URL may briefly 404 while the server finishes storing the upload
    async def bob_downloads() -> bytes | None:
        return await bob.file_content("items", "with-file", "image")

    assert await bob.wait_until(bob_downloads, message="bob downloads the file") == payload
