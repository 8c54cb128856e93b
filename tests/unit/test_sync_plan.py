"""What a sync means, decided without a database (`decisions.plan_sync`): each branch of the
reference's sync handling, and the places we deliberately differ."""

from __future__ import annotations

from dataclasses import replace

import pytest

from verdant_trio.sync.decisions import SyncFacts, SyncPlan, plan_sync

BASE = SyncFacts(
    can_write=True, passive=False, has_operations=False, has_baselines=False, resync_all=False,
    offers_since=True, status="existing", up_to_date=True, passive_edits_stale=False,
    library_empty=False, recovering=False,
)


def plan(**facts: object) -> SyncPlan:
    return plan_sync(replace(BASE, **facts))  # type: ignore[arg-type]


def test_an_existing_replica_up_to_date_stores_its_changes_and_gets_nothing_new() -> None:
    p = plan(has_operations=True)
    assert (p.store, p.rebroadcast, p.overwrite, p.complete) == (True, True, False, False)
    assert p.note is None


def test_an_existing_replica_behind_gets_what_it_missed_not_a_reset() -> None:
    p = plan(up_to_date=False)
    assert (p.store, p.overwrite, p.complete) == (True, False, False)


def test_a_new_replica_of_a_library_with_data_is_reset_to_it() -> None:
    p = plan(status="new", offers_since=False)
    assert (p.overwrite, p.complete, p.store) == (True, True, False)


def test_a_new_replica_initialising_an_empty_library_stores_and_shares_its_baselines() -> None:
    p = plan(status="new", offers_since=False, library_empty=True, has_operations=True,
             has_baselines=True)
    assert (p.store, p.rebroadcast, p.rebroadcast_baselines, p.overwrite) == (True, True, True, False)


def test_a_library_the_server_lost_asks_for_the_whole_history() -> None:
    p = plan(status="new", offers_since=True, library_empty=True, has_operations=True)
    assert p.need_since and not p.store and not p.overwrite
    assert p.note and "full history" in p.note


def test_a_full_history_offered_to_a_library_with_data_is_replaced_with_a_warning() -> None:
    p = plan(offers_since=False, has_operations=True, up_to_date=False)
    assert (p.overwrite, p.complete, p.store, p.warn) == (True, True, False, True)


def test_read_only_edits_are_refused_and_the_replica_reset() -> None:
    """Differs from the reference, which refused the whole sync forever."""
    p = plan(can_write=False, has_operations=True)
    assert (p.forbidden, p.overwrite, p.complete, p.store, p.warn) == (True, True, True, False, True)
    assert plan(can_write=False).forbidden is False  # a read-only replica without edits syncs


@pytest.mark.parametrize("stale", [True, False])
def test_a_passive_replicas_stale_offline_edits_are_discarded(stale: bool) -> None:
    p = plan(passive=True, has_operations=True, passive_edits_stale=stale)
    assert p.overwrite is stale and p.store is not stale


@pytest.mark.parametrize(("up_to_date", "reset"), [(True, False), (False, True)])
def test_a_truant_replica_is_reset_unless_it_is_up_to_date(up_to_date: bool, reset: bool) -> None:
    p = plan(status="truant", up_to_date=up_to_date)
    assert (p.overwrite, p.complete) == (reset, reset)
    assert p.note == f"truant replica reconnected up_to_date={up_to_date}"


def test_resync_all_sends_the_complete_history() -> None:
    p = plan(resync_all=True)
    assert (p.overwrite, p.complete) == (True, True)
    assert plan(resync_all=True, library_empty=True).overwrite is False  # nothing to reset to


# -- a library restored from a replica (`recovery`) ---------------------------------------------


@pytest.mark.parametrize("status", ["new", "existing", "truant"])
@pytest.mark.parametrize("passive", [False, True])
def test_a_recovering_replica_that_offers_changes_since_a_time_is_asked_for_everything(
    status: str, passive: bool
) -> None:
    """Known or not, truant or not: what it was acknowledged in the window the restore lost is
    only in its history. Nothing of this sync is stored (it comes again, whole)."""
    p = plan(recovering=True, status=status, passive=passive, has_operations=True,
             passive_edits_stale=passive, up_to_date=False, library_empty=False)
    assert p == SyncPlan(need_since=True, note=p.note)
    assert p.note and "restored" in p.note
    # the same sync from a library not recovering is an ordinary one
    assert not plan(status=status, has_operations=True, up_to_date=False).need_since


@pytest.mark.parametrize("up_to_date", [True, False])
@pytest.mark.parametrize("status", ["new", "existing", "truant"])
def test_a_recovering_replicas_whole_history_is_merged_never_reset(
    up_to_date: bool, status: str
) -> None:
    """Without the recovery, a full history offered to a library with data resets the replica
    (its copy wiped: what only it held is lost); recovering, it is merged and recorded."""
    facts = dict(offers_since=False, has_operations=True, has_baselines=True,
                 up_to_date=up_to_date, status=status, library_empty=False)
    p = plan(recovering=True, **facts)
    assert (p.store, p.merge, p.resynced, p.overwrite, p.complete) == (True, True, True, False, False)
    assert p.rebroadcast and not p.need_since
    assert not p.rebroadcast_baselines  # 3.6.3 clients would put them over newer ones
    if not up_to_date or status == "new":
        assert plan(**facts).overwrite is True  # what would happen without the mark


def test_a_recovering_passive_replica_with_stale_offline_edits_is_reset_after_the_merge() -> None:
    p = plan(recovering=True, passive=True, offers_since=False, has_operations=True,
             passive_edits_stale=True)
    assert (p.store, p.merge, p.resynced, p.overwrite, p.complete) == (True, True, True, True, True)
    fresh = plan(recovering=True, passive=True, offers_since=False, has_operations=True)
    assert (fresh.merge, fresh.overwrite) == (True, False)


def test_a_replica_that_never_synced_is_handled_as_usual_while_recovering_and_counts_as_done() -> None:
    facts = dict(status="new", offers_since=False, resync_all=True, has_operations=True,
                 library_empty=False, up_to_date=None)
    usual = plan(**facts)
    p = plan(recovering=True, **facts)
    assert p == SyncPlan(**{**{f: getattr(usual, f) for f in usual.__slots__}, "resynced": True})
    assert (p.overwrite, p.merge) == (True, False)
