"""When a library restored from a replica has recovered (`recovery`), decided without a
database: who is still waited for, and when the restored mark may go."""

from __future__ import annotations

import pytest

from verdant_trio.sync.protocol import ReplicaType
from verdant_trio.sync.recovery import Recovery, RestoreMark, must_resync
from verdant_trio.sync.store import ReplicaRow

DAY_MS = 86_400_000
MARK = RestoreMark(
    restored_at_ms=10 * DAY_MS, source="file:///r/lib.sqlite", latest_server_order=5,
    newest_timestamp="t", replica_count=4, tool="test",
)
RECOVERY = Recovery(MARK, grace_ms=DAY_MS, truancy_ms=7 * DAY_MS)


def row(replica_id: str, type: ReplicaType = ReplicaType.REALTIME, seen_ms: int = 10 * DAY_MS) -> ReplicaRow:
    return ReplicaRow(replica_id, "user", seen_ms, None, int(type), 0)


def truant(replica: ReplicaRow) -> bool:
    return replica.last_seen_ms is not None and replica.last_seen_ms < 5 * DAY_MS


def test_every_replica_that_may_write_is_asked_and_read_only_ones_are_not() -> None:
    assert [t for t in ReplicaType if must_resync(t)] == [
        ReplicaType.REALTIME, ReplicaType.PUSH, ReplicaType.PASSIVE_REALTIME, ReplicaType.PASSIVE_PUSH,
    ]


def test_waiting_for_the_known_writers_that_have_not_resynced_and_are_not_truant() -> None:
    replicas = [
        row("active"), row("push", ReplicaType.PUSH), row("passive", ReplicaType.PASSIVE_REALTIME),
        row("reader", ReplicaType.READ_ONLY_REALTIME), row("gone", seen_ms=1), row("done"),
        ReplicaRow("odd-type", "user", None, None, 99, 0),
    ]
    assert RECOVERY.waiting_for(replicas, ["done"], truant) == ["active", "passive", "push"]
    assert RECOVERY.waiting_for(replicas, ["done", "active", "push", "passive"], truant) == []


@pytest.mark.parametrize(
    ("elapsed_ms", "waiting", "over"),
    [
        (0, 0, None),  # everyone resynced at once: replicas it cannot know of get the grace
        (DAY_MS - 1, 0, None),
        (DAY_MS, 0, "all replicas resynced"),
        (DAY_MS, 1, None),  # a known replica has not come back yet
        (7 * DAY_MS - 1, 3, None),
        (7 * DAY_MS, 3, "truancy period passed"),  # whoever is still away is truant now
    ],
)
def test_the_recovery_is_over_after_everyone_and_the_grace_or_after_the_truancy(
    elapsed_ms: int, waiting: int, over: str | None
) -> None:
    assert RECOVERY.over(MARK.restored_at_ms + elapsed_ms, waiting) == over


def test_a_zero_grace_ends_the_recovery_with_the_last_known_replica() -> None:
    recovery = Recovery(MARK, grace_ms=0, truancy_ms=7 * DAY_MS)
    assert recovery.over(MARK.restored_at_ms, 1) is None
    assert recovery.over(MARK.restored_at_ms, 0) == "all replicas resynced"
