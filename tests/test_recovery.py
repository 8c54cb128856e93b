"""A library restored from a replica recovers what the restore lacked from its replicas'
histories (`sync.recovery`, `decisions._plan_recovery`): message by message against a real
shard, then through a library task.

The restore is made as `verdant-trio restore` leaves a shard: a copy of the library as it was
a moment before the loss (`VACUUM INTO`, what an asynchronous replica holds), marked restored.
What the live library went on to acknowledge after the copy is "the lost window".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from verdant_trio.engine.library import LibraryHost
from verdant_trio.engine.observe import NullObserver
from verdant_trio.engine.registry import Libraries
from verdant_trio.engine.settings import LibrarySettings
from verdant_trio.storage.restored import mark_restored, read_restore_mark, resynced_replicas
from verdant_trio.storage.shard import Shard
from verdant_trio.sync.decisions import Outcome
from verdant_trio.sync.protocol import ReplicaType, validate_client_message
from verdant_trio.sync.recovery import Recovery

from .fakes import RecordingPeer
from .test_library_core import Harness, op, t

WEEK_MS = 7 * 86_400_000


def restore(live: Harness, directory: Path, *, grace_ms: int = 0) -> Harness:
    """The live library's state right now, as a restore from a replica brings it back."""
    directory.mkdir()
    live.shard.conn.execute("VACUUM INTO ?", (str(directory / "lib.sqlite"),))
    restored = Harness(directory, now_ms=live.clock)
    with restored.shard.transaction():
        mark = mark_restored(
            restored.shard.conn, source="file:///replica/lib.sqlite",
            restored_at_ms=live.clock[0], tool="test",
        )
    restored.core.recovery = Recovery(mark, grace_ms=grace_ms, truancy_ms=WEEK_MS)
    return restored


def initialize(oid: str, n: int, **value: Any) -> dict[str, Any]:
    return op(oid, t(n), {"op": "initialize", "value": value})


def op_message(replica: str, n: int, operations: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "op", "replicaId": replica, "timestamp": t(n), "operations": operations}


def history(h: Harness) -> list[tuple[str, str, Any]]:
    return sorted((o.oid, o.timestamp, o.data()) for o in h.shard.operations_after(0))


def full_sync(h: Harness, peer: RecordingPeer, replica: str, n: int, **extra: Any) -> dict[str, Any]:
    """What a 3.6.3 client sends after `need-since` with `since: null` (see the design notes)."""
    return h.sync(peer, replica, t(n), since=None, resyncAll=False, **extra)


@pytest.fixture
def world(tmp_path: Path) -> tuple[Harness, Harness, list[dict[str, Any]]]:
    """alice (ra) and bob (rb) write and acknowledge; the replica copies the library; then
    alice writes items/3 and bob items/4, both acknowledged (`server-ack`), both relayed to
    the other: the lost window. Returns (live, restored, every operation ever acknowledged)."""
    live = Harness(tmp_path / "live")
    a, b = live.peer("alice"), live.peer("bob")
    live.sync(a, "ra", t(1))
    live.sync(b, "rb", t(1))
    before = [initialize("items/1", 2, v=1), initialize("items/2", 3, v=2)]
    live.send(a, op_message("ra", 2, before[:1]))
    live.send(b, op_message("rb", 3, before[1:]))
    live.ack_all(a, "ra", t(4))
    live.ack_all(b, "rb", t(4))
    restored = restore(live, tmp_path / "restored")
    a.take(), b.take()
    window = [initialize("items/3", 5, v=3), initialize("items/4", 6, v=4)]
    live.send(a, op_message("ra", 5, window[:1]))
    live.send(b, op_message("rb", 6, window[1:]))
    assert a.take("server-ack") and b.take("server-ack")
    assert [o["oid"] for m in b.take("op-re") for o in m["operations"]] == ["items/3"]
    assert [o["oid"] for m in a.take("op-re") for o in m["operations"]] == ["items/4"]
    assert restored.shard.operation_count() == 2  # the replica's copy lacks the window
    return live, restored, before + window


def test_the_lost_window_comes_back_from_the_replicas_histories(
    world: tuple[Harness, Harness, list[dict[str, Any]]],
) -> None:
    live, h, acknowledged = world
    a, b = h.peer("alice"), h.peer("bob")
    # alice reconnects believing she is in sync: asked for everything, nothing else happens
    outcome = h.send(a, {"type": "sync", "replicaId": "ra", "timestamp": t(10), "operations": [],
                         "baselines": [], "schemaVersion": 1, "since": t(6)})
    assert a.take() == [{"type": "need-since", "since": None}]
    assert (outcome.stored, outcome.resynced) == (0, 0)
    assert not b.inbox
    # her whole history: her own operations and bob's, in the order her client keeps them
    response = full_sync(h, a, "ra", 11, operations=acknowledged)
    assert response["overwriteLocalData"] is False  # without the mark: True, her copy wiped
    assert response["operations"] == []  # she has everything the server holds
    assert history(h) == history(live)  # stored once each, bob's items/2 not again under ra
    (relayed,) = b.take("op-re")
    assert [o["oid"] for o in relayed["operations"]] == ["items/3", "items/4"]
    assert relayed["replicaId"] == "ra"
    assert resynced_replicas(h.shard.conn) == {"ra"}
    assert h.core.recovery_waiting_for() == ["rb"]
    with h.shard.transaction():
        assert h.core.end_recovery_if_over() is None  # bob has not resynced
    # bob's history holds nothing the server lacks any more
    h.send(b, {"type": "sync", "replicaId": "rb", "timestamp": t(12), "operations": [],
               "baselines": [], "schemaVersion": 1, "since": t(6)})
    assert b.take("need-since")
    outcome_b = Outcome()
    message = validate_client_message({
        "type": "sync", "replicaId": "rb", "timestamp": t(13), "operations": acknowledged,
        "baselines": [], "schemaVersion": 1, "since": None,
    })
    with h.shard.transaction():
        h.core.handle(b, message, outcome_b)
    assert (outcome_b.recovered, outcome_b.resynced) == (0, 1)
    assert not a.take("op-re")  # nothing new for alice
    assert h.core.info()["restored"]["resynced"] == [  # type: ignore[index]
        {"replicaId": "ra", "resyncedAtMs": h.clock[0], "recoveredOperations": 2},
        {"replicaId": "rb", "resyncedAtMs": h.clock[0], "recoveredOperations": 0},
    ]
    with h.shard.transaction():
        assert h.core.end_recovery_if_over() == "all replicas resynced"
    assert read_restore_mark(h.shard.conn) is None


def test_the_recovered_operations_are_counted_and_go_to_everyone_else(
    world: tuple[Harness, Harness, list[dict[str, Any]]],
) -> None:
    _live, h, acknowledged = world
    a, b, c = h.peer("alice"), h.peer("bob"), h.peer("carol", ReplicaType.READ_ONLY_REALTIME)
    outcome = Outcome()
    message = validate_client_message({
        "type": "sync", "replicaId": "ra", "timestamp": t(11), "operations": acknowledged,
        "baselines": [], "schemaVersion": 1, "since": None,
    })
    with h.shard.transaction():
        h.core.handle(a, message, outcome)
    assert (outcome.recovered, outcome.stored, outcome.resynced) == (2, 2, 1)
    assert outcome.changed_history
    targets = [send.targets for send in outcome.sends if send.message["type"] == "op-re"]
    assert targets == [[b, c]]


def test_a_replica_created_in_the_lost_window_is_asked_too(tmp_path: Path) -> None:
    live = Harness(tmp_path / "live")
    a = live.peer("alice")
    live.sync(a, "ra", t(1), operations=[initialize("items/1", 1)])
    h = restore(live, tmp_path / "restored")
    # dave's replica first synced after the copy: the restored library has never heard of it
    d = h.peer("dave")
    assert h.sync(d, "rd", t(20), since=t(9)) == {"type": "need-since", "since": None}
    response = full_sync(h, d, "rd", 21, operations=[initialize("items/1", 1), initialize("items/9", 9)])
    assert response["overwriteLocalData"] is False
    assert [o[0] for o in history(h)] == ["items/1", "items/9"]


def test_without_the_mark_a_full_history_is_stored_twice_or_reset(
    world: tuple[Harness, Harness, list[dict[str, Any]]],
) -> None:
    """What the mark changes (why a restore needs it): under the ordinary rules a known
    replica's full history stores other replicas' operations again under its id when the
    server has nothing newer for it, and wipes its copy when it has."""
    _live, h, acknowledged = world
    h.core.recovery = None
    a, b = h.peer("alice"), h.peer("bob")
    assert full_sync(h, a, "ra", 11, operations=acknowledged)["overwriteLocalData"] is False
    stored = history(h)
    assert len(stored) == 5 and len({(o[0], o[1]) for o in stored}) == 4  # bob's items/2 twice
    h.send(b, op_message("rb", 20, [initialize("items/5", 20)]))  # newer than alice's position
    response = full_sync(h, a, "ra", 21, operations=[*acknowledged, initialize("items/6", 21)])
    assert response["overwriteLocalData"] is True
    assert h.shard.operations_for("items/6") == []  # what only her copy held is gone


def test_a_read_only_replica_is_not_asked(
    world: tuple[Harness, Harness, list[dict[str, Any]]],
) -> None:
    _live, h, _ = world
    r = h.peer("rita", ReplicaType.READ_ONLY_REALTIME)
    response = h.sync(r, "rr", t(10), since=t(1))
    assert response["type"] == "sync-resp"
    assert [o["oid"] for o in response["operations"]] == ["items/1", "items/2"]


def test_baselines_of_a_recovered_history_never_replace_newer_ones(tmp_path: Path) -> None:
    live = Harness(tmp_path / "live")
    a, b = live.peer("alice"), live.peer("bob")
    live.sync(a, "ra", t(1))
    live.sync(b, "rb", t(1))
    live.send(a, op_message("ra", 3, [initialize("items/1", 2, v="old"), initialize("items/2", 3, v=1)]))
    live.send(a, op_message("ra", 4, [op("items/1", t(4), {"op": "set", "name": "v", "value": "server"})]))
    live.send(b, op_message("rb", 5, [initialize("items/9", 5)]))  # the newest is never folded
    live.ack_all(a, "ra", t(6))
    live.ack_all(b, "rb", t(6))
    assert live.rebase().folded_operations == 3  # items/1 compacted at t4 on the server
    h = restore(live, tmp_path / "restored")
    a2, b2 = h.peer("alice"), h.peer("bob")
    baselines = [
        {"oid": "items/1", "snapshot": {"v": "older"}, "timestamp": t(3)},  # the server's is newer
        {"oid": "items/2", "snapshot": {"v": "client"}, "timestamp": t(8)},  # compacted further
    ]
    full_sync(h, a2, "ra", 11, baselines=baselines)
    assert h.shard.baseline("items/1").snapshot() == {"v": "server"}  # type: ignore[union-attr]
    assert h.shard.baseline("items/2").snapshot() == {"v": "client"}  # type: ignore[union-attr]
    # not relayed: a 3.6.3 client would store it over a newer baseline of its own
    assert not b2.take("op-re")
    resync = h.sync(h.peer("carol"), "rc", t(12), resyncAll=True)  # a reset gets it
    assert {x["oid"]: x["snapshot"] for x in resync["baselines"]}["items/2"] == {"v": "client"}


def test_a_baseline_recovered_from_one_history_reaches_only_those_it_cannot_set_back(
    tmp_path: Path,
) -> None:
    """Lost-window operations a client already folded come back only in its baseline; a
    replica that missed them needs that baseline, but a 3.6.3 client puts an incoming baseline
    over a newer one of its own. So it goes to connected replicas that resynced (the server's
    was at least as new as theirs then, and no global ack lets them fold meanwhile) and to each
    replica that resyncs later (when newer than its own); one that resynced and went away is
    asked again."""
    live = Harness(tmp_path / "live")
    peers = {name: live.peer(name) for name in ("alice", "bob", "carol", "dave")}
    for name, peer in peers.items():
        live.sync(peer, f"r{name[0]}", t(1))
    live.send(peers["alice"], op_message("ra", 2, [initialize("items/1", 2, v="restored")]))
    for name, peer in peers.items():
        live.ack_all(peer, f"r{name[0]}", t(3))
    h = restore(live, tmp_path / "restored")
    a, b, c, r = h.peer("alice"), h.peer("bob"), h.peer("carol"), h.peer("rita", ReplicaType.READ_ONLY_REALTIME)
    for peer, replica, n in ((b, "rb", 10), (c, "rc", 11)):  # bob resyncs; carol has not yet
        h.sync(peer, replica, t(n), since=t(3))
    bob = full_sync(h, b, "rb", 12, operations=[initialize("items/1", 2, v="restored")])
    assert "globalAckTimestamp" not in bob  # nobody folds while the library recovers
    dave = h.peer("dave")
    h.sync(dave, "rd", t(13), since=t(3))
    full_sync(h, dave, "rd", 14)
    h.core.detach(dave)  # dave resynced and left
    for peer in (b, c, r, dave):
        peer.take()
    # alice folded items/2, written and acknowledged in the lost window, at t(8)
    folded = {"oid": "items/2", "snapshot": {"v": "only in alice's baseline"}, "timestamp": t(8)}
    stale = {"oid": "items/1", "snapshot": {"v": "older"}, "timestamp": t(1)}
    h.sync(a, "ra", t(20), since=t(3))
    alice = full_sync(h, a, "ra", 21, baselines=[folded, stale])
    assert alice["baselines"] == []  # she has everything the server has, as new
    assert [m["baselines"] for m in b.take("op-re")] == [[folded]]  # resynced and connected
    assert [m.get("baselines") for m in c.take("op-re") + r.take("op-re")] == []  # nothing new
    assert resynced_replicas(h.shard.conn) == {"ra", "rb"}  # dave is asked again on return
    dave2 = h.peer("dave")
    assert h.sync(dave2, "rd", t(30), since=t(14)) == {"type": "need-since", "since": None}
    # carol resyncs now, holding items/1 as an operation only: she is sent both baselines
    carol = full_sync(h, c, "rc", 22, operations=[initialize("items/1", 2, v="restored")])
    assert sorted(x["oid"] for x in carol["baselines"]) == ["items/2"]  # items/1 is an op here
    with h.shard.transaction():
        h.core.rebase([])  # (the server folds as usual; still no global ack for clients)
    late = full_sync(h, h.peer("erin"), "re", 40, operations=[], baselines=[
        {"oid": "items/2", "snapshot": {"v": "newer of erin's"}, "timestamp": t(9)},
    ])
    assert [x["oid"] for x in late["baselines"]] == []  # erin's own is newer: not set back


def test_a_passive_replicas_stale_offline_edits_are_dropped_and_it_is_reset_after_the_merge(
    tmp_path: Path,
) -> None:
    live = Harness(tmp_path / "live")
    a, p = live.peer("alice"), live.peer("pat", ReplicaType.PASSIVE_REALTIME)
    live.sync(a, "ra", t(1))
    live.sync(p, "rp", t(1))
    live.send(a, op_message("ra", 2, [initialize("items/1", 2)]))
    live.ack_all(a, "ra", t(10))
    h = restore(live, tmp_path / "restored")
    a2, p2 = h.peer("alice"), h.peer("pat", ReplicaType.PASSIVE_REALTIME)
    window = initialize("items/2", 12)  # pat wrote it online in the lost window: acknowledged
    offline = initialize("items/3", 5)  # made offline long ago: older than alice's ack (t10)
    response = full_sync(h, p2, "rp", 13, operations=[initialize("items/1", 2), window, offline])
    assert response["overwriteLocalData"] is True
    assert sorted(o["oid"] for o in response["operations"]) == ["items/1", "items/2"]  # its own back
    assert [o[0] for o in history(h)] == ["items/1", "items/2"]
    (relayed,) = a2.take("op-re")
    assert [o["oid"] for o in relayed["operations"]] == ["items/2"]
    assert resynced_replicas(h.shard.conn) == {"rp"}


def test_a_recovered_library_behaves_exactly_like_one_never_restored(tmp_path: Path) -> None:
    """The issue's check: once every replica resynced and the mark is gone, the same messages
    get the same answers from the restored library and from the one it was restored from.

    In the window only alice writes (bob just receives), so alice's history brings it back
    under her own id, as the live library stored it; a recovered operation that came in another
    replica's history is stored under that replica's id, which only ever moves acknowledgements
    past "own" operations sooner."""
    live = Harness(tmp_path / "live")
    a, b = live.peer("alice"), live.peer("bob")
    live.sync(a, "ra", t(1))
    live.sync(b, "rb", t(1))
    live.send(a, op_message("ra", 2, [initialize("items/1", 2, v=1, tags=[])]))
    live.ack_all(a, "ra", t(3))
    live.ack_all(b, "rb", t(3))
    h = restore(live, tmp_path / "restored")
    window = [op("items/1", t(5), {"op": "set", "name": "v", "value": 2}), initialize("items/2", 6)]
    live.send(a, op_message("ra", 6, window))
    bob_has = [initialize("items/1", 2, v=1, tags=[]), *window]

    def reconnect(x: Harness) -> dict[str, RecordingPeer]:
        """alice and bob come back (new connections) and get in sync, as their clients would."""
        peers = {"alice": x.peer("alice"), "bob": x.peer("bob")}
        for user, replica, n in (("alice", "ra", 10), ("bob", "rb", 12)):
            peer = peers[user]
            answer = x.sync(peer, replica, t(n), since=t(6))
            if answer["type"] == "need-since":
                answer = full_sync(x, peer, replica, n + 1, operations=bob_has)
            if "ackThisNonce" in answer:
                x.send(peer, {"type": "ack", "replicaId": replica, "nonce": answer["ackThisNonce"]})
            x.send(peer, {"type": "ack", "replicaId": replica, "timestamp": t(n + 1)})
        for peer in peers.values():
            peer.take()
        return peers

    peers = {"live": reconnect(live), "restored": reconnect(h)}
    with h.shard.transaction():
        assert h.core.end_recovery_if_over() == "all replicas resynced"
    h.core.recovery = None  # what the library task does once that committed
    assert h.core.info() == live.core.info()
    assert h.core.info()["restored"] is None  # type: ignore[index]

    def script(x: Harness, peers: dict[str, RecordingPeer]) -> list[Any]:
        seen: list[Any] = []
        carol = x.peer("carol")
        peers["carol"] = carol
        seen.append(x.sync(carol, "rc", t(20), resyncAll=True))
        seen.append(x.sync(peers["bob"], "rb", t(21), since=t(13)))  # an ordinary reconnect
        x.send(peers["alice"], op_message("ra", 22, [op("items/2", t(22), {"op": "set", "name": "w", "value": 1})]))
        for replica, user in (("ra", "alice"), ("rb", "bob"), ("rc", "carol")):
            x.ack_all(peers[user], replica, t(23))
        seen.append(x.rebase().folded_operations)
        seen.append({oid: x.core.object_snapshot(oid) for oid in ("items/1", "items/2")})
        seen.append(x.sync(carol, "rc", t(24), resyncAll=True))
        seen.append(x.core.info())
        seen.append({user: peer.take() for user, peer in peers.items()})
        return orjson.loads(orjson.dumps(seen))

    assert script(h, peers["restored"]) == script(live, peers["live"])


async def test_a_library_task_reads_the_mark_and_clears_it_when_its_replicas_resynced(
    tmp_path: Path,
) -> None:
    """Through the engine: the mark is read when the library opens its shard, the recovery is
    counted, and the tick clears the mark (here once the one replica still waited for went
    truant); then the library is like any other."""
    path = tmp_path / "lib.sqlite"
    shard = Shard.open(path)
    with shard.transaction():
        for replica in ("ra", "rb"):
            shard.create_replica(replica, "alice", ReplicaType.REALTIME)
            shard.touch_replica(replica)
        shard.insert_operations("ra", [initialize("items/1", 1)])
        mark_restored(shard.conn, source="file:///r/lib.sqlite", restored_at_ms=shard.now_ms(), tool="t")
    shard.close()
    counted: list[tuple[str, int]] = []

    class Counting(NullObserver):
        def operations_recovered(self, count: int) -> None:
            counted.append(("operations_recovered", count))

        def replicas_resynced(self, count: int) -> None:
            counted.append(("replicas_resynced", count))

    settings = LibrarySettings(
        databases_dir=tmp_path, restore_grace_s=0, recovery_check_interval_s=0.2
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            registry = Libraries(settings, nursery, Counting())
            async with registry.use("lib") as host:
                await recover_through(host, counted)
            registry.stop_all()
    reopened = Shard.open(path)
    assert read_restore_mark(reopened.conn) is None
    reopened.close()



async def recover_through(host: LibraryHost, counted: list[tuple[str, int]]) -> None:
    assert host.core is not None and host.core.recovery is not None
    assert not host.recovered.is_set()
    alice = RecordingPeer(1, "alice")
    await host.attach(alice)
    sync = {"type": "sync", "replicaId": "ra", "timestamp": t(5), "operations": [],
            "baselines": [], "schemaVersion": 1}
    await host.submit(alice, [validate_client_message({**sync, "since": t(1)})], wait=True)
    assert alice.take() == [{"type": "need-since", "since": None}]
    history = [initialize("items/1", 1), initialize("items/2", 2)]
    await host.submit(alice, [validate_client_message({**sync, "since": None, "operations": history})], wait=True)
    assert alice.kinds() == ["sync-resp"]
    assert counted == [("replicas_resynced", 1), ("operations_recovered", 1)]
    info = await host.call(lambda core: core.info())
    assert info["restored"]["waitingFor"] == ["rb"]  # the other known replica
    assert info["restored"]["recoveredOperations"] == 1
    assert not host.recovered.is_set()
    truant_at = trio.current_time()
    await host.call(lambda core: core.shard.force_truant("rb"))
    await host.recovered.wait()  # on the tick, every 0.2 s here
    assert host.core.recovery is None
    assert trio.current_time() - truant_at < 10
    assert (await host.call(lambda core: core.info()))["restored"] is None
    await host.submit(alice, [validate_client_message({**sync, "since": t(5)})], wait=True)
    kinds = alice.kinds()
    assert "sync-resp" in kinds and "need-since" not in kinds  # an ordinary sync again
