"""What one library's decisions read and write, as plain data: the rows of a shard.

The decisions (`decisions`) work on these and on a `Store` (the library's shard, in `storage`),
so the storage layer depends on them, not they on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from .protocol import ReplicaType


@dataclass(slots=True)
class StoredOperation:
    oid: str
    timestamp: str
    data_json: str
    server_order: int
    replica_id: str
    authz: str | None

    def data(self) -> Any:
        return orjson.loads(self.data_json)

    def wire(self) -> dict[str, Any]:
        """The operation as clients receive it; `data` is spliced in without re-encoding."""
        out: dict[str, Any] = {
            "oid": self.oid,
            "timestamp": self.timestamp,
            "data": orjson.Fragment(self.data_json),
        }
        if self.authz:
            out["authz"] = self.authz
        return out


@dataclass(slots=True)
class StoredBaseline:
    oid: str
    snapshot_json: str | None
    timestamp: str
    authz: str | None

    def snapshot(self) -> Any:
        return None if self.snapshot_json is None else orjson.loads(self.snapshot_json)

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "oid": self.oid,
            "snapshot": None
            if self.snapshot_json is None
            else orjson.Fragment(self.snapshot_json),
            "timestamp": self.timestamp,
        }
        if self.authz:
            out["authz"] = self.authz
        return out


@dataclass(slots=True)
class HistorySlice:
    """Operations or baselines for a sync response, read at one moment.

    A first sync of a big library sends tens of thousands of operations; building their JSON in
    SQLite keeps Python from holding an object per operation (time and peak memory both halve).
    Restricted (authz) items must be filtered per user, so then `rows` holds them as objects.
    """

    count: int
    newest_server_order: int | None
    json: str = "[]"
    """The items as a JSON array (unused when `rows` is set)."""
    rows: list[Any] | None = None
    """Set only when some item is restricted: `StoredOperation`s or `StoredBaseline`s."""

    @property
    def restricted(self) -> bool:
        return self.rows is not None


@dataclass(slots=True)
class ReplicaRow:
    id: str
    user_id: str
    last_seen_ms: int | None
    acked_logical_time: str | None
    type: int
    acked_server_order: int


@dataclass(slots=True)
class FileRow:
    file_id: str
    name: str
    type: str
    pending_delete_at_ms: int | None


@dataclass(frozen=True, slots=True)
class RestoreMark:
    restored_at_ms: int
    """Wall-clock time of the restore (milliseconds since the epoch)."""
    source: str
    """Where it came from: the replica URL, without credentials."""
    latest_server_order: int
    """The restored state's end in server order: operations stored after the restore are newer."""
    newest_timestamp: str | None
    """The newest operation or baseline timestamp the restored state holds (None: empty). Its
    wall-clock part bounds the restore point from below."""
    replica_count: int
    """Replicas the restored state knew (`ReplicaInfo` rows)."""
    tool: str
    """What restored it (versions), for the operator reading a shard months later."""


@dataclass(frozen=True, slots=True)
class ResyncedRow:
    """A replica that re-sent its history after the restore."""

    replica_id: str
    resynced_at_ms: int
    recovered_operations: int
    """Operations it held that the restored library lacked."""


class Store(Protocol):
    """What one library's decisions need of its storage: the library's shard (`storage.shard`).

    Synchronous on purpose: the library's task runs a whole batch of decisions against it in one
    transaction, in a worker thread (or on the event loop when the batch is small).
    """

    def transaction(self) -> AbstractContextManager[None]:
        """Everything inside commits together or not at all; nested, a savepoint."""

    def forget_replica(self, replica_id: str) -> None:
        """The replica went away: what is cached about it goes too (it is read again, once, if
        the replica comes back). Without this, every replica id a library ever saw (each tab,
        each device) stayed cached for as long as the shard was open."""

    def latest_server_order(self) -> int:
        ...

    def operation_count(self) -> int:
        ...

    def insert_operations(
        self, replica_id: str, operations: Iterable[dict[str, Any]]
    ) -> tuple[int, int]:
        """Store operations in the order given; returns (latest server order, inserted count)."""

    def absent_operations(self, operations: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """The operations stored under no replica id (none with the same oid and timestamp)."""

    def operations_slice(self, after_server_order: int) -> HistorySlice:
        """`operations_after` for a sync response (see `HistorySlice`)."""

    def baselines_slice(self) -> HistorySlice:
        """`baselines` for a sync response (see `HistorySlice`)."""

    def operations_for(self, oid: str) -> list[StoredOperation]:
        ...

    def oids_with_operations_before(self, server_order: int, timestamp: str) -> list[str]:
        """Objects that have at least one operation compaction may fold."""

    def delete_operations(self, operations: Iterable[StoredOperation]) -> None:
        ...

    def baseline(self, oid: str) -> StoredBaseline | None:
        ...

    def baselines(self) -> list[StoredBaseline]:
        ...

    def baseline_count(self) -> int:
        ...

    def is_empty(self) -> bool:
        """No operation and no baseline."""

    def history_at_most(self, rows: int) -> bool:
        """Whether operations and baselines together are at most `rows`; costs O(rows) whatever
        the size of the library (neither table is counted past the limit)."""

    def put_baseline(self, oid: str, snapshot: Any, timestamp: str, authz: str | None) -> None:
        """Upsert; a deleted object (snapshot None) has no baseline row, as in the reference."""

    def insert_client_baselines(self, baselines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store baselines a replica sent with its full history, never an older one over a
        newer one; returns those stored."""

    def replica(self, replica_id: str) -> ReplicaRow | None:
        ...

    def replicas(self) -> list[ReplicaRow]:
        ...

    def replica_owner(self, replica_id: str) -> str | None:
        """The user a replica id belongs to (None: unknown replica)."""

    def create_replica(self, replica_id: str, user_id: str, type: ReplicaType) -> ReplicaRow:
        ...

    def set_replica_type(self, replica_id: str, type: ReplicaType) -> None:
        ...

    def is_truant(self, replica: ReplicaRow) -> bool:
        ...

    def touch_replica(self, replica_id: str) -> None:
        ...

    def update_acked_server_order(self, replica_id: str, server_order: int) -> None:
        ...

    def pass_own_operations(self, replica_id: str) -> int | None:
        """Move a replica's acknowledged server order past its own operations right after it;
        the order now acknowledged (None: no such replica)."""

    def update_acked_logical_time(self, replica_id: str, timestamp: str) -> None:
        """Monotonic: an older timestamp never pulls a replica's acknowledged time back."""

    def acknowledge_operation(self, replica_id: str, timestamp: str) -> None:
        """A timestamp ack: the replica has seen everything up to `timestamp`."""

    def global_ack(self, online_replica_ids: Iterable[str] = ()) -> str | None:
        """The oldest acknowledged time among replicas that hold history back."""

    def earliest_acked_server_order(self) -> int:
        ...

    def delete_replica(self, replica_id: str) -> None:
        ...

    def delete_replicas_of_user(self, user_id: str) -> int:
        ...

    def force_truant(self, replica_id: str) -> bool:
        ...

    def wall_clock_ms(self) -> int:
        """The clock of last-seen times and truancy (milliseconds since the epoch)."""

    def restore_mark(self) -> RestoreMark | None:
        """The restored mark (`recovery`), while the library's recovery is not over."""

    def is_resynced(self, replica_id: str) -> bool:
        """Whether the replica re-sent its history since the restore."""

    def resynced(self) -> list[ResyncedRow]:
        ...

    def record_resynced(self, replica_id: str, recovered_operations: int) -> None:
        """The replica re-sent its history (now); `recovered_operations` of it were new."""

    def forget_resynced(self, keep: Iterable[str]) -> None:
        """Every replica that resynced, except `keep`, is asked for its history again."""

    def clear_restore_mark(self) -> None:
        """The recovery is over: the library is like one never restored."""

    def file(self, file_id: str) -> FileRow | None:
        ...

    def files(self) -> list[FileRow]:
        ...

    def put_file(self, file_id: str, name: str, type: str) -> None:
        ...

    def mark_file_pending_delete(self, file_id: str) -> None:
        ...

    def files_pending_delete(self) -> list[FileRow]:
        """Files whose refs disappeared longer ago than the expiration."""

    def delete_file(self, file_id: str) -> None:
        ...

    def delete_everything(self) -> None:
        """Eviction: replicas, history and baselines go; file metadata is removed by the caller
        once the files themselves are deleted."""
