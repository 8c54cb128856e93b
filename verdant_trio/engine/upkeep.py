"""What a library does between batches: HTTP clients' presence leases, users leaving, the
coalesced global acknowledgement, the pace of compaction, and when a library recovering from a
restore checks whether its recovery is over.

Pure bookkeeping over trio's clock, owned by the library's task (`library.LibraryHost`), which
asks it when its next deadline is and what to send when one passes.
"""

from __future__ import annotations

import math

import trio

from ..sync.decisions import LibraryCore, Outcome, Peer, RebaseResult, Send
from .settings import LibrarySettings


class Upkeep:
    def __init__(self, settings: LibrarySettings) -> None:
        self.settings = settings
        self.http_leases: dict[str, tuple[float, str | None]] = {}
        """An HTTP (pull) user's presence lasts `http_presence_ttl_s` after their last request:
        user -> (expiry, replica id)."""
        self._global_ack_sent: str | None = None
        self._global_ack_pending = False
        self._last_global_ack_at = -math.inf
        self.rebase_due = False
        self._last_rebase_at = -math.inf
        self.recovering = False
        """The library carries the restored mark (set by the library's task)."""
        self._recovery_due = False
        self._last_recovery_check_at = -math.inf

    # -- presence ---------------------------------------------------------------------------

    def lease(self, user_id: str, replica_id: str | None) -> None:
        self.http_leases[user_id] = (
            trio.current_time() + self.settings.http_presence_ttl_s, replica_id,
        )

    def departures(self, core: LibraryCore, departed: list[Peer]) -> list[Send]:
        """Peers that left: detach them, and tell everyone of users who are gone for good."""
        outcome = Outcome()
        for peer in departed:
            core.detach(peer)
        for peer in departed:
            user = peer.user_id
            if not peer.realtime or core.user_is_connected(user) or user in self.http_leases:
                continue
            core.user_left(user, peer.replica_id, outcome)
        return outcome.sends

    def expired_leases(self, core: LibraryCore) -> list[Send]:
        now = trio.current_time()
        outcome = Outcome()
        for user, (expiry, replica_id) in list(self.http_leases.items()):
            if expiry <= now:
                del self.http_leases[user]
                if not core.user_is_connected(user):
                    core.user_left(user, replica_id, outcome)
        return outcome.sends

    # -- acknowledgements and compaction ----------------------------------------------------

    def after_batch(
        self, *, history_moved: bool, global_ack: str | None, resynced: bool = False
    ) -> None:
        """A batch moved acknowledgements or history: compaction is due, and a new global ack
        waits for its slot; a replica re-sent its history: the recovery may be over."""
        if history_moved:
            self.rebase_due = True
        if resynced:
            self._recovery_due = True
        if global_ack is not None and global_ack != self._global_ack_sent:
            self._global_ack_pending = True

    def rebase_now(self) -> bool:
        """Whether a compaction pass is due now (at most one per `rebase_interval_s`); if so,
        it counts as started."""
        if not self.rebase_due:
            return False
        now = trio.current_time()
        if now - self._last_rebase_at < self.settings.rebase_interval_s:
            return False
        self.rebase_due = False
        self._last_rebase_at = now
        return True

    def after_rebase(self, result: RebaseResult) -> None:
        if result.global_ack is not None:
            # Hint to clients that they can compact too (the reference does this after every
            # compaction pass).
            self._global_ack_pending = True

    def global_ack_now(self, core: LibraryCore) -> list[Send]:
        """The `global-ack` broadcast, if one is pending, its slot has come and the value moved
        (at most one per `global_ack_interval_s`)."""
        if not self._global_ack_pending:
            return []
        now = trio.current_time()
        if now - self._last_global_ack_at < self.settings.global_ack_interval_s:
            return []
        self._global_ack_pending = False
        ack = core.global_ack()
        if ack is None or ack == self._global_ack_sent:
            return []
        self._global_ack_sent = ack
        self._last_global_ack_at = now
        outcome = Outcome()
        core.broadcast(outcome, {"type": "global-ack", "timestamp": ack})
        return outcome.sends

    def recovery_check_now(self) -> bool:
        """Whether a recovering library should check now if its recovery is over: at once after
        a replica re-sent its history, else once per `recovery_check_interval_s` (the grace
        period and the truancy run out on their own). If so, it counts as done."""
        if not self.recovering:
            return False
        now = trio.current_time()
        interval = self.settings.recovery_check_interval_s
        if not self._recovery_due and now - self._last_recovery_check_at < interval:
            return False
        self._recovery_due = False
        self._last_recovery_check_at = now
        return True

    def next_deadline(self) -> float:
        """The earliest time something here is due (infinity: nothing)."""
        deadlines = [math.inf]
        if self._global_ack_pending:
            deadlines.append(self._last_global_ack_at + self.settings.global_ack_interval_s)
        if self.rebase_due:
            deadlines.append(self._last_rebase_at + self.settings.rebase_interval_s)
        if self.http_leases:
            deadlines.append(min(expiry for expiry, _ in self.http_leases.values()))
        if self.recovering:
            deadlines.append(
                -math.inf if self._recovery_due
                else self._last_recovery_check_at + self.settings.recovery_check_interval_s
            )
        return min(deadlines)
