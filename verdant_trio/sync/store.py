"""What one library's decisions read and write, as plain data: the rows of a shard.

The decisions (`decisions`) work on these and on a `Store` (the library's shard, in
`storage`), so they can be tested without a database and the storage layer depends on them,
not they on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


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
