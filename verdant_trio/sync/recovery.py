"""Recovery of a library restored from a replica: what the restored state knows, and when the
recovery is over. Plain data and arithmetic over wall-clock milliseconds; no I/O.

A restore from an asynchronous replica (Litestream) can end a little before what the server had
acknowledged; clients never re-send what a `server-ack` told them was synced. So while a
library carries the restored mark, every replica that may write is asked, once, for its whole
history (`need-since` with `since: null`: the only request 3.6.3 clients obey, see
`decisions.plan_sync`), and what it sends is merged in. The mark is written by `verdant-trio
restore` into the shard itself (`storage.restored`) and read by the library when it opens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from .protocol import ReplicaType
from .store import ReplicaRow, RestoreMark, ResyncedRow

__all__ = ["Recovery", "RestoreMark", "ResyncedRow", "must_resync"]


def must_resync(type: ReplicaType) -> bool:
    """Whether a replica of this type is asked for its history while a library recovers.

    Read-only replicas are not: they may not write, so what they hold is never taken from them
    (their edits would be refused anyway); what they miss they receive like any replica.
    """
    return type.can_write


@dataclass(frozen=True, slots=True)
class Recovery:
    """A library that carries the restored mark."""

    mark: RestoreMark
    grace_ms: int
    """After the restore, how long replicas the restored state cannot know about (created in
    the lost window, away meanwhile) have to come back before the mark may go."""
    truancy_ms: int
    """A replica silent this long is truant and reset on return anyway: past it, nothing is
    left to wait for."""

    def waiting_for(
        self, replicas: Iterable[ReplicaRow], resynced: Iterable[str],
        is_truant: Callable[[ReplicaRow], bool],
    ) -> list[str]:
        """The replicas that count and have not re-sent their history: every known one that
        may write and is not truant."""
        done = set(resynced)
        return sorted(
            r.id for r in replicas
            if r.id not in done and _can_write(r.type) and not is_truant(r)
        )

    def over(
        self, now_ms: int, waiting: int
    ) -> Literal["all replicas resynced", "truancy period passed"] | None:
        """Why the recovery is over (None: not yet).

        Every replica the library knows that counts has resynced and the grace period has
        passed; or, in any case, the truancy period since the restore: a replica away that long
        is truant, reset when it returns, and has nothing the recovery could take.
        """
        elapsed_ms = now_ms - self.mark.restored_at_ms
        if elapsed_ms >= self.truancy_ms:
            return "truancy period passed"
        if waiting == 0 and elapsed_ms >= self.grace_ms:
            return "all replicas resynced"
        return None


def _can_write(type: int) -> bool:
    try:
        return must_resync(ReplicaType(type))
    except ValueError:  # a type this server does not know: it cannot write through us
        return False
