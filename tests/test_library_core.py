"""The library's decisions, message by message, without sockets (sans-IO core + a real shard)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from verdant_trio.engine.envelopes import encode_sends
from verdant_trio.storage.shard import Shard
from verdant_trio.sync.decisions import LibraryCore, Outcome, decode_nonce
from verdant_trio.sync.protocol import ReplicaType, validate_client_message

from .fakes import RecordingPeer


class Harness:
    def __init__(self, tmp_path: Any, now_ms: list[int] | None = None) -> None:
        self.clock = now_ms or [1_000_000_000_000]
        self.shard = Shard.open(
            tmp_path / "lib.sqlite", truancy_minutes=60, now_ms=lambda: self.clock[0]
        )
        self.core = LibraryCore("lib", self.shard)
        self._keys = iter(range(1, 10_000))

    def peer(self, user: str, type: ReplicaType = ReplicaType.REALTIME) -> RecordingPeer:
        peer = RecordingPeer(next(self._keys), user, type)
        self.core.attach(peer)
        return peer

    def send(self, peer: RecordingPeer, message: dict[str, Any]) -> Outcome:
        outcome = Outcome()
        parsed = validate_client_message(message)
        with self.shard.transaction():
            self.core.handle(peer, parsed, outcome)
        for _kind, text, peers in encode_sends(outcome.sends):
            for target in peers:
                target.deliver(text)
        return outcome

    def rebase(self, online: list[str] | None = None) -> Any:
        with self.shard.transaction():
            return self.core.rebase(online or [])

    def sync(self, peer: RecordingPeer, replica: str, ts: str, **extra: Any) -> dict[str, Any]:
        message = {
            "type": "sync", "replicaId": replica, "timestamp": ts, "operations": [],
            "baselines": [], "schemaVersion": 1, "since": None,
        }
        message.update(extra)
        self.send(peer, message)
        return [m for m in peer.take() if m["type"] in ("sync-resp", "need-since", "forbidden")][-1]

    def ack_all(self, peer: RecordingPeer, replica: str, ts: str) -> None:
        """What a caught-up client does: ack the newest server order and a timestamp."""
        order = self.shard.latest_server_order()
        from verdant_trio.sync.decisions import encode_nonce

        self.send(peer, {"type": "ack", "replicaId": replica, "nonce": encode_nonce(order)})
        self.send(peer, {"type": "ack", "replicaId": replica, "timestamp": ts})


def op(oid: str, ts: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"oid": oid, "timestamp": ts, "data": data}


def t(n: int) -> str:
    return f"0001{1700000000000 + n:013d}-000000"


@pytest.fixture
def h(tmp_path: Any) -> Harness:
    return Harness(tmp_path)


def test_new_library_initialised_by_first_replica(h: Harness) -> None:
    a = h.peer("alice")
    resp = h.sync(a, "ra", t(3), operations=[op("items/1", t(1), {"op": "initialize", "value": {"v": 1}})])
    assert resp["overwriteLocalData"] is False
    assert resp["operations"] == []
    assert "ackThisNonce" not in resp
    assert h.shard.operation_count() == 1
    assert h.core.object_snapshot("items/1") == {"v": 1}


def test_existing_replica_gets_only_newer_operations(h: Harness) -> None:
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(2), operations=[op("items/1", t(1), {"op": "initialize", "value": {"v": 1}})])
    first = h.sync(b, "rb", t(3), resyncAll=True)
    assert first["overwriteLocalData"] is True
    h.send(b, {"type": "ack", "replicaId": "rb", "nonce": first["ackThisNonce"]})
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(5), "operations": [op("items/1", t(4), {"op": "set", "name": "v", "value": 2})]})
    again = h.sync(b, "rb", t(6), since=t(3))
    assert again["overwriteLocalData"] is False
    assert [o["timestamp"] for o in again["operations"]] == [t(4)]
    assert decode_nonce(again["ackThisNonce"]) == 2


def test_op_acks_sender_and_rebroadcasts_with_global_ack(h: Harness) -> None:
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(1))
    h.sync(b, "rb", t(2))
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(4), "operations": [op("items/1", t(3), {"op": "initialize", "value": {}})]})
    assert a.take("server-ack") == [{"type": "server-ack", "timestamp": t(4)}]
    (rebroadcast,) = b.take("op-re")
    assert rebroadcast["replicaId"] == "ra" and rebroadcast["globalAckTimestamp"] == t(2)
    assert not a.take("op-re")


def test_acknowledged_time_never_moves_backwards(h: Harness) -> None:
    """Differs from the reference (issue 6.3): a late, older timestamp ack is ignored."""
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(10))
    h.sync(b, "rb", t(10))
    h.send(a, {"type": "ack", "replicaId": "ra", "timestamp": t(20)})
    h.send(b, {"type": "ack", "replicaId": "rb", "timestamp": t(30)})
    assert h.core.global_ack() == t(20)
    h.send(a, {"type": "ack", "replicaId": "ra", "timestamp": t(5)})
    assert h.shard.replica("ra").acked_logical_time == t(20)  # type: ignore[union-attr]
    assert h.core.global_ack() == t(20)


def test_rebase_folds_acknowledged_history_without_changing_data(h: Harness) -> None:
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(1))
    h.sync(b, "rb", t(1))
    ops = [
        op("items/1", t(2), {"op": "initialize", "value": {"v": 1, "tags": []}}),
        op("items/1", t(3), {"op": "set", "name": "v", "value": 2}),
        op("items/1", t(4), {"op": "list-push", "name": "tags", "value": "a"}),
    ]
    # list-push targets the object itself here; it is a no-op on a non-list, as in the reference
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(5), "operations": ops})
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(7), "operations": [op("items/2", t(6), {"op": "initialize", "value": {}})]})
    before = h.core.object_snapshot("items/1")
    h.ack_all(a, "ra", t(8))
    h.ack_all(b, "rb", t(8))
    result = h.rebase()
    assert result.folded_operations == 3
    assert h.core.object_snapshot("items/1") == before == {"v": 2, "tags": []}
    baseline = h.shard.baseline("items/1")
    assert baseline is not None and baseline.timestamp == t(4)
    # the newest operation is never folded: its server order is what replicas acknowledge
    assert [o.oid for o in h.shard.operations_after(0)] == ["items/2"]


def test_late_older_operation_never_overwrites_a_baseline(h: Harness) -> None:
    """Differs from the reference (issue 6.1): the older value must not win after compaction."""
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(1))
    h.sync(b, "rb", t(1))
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(3), "operations": [op("items/1", t(2), {"op": "initialize", "value": {"v": 1}})]})
    h.send(b, {"type": "op", "replicaId": "rb", "timestamp": t(11), "operations": [op("items/1", t(10), {"op": "set", "name": "v", "value": "new"})]})
    h.send(b, {"type": "op", "replicaId": "rb", "timestamp": t(13), "operations": [op("items/9", t(12), {"op": "initialize", "value": {}})]})
    h.ack_all(a, "ra", t(20))
    h.ack_all(b, "rb", t(20))
    assert h.rebase().folded_operations == 2
    assert h.shard.baseline("items/1").timestamp == t(10)  # type: ignore[union-attr]
    # an offline edit made before the newer one arrives after compaction
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(21), "operations": [op("items/1", t(5), {"op": "set", "name": "v", "value": "old"})]})
    assert h.core.object_snapshot("items/1") == {"v": "new"}
    h.ack_all(a, "ra", t(30))
    h.ack_all(b, "rb", t(30))
    h.rebase()
    assert h.core.object_snapshot("items/1") == {"v": "new"}
    assert h.shard.baseline("items/1").snapshot() == {"v": "new"}  # type: ignore[union-attr]
    # a replica that resets receives the same state
    c = h.peer("carol")
    resp = h.sync(c, "rc", t(40), resyncAll=True)
    assert {b["oid"]: orjson.loads(orjson.dumps(b["snapshot"])) for b in resp["baselines"]}["items/1"] == {"v": "new"}


def test_rebase_stops_at_first_unacknowledged_operation_of_an_object(h: Harness) -> None:
    """An older operation not yet acknowledged blocks newer ones of the same object."""
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(1))
    h.sync(b, "rb", t(1))
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(3), "operations": [op("items/1", t(2), {"op": "initialize", "value": {"a": 0, "b": 0}})]})
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(7), "operations": [op("items/1", t(6), {"op": "set", "name": "b", "value": 6})]})
    h.ack_all(a, "ra", t(9))
    h.ack_all(b, "rb", t(9))
    # bob's edit made at t5 (before t6) arrives only now: its server order is newest, unacked
    h.send(b, {"type": "op", "replicaId": "rb", "timestamp": t(8), "operations": [op("items/1", t(5), {"op": "set", "name": "a", "value": 5})]})
    h.send(a, {"type": "ack", "replicaId": "ra", "timestamp": t(9)})
    h.rebase()
    baseline = h.shard.baseline("items/1")
    assert baseline is not None and baseline.timestamp == t(2)
    assert h.core.object_snapshot("items/1") == {"a": 5, "b": 6}


def test_truant_replica_reset_receives_complete_history(h: Harness) -> None:
    """Differs from the reference (issue 6.2): all baselines and ALL operations."""
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(1))
    resp = h.sync(b, "rb", t(1))
    for i in range(5):
        h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(10 + i), "operations": [op(f"items/{i}", t(10 + i), {"op": "initialize", "value": {"i": i}})]})
    # bob has seen the first three
    from verdant_trio.sync.decisions import encode_nonce

    h.send(b, {"type": "ack", "replicaId": "rb", "nonce": encode_nonce(3)})
    assert h.shard.force_truant("rb")
    resp = h.sync(b, "rb", t(20), since=t(1))
    assert resp["overwriteLocalData"] is True
    assert sorted(o["oid"] for o in resp["operations"]) == [f"items/{i}" for i in range(5)]


def test_up_to_date_truant_replica_is_not_reset(h: Harness) -> None:
    a = h.peer("alice")
    h.sync(a, "ra", t(1), operations=[op("items/1", t(1), {"op": "initialize", "value": {}})])
    h.send(a, {"type": "ack", "replicaId": "ra", "nonce": __import__("verdant_trio.sync.decisions", fromlist=["x"]).encode_nonce(1)})
    h.shard.force_truant("ra")
    resp = h.sync(a, "ra", t(5), since=t(1))
    assert resp["overwriteLocalData"] is False


def test_reset_with_full_history_offer_gets_baselines_too(h: Harness) -> None:
    """A replica told to overwrite always gets everything (not just ops after its position)."""
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(1))
    h.sync(b, "rb", t(1))
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(3), "operations": [op("items/1", t(2), {"op": "initialize", "value": {"v": 1}})]})
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(5), "operations": [op("items/2", t(4), {"op": "initialize", "value": {}})]})
    h.ack_all(a, "ra", t(6))
    h.ack_all(b, "rb", t(6))
    h.rebase()
    assert h.shard.baseline("items/1") is not None
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(9), "operations": [op("items/4", t(8), {"op": "initialize", "value": {}})]})
    # bob has not seen items/4 and offers "everything from the start": he must reset to the
    # server's state, which needs the baselines too (the reference sent only items/4)
    resp = h.sync(b, "rb", t(10), since=None, operations=[op("items/3", t(7), {"op": "initialize", "value": {}})])
    assert resp["overwriteLocalData"] is True
    assert [x["oid"] for x in resp["baselines"]] == ["items/1"]
    assert [x["oid"] for x in resp["operations"]] == ["items/2", "items/4"]
    assert h.shard.operations_for("items/3") == []


def test_resync_all_forgets_the_replica(h: Harness) -> None:
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(1), operations=[op("items/1", t(1), {"op": "initialize", "value": {}})])
    h.sync(b, "rb", t(2), resyncAll=True)
    resp = h.sync(b, "rb", t(3), resyncAll=True)
    assert resp["overwriteLocalData"] is True
    assert len(resp["operations"]) == 1


def test_duplicate_operations_are_ignored(h: Harness) -> None:
    a = h.peer("alice")
    message = {"type": "op", "replicaId": "ra", "timestamp": t(2), "operations": [op("items/1", t(1), {"op": "initialize", "value": {}})]}
    h.sync(a, "ra", t(0))
    h.send(a, message)
    h.send(a, message)
    assert h.shard.operation_count() == 1
    assert h.shard.latest_server_order() == 1


def test_passive_replicas_count_for_global_ack_only_while_online(h: Harness) -> None:
    a = h.peer("alice")
    p = h.peer("pat", ReplicaType.PASSIVE_REALTIME)
    h.sync(a, "ra", t(10))
    h.sync(p, "rp", t(5))
    assert h.core.global_ack() == t(5)  # connected: it counts
    h.core.detach(p)
    assert h.core.global_ack() == t(10)
    assert h.shard.global_ack(["rp"]) == t(5)


def test_rebase_marks_files_whose_refs_disappear(h: Harness) -> None:
    a = h.peer("alice")
    h.sync(a, "ra", t(1))
    h.shard.put_file("f1", "photo.png", "image/png")
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(3), "operations": [
        op("items/1", t(2), {"op": "initialize", "value": {"image": {"@@type": "file", "id": "f1"}}}),
    ]})
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(5), "operations": [
        op("items/1", t(4), {"op": "set", "name": "image", "value": None}),
    ]})
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(7), "operations": [
        op("items/2", t(6), {"op": "initialize", "value": {}}),
    ]})
    h.ack_all(a, "ra", t(8))
    result = h.rebase()
    assert result.deleted_file_ids == ["f1"]
    row = h.shard.file("f1")
    assert row is not None and row.pending_delete_at_ms == h.clock[0]


def test_info_reports_replicas_and_counts(h: Harness) -> None:
    a = h.peer("alice")
    assert h.core.info() is None
    h.sync(a, "ra", t(1), operations=[op("items/1", t(1), {"op": "initialize", "value": {}})])
    info = h.core.info()
    assert info is not None
    assert info["operationsCount"] == 1 and info["latestServerOrder"] == 1
    assert info["replicas"][0]["id"] == "ra" and info["replicas"][0]["userId"] == "alice"
    assert info["replicas"][0]["truant"] is False
    h.shard.force_truant("ra")
    assert h.core.info()["replicas"][0]["truant"] is True  # type: ignore[index]


def test_hydrate_resolves_nested_objects_and_cycles(h: Harness) -> None:
    a = h.peer("alice")
    h.sync(a, "ra", t(0), operations=[
        op("items/1", t(1), {"op": "initialize", "value": {"child": {"@@type": "ref", "id": "items/1:c"}, "f": {"@@type": "file", "id": "f9"}}}),
        op("items/1:c", t(2), {"op": "initialize", "value": {"back": {"@@type": "ref", "id": "items/1"}, "n": 1}}),
    ])
    doc = h.core.hydrate("items/1", lambda fid: {"id": fid})
    assert doc == {"child": {"back": None, "n": 1}, "f": {"id": "f9"}}


def test_passive_replica_offline_changes_older_than_the_global_ack_are_discarded(h: Harness) -> None:
    """`ReplicaType`: passive replicas' offline changes are discarded on reconnect. Clients have
    compacted past them (a passive replica holds nothing back while offline), so they could never
    be applied the same everywhere."""
    a, b = h.peer("alice"), h.peer("bob")
    p = h.peer("pat", ReplicaType.PASSIVE_REALTIME)
    h.sync(a, "ra", t(1), operations=[op("items/1", t(1), {"op": "initialize", "value": {"tags": []}})])
    h.sync(b, "rb", t(2))
    h.sync(p, "rp", t(2))
    h.core.detach(p)  # pat goes offline, edits at t5
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(11), "operations": [op("items/1", t(10), {"op": "set", "name": "v", "value": "a"})]})
    h.send(a, {"type": "ack", "replicaId": "ra", "timestamp": t(12)})
    h.send(b, {"type": "ack", "replicaId": "rb", "timestamp": t(12)})
    assert h.core.global_ack() == t(12)
    h.core.attach(p)
    resp = h.sync(p, "rp", t(20), since=t(2), operations=[op("items/1", t(5), {"op": "set", "name": "v", "value": "pat"})])
    assert resp["overwriteLocalData"] is True
    assert h.core.object_snapshot("items/1") == {"tags": [], "v": "a"}
    assert all(o.timestamp != t(5) for o in h.shard.operations_for("items/1"))


def test_passive_replica_changes_newer_than_the_global_ack_are_kept(h: Harness) -> None:
    a = h.peer("alice")
    p = h.peer("pat", ReplicaType.PASSIVE_REALTIME)
    h.sync(a, "ra", t(1), operations=[op("items/1", t(1), {"op": "initialize", "value": {}})])
    h.sync(p, "rp", t(2))
    resp = h.sync(p, "rp", t(20), since=t(2), operations=[op("items/1", t(15), {"op": "set", "name": "v", "value": "pat"})])
    assert resp["overwriteLocalData"] is False
    assert h.core.object_snapshot("items/1") == {"v": "pat"}


def test_a_connected_passive_replica_holds_the_broadcast_global_ack(h: Harness) -> None:
    a = h.peer("alice")
    p = h.peer("pat", ReplicaType.PASSIVE_REALTIME)
    h.sync(a, "ra", t(10))
    h.sync(p, "rp", t(3))
    assert h.core.global_ack() == t(3)
    h.core.detach(p)
    assert h.core.global_ack() == t(10)


@pytest.mark.parametrize("private", [False, True], ids=["public", "with-private-data"])
def test_sync_response_never_returns_the_syncing_replicas_own_new_operations(
    h: Harness, private: bool
) -> None:
    """The history a sync answers with is read before the replica's offered operations are
    stored, whether it is built by SQLite (no private data) or filtered per user (private data
    in it): both must say the same."""
    import base64

    a = h.peer("alice")
    h.sync(a, "ra", t(2), operations=[op("items/1", t(1), {"op": "initialize", "value": {"v": 1}})])
    h.ack_all(a, "ra", t(2))
    b = h.peer("bob")
    h.sync(b, "rb", t(3))
    h.ack_all(b, "rb", t(3))
    h.core.detach(b)  # bob goes offline; alice writes meanwhile
    later = op("items/3", t(4), {"op": "initialize", "value": {"v": 3}})
    if private:
        later["authz"] = base64.b64encode(b"u:alice:*").decode()
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(4), "operations": [later]})
    b = h.peer("bob")
    offline = op("items/2", t(5), {"op": "initialize", "value": {"v": 2}})
    resp = h.sync(b, "rb", t(6), operations=[offline], since=t(3))
    assert resp["overwriteLocalData"] is False
    assert [o["oid"] for o in resp["operations"]] == ([] if private else ["items/3"])
    assert decode_nonce(resp["ackThisNonce"]) == 2  # alice's op, not bob's own (3)
    assert [o.oid for o in h.shard.operations_after(0)] == ["items/1", "items/3", "items/2"]


def test_private_operations_beside_public_baselines_in_a_reset(h: Harness) -> None:
    """A reset carries baselines built by SQLite and operations filtered per user side by side."""
    import base64

    a = h.peer("alice")
    h.sync(a, "ra", t(2), operations=[op("items/1", t(1), {"op": "initialize", "value": {"v": 1}})])
    private = op("items/2", t(3), {"op": "initialize", "value": {"v": 2}})
    private["authz"] = base64.b64encode(b"u:alice:*").decode()
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(3), "operations": [private]})
    h.ack_all(a, "ra", t(3))
    assert h.rebase(["ra"]).folded_operations == 1  # the newest operation always stays
    for user, replica, visible in (("bob", "rb", []), ("alice", "ra2", ["items/2"])):
        resp = h.sync(h.peer(user), replica, t(4))
        assert resp["overwriteLocalData"] is True
        assert [b["oid"] for b in resp["baselines"]] == ["items/1"]
        assert [o["oid"] for o in resp["operations"]] == visible


def private_op(oid: str, ts: str, key: str, value: Any = None) -> dict[str, Any]:
    return {**op(oid, ts, {"op": "initialize", "value": value or {"v": oid}}), "authz": key}


def refusal(peer: RecordingPeer) -> dict[str, Any]:
    """The `forbidden` and the error saying why, and nothing else, are what the sender got."""
    forbidden, error = peer.take()
    assert forbidden == {"type": "forbidden"}
    assert error["type"] == "error" and error["code"] == 4030
    return error


def test_an_op_private_to_another_user_is_refused_whole(h: Harness) -> None:
    from verdant_trio.sync.authz import only_user

    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(2), operations=[op("items/1", t(1), {"op": "initialize", "value": {"v": 1}})])
    h.sync(b, "rb", t(3))
    a.take(), b.take()
    before = h.core.info()
    outcome = h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(6), "operations": [
        op("items/ok", t(4), {"op": "initialize", "value": {}}),
        private_op("items/planted", t(5), only_user("bob")),
    ]})
    error = refusal(a)
    assert "operations[1]" in error["message"] and "base64('u:alice:*')" in error["message"]
    assert b.take() == []  # bob hears of nothing, neither op
    assert outcome.stored == 0 and not outcome.changed_history
    assert h.core.info() == before  # no operation, no acknowledged time, no touch
    assert [o.oid for o in h.shard.operations_after(0)] == ["items/1"]


def test_a_sync_with_a_baseline_private_to_another_user_stores_nothing(h: Harness) -> None:
    from verdant_trio.sync.authz import only_user

    m = h.peer("mallory")
    h.send(m, {
        "type": "sync", "replicaId": "rm", "timestamp": t(3), "schemaVersion": 1, "since": None,
        "operations": [op("items/1", t(1), {"op": "initialize", "value": {}})],
        "baselines": [{"oid": "items/0", "snapshot": {}, "timestamp": t(1)},
                      {"oid": "items/2", "snapshot": {"x": 1}, "timestamp": t(2), "authz": only_user("alice")}],
    })
    assert "baselines[1]" in refusal(m)["message"]
    assert h.core.info() is None  # not even a replica record: the library is still empty
    assert m.replica_id is None


def test_the_originator_placeholder_means_the_sender_in_a_library_with_data(h: Harness) -> None:
    """The client sends offline private edits in its opening `sync` with the placeholder; the
    reference rewrote it only when the sync had nothing to send back, so when someone else had
    written meanwhile the edits were stored with it and reached nobody, not even the sender's
    other devices."""
    from verdant_trio.sync.authz import ORIGINATOR_KEY, only_user

    a = h.peer("alice")
    h.sync(a, "ra", t(2), operations=[op("items/1", t(1), {"op": "initialize", "value": {"v": 1}})])
    h.ack_all(a, "ra", t(2))
    h.core.detach(a)  # alice goes offline
    a2, b = h.peer("alice"), h.peer("bob")
    h.sync(a2, "ra2", t(3))
    h.sync(b, "rb", t(4))
    h.send(b, {"type": "op", "replicaId": "rb", "timestamp": t(5),
               "operations": [op("items/2", t(5), {"op": "initialize", "value": {"v": 2}})]})
    a2.take(), b.take()
    h.core.attach(a)
    offline = private_op("notes/1", t(6), ORIGINATOR_KEY, {"t": "written offline"})
    resp = h.sync(a, "ra", t(7), operations=[offline], since=t(2))
    assert resp["type"] == "sync-resp" and resp["overwriteLocalData"] is False
    assert [o["oid"] for o in resp["operations"]] == ["items/2"]
    stored = [o for o in h.shard.operations_after(0) if o.oid == "notes/1"]
    assert [o.authz for o in stored] == [only_user("alice")]
    (rebroadcast,) = a2.take("op-re")
    assert [o["authz"] for o in rebroadcast["operations"]] == [only_user("alice")]
    assert [o for m in b.take("op-re") for o in m["operations"]] == []  # still private
    for user, replica, visible in (("alice", "ra3", ["items/1", "items/2", "notes/1"]),
                                   ("bob", "rb2", ["items/1", "items/2"])):
        resp = h.sync(h.peer(user), replica, t(8))
        assert [o["oid"] for o in resp["operations"]] == visible


def test_an_op_with_the_placeholder_is_private_to_its_sender(h: Harness) -> None:
    from verdant_trio.sync.authz import ORIGINATOR_KEY, only_user

    a = h.peer("alice")
    h.sync(a, "ra", t(2), operations=[op("items/1", t(1), {"op": "initialize", "value": {"v": 1}})])
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(4),
               "operations": [private_op("notes/2", t(3), ORIGINATOR_KEY)]})
    assert [o.authz for o in h.shard.operations_after(0) if o.oid == "notes/2"] == [only_user("alice")]


def test_a_user_id_with_a_colon_is_told_it_cannot_own_private_data(h: Harness) -> None:
    from verdant_trio.sync.authz import ORIGINATOR_KEY

    g = h.peer("github:123")
    h.send(g, {"type": "op", "replicaId": "rg", "timestamp": t(2),
               "operations": [private_op("notes/1", t(1), ORIGINATOR_KEY)]})
    assert "cannot own private data" in refusal(g)["message"]
    assert h.shard.operation_count() == 0


def replica_statements(h: Harness, message: dict[str, Any], peer: RecordingPeer) -> list[str]:
    """The statements handling `message` runs that read a replica's row or touch it."""
    seen: list[str] = []

    def trace(cursor: Any, sql: str, bindings: Any) -> bool:
        if 'FROM "ReplicaInfo" WHERE id' in sql or "lastSeenWallClockTime = ?" in sql:
            seen.append(sql)
        return True

    h.shard.conn.exec_trace = trace
    try:
        h.send(peer, message)
    finally:
        h.shard.conn.exec_trace = None
    return seen


def test_what_the_shard_caches_about_a_replica_goes_when_it_goes(h: Harness) -> None:
    """Every tab or device is a new replica id: a departed one must not stay cached while the
    shard is open, and a connected one must keep the saving (no owner SELECT, no last-seen
    UPDATE per message)."""
    stay, leave = h.peer("alice"), h.peer("bob")
    h.sync(stay, "r-stay", t(1))
    h.sync(leave, "r-leave", t(2))
    for peer, replica in ((stay, "r-stay"), (leave, "r-leave")):
        h.send(peer, {"type": "ack", "replicaId": replica, "timestamp": t(3)})  # now cached
    ack = {"type": "ack", "replicaId": "r-stay", "timestamp": t(4)}
    assert replica_statements(h, ack, stay) == []

    h.core.detach(leave)
    assert "r-leave" not in h.shard._owners and "r-leave" not in h.shard._touched_ms
    assert replica_statements(h, {**ack, "timestamp": t(5)}, stay) == []
    # it comes back on a new connection: read once, then cached again
    back = h.peer("bob")
    again = {"type": "ack", "replicaId": "r-leave", "timestamp": t(6)}
    assert len(replica_statements(h, again, back)) == 2  # its owner, its last-seen time
    assert replica_statements(h, {**again, "timestamp": t(7)}, back) == []


def test_a_message_handled_after_its_connection_went_keeps_data_not_presence(h: Harness) -> None:
    """A connection's last messages can reach the library after its departure was handled:
    the operation is stored, but a presence update must not bring the user back (nobody would
    ever remove it: a ghost in every `peerPresence`), nor re-cache the replica."""
    watcher, leaving = h.peer("alice"), h.peer("bob")
    h.sync(watcher, "ra", t(1))
    h.sync(leaving, "rb", t(2))
    h.core.detach(leaving)
    h.send(leaving, {"type": "op", "replicaId": "rb", "timestamp": t(3),
                     "operations": [op("items/1", t(3), {"op": "initialize", "value": {}})]})
    h.send(leaving, {"type": "presence-update", "replicaId": "rb", "presence": {"here": True}})
    assert h.shard.operation_count() == 1
    assert [m["type"] for m in watcher.take()] == ["op-re"]
    assert h.core.presence.get("bob") is None
    assert "rb" not in h.shard._owners and "rb" not in h.shard._touched_ms


def test_a_replica_that_wrote_while_behind_is_acknowledged_past_its_own_writes(h: Harness) -> None:
    """Bob writes before he has acknowledged alice's operation, then acknowledges it (3.6.3
    clients acknowledge by timestamp): he has seen his own operations too, so compaction can
    fold alice's. The reference left him acknowledged at her operation, below his own, and the
    library never compacted past it while nobody else wrote (an interop test flaked on it)."""
    a, b = h.peer("alice"), h.peer("bob")
    h.sync(a, "ra", t(1))
    h.sync(b, "rb", t(2))
    h.send(a, {"type": "op", "replicaId": "ra", "timestamp": t(3),
               "operations": [op("items/a", t(3), {"op": "initialize", "value": {"v": 1}})]})
    h.send(b, {"type": "op", "replicaId": "rb", "timestamp": t(5), "operations": [
        op("items/b1", t(4), {"op": "initialize", "value": {}}),
        op("items/b2", t(5), {"op": "initialize", "value": {}}),
    ]})
    assert h.shard.replica("rb").acked_server_order == 0  # type: ignore[union-attr]  # behind
    h.send(b, {"type": "ack", "replicaId": "rb", "timestamp": t(3)})  # he has alice's op now
    assert h.shard.replica("rb").acked_server_order == 3  # type: ignore[union-attr]
    h.send(a, {"type": "ack", "replicaId": "ra", "timestamp": t(5)})
    assert h.shard.replica("ra").acked_server_order == 3  # type: ignore[union-attr]
    h.rebase()
    assert [o.oid for o in h.shard.operations_after(0)] == ["items/b2"]  # b2: not before the ack
