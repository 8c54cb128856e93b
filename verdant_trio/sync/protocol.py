"""The Verdant sync protocol: client messages, parsed and validated before anything acts on them.

Pure: no I/O. Every field the server reads is checked here, so the library core can trust the
shapes it gets and a bad message is refused with a clear reason before it can change anything.
Operations and baselines stay plain dicts (they are stored and re-sent as JSON), but their
shapes are checked down to the patch fields the server applies during compaction.

Wire compatibility: `@verdant-web/store` 3.6.3 sends `heartbeat` with `timestamp`/`replicaId`
and `ack` with both `timestamp` and `nonce`; the client at Verdant HEAD sends a bare
`heartbeat` and also `disconnecting`. Both are accepted.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson

from . import authz

MAX_ID_CHARS: Final = 512
"""Replica ids, oids and timestamps are short strings in practice; this bounds hostile ones."""
MAX_INDEX: Final = 2**53
"""List indices beyond JavaScript's safe integers mean nothing to a client."""


class ReplicaType(enum.IntEnum):
    """What a token allows (the reference's `ReplicaType`)."""

    REALTIME = 0
    PUSH = 1
    PASSIVE_REALTIME = 2
    PASSIVE_PUSH = 3
    READ_ONLY_PULL = 4
    READ_ONLY_REALTIME = 5

    @property
    def can_write(self) -> bool:
        return self not in (ReplicaType.READ_ONLY_PULL, ReplicaType.READ_ONLY_REALTIME)

    @property
    def can_realtime(self) -> bool:
        """Only these types may open a websocket (the client's own `canDoRealtime`)."""
        return self in (
            ReplicaType.REALTIME,
            ReplicaType.PASSIVE_REALTIME,
            ReplicaType.READ_ONLY_REALTIME,
        )

    @property
    def is_passive(self) -> bool:
        return self in (ReplicaType.PASSIVE_REALTIME, ReplicaType.PASSIVE_PUSH)

    @property
    def counts_for_global_ack(self) -> bool:
        """Active types hold history back for everyone; passive ones only while online."""
        return self < ReplicaType.PASSIVE_REALTIME


class ProtocolError(ValueError):
    """A message the server refuses; the text says what is wrong, for the sender's developer."""


JsonObject: TypeAlias = dict[str, Any]
Operation: TypeAlias = JsonObject
"""`{oid, timestamp, data, authz?}` as validated by `check_operation`."""
Baseline: TypeAlias = JsonObject
"""`{oid, snapshot, timestamp, authz?}` as validated by `check_baseline`."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    replica_id: str | None


@dataclass(frozen=True, slots=True)
class Sync:
    replica_id: str
    timestamp: str
    operations: list[Operation]
    baselines: list[Baseline]
    since: str | None
    resync_all: bool
    schema_version: int | float | None


@dataclass(frozen=True, slots=True)
class Op:
    replica_id: str
    timestamp: str
    operations: list[Operation]


@dataclass(frozen=True, slots=True)
class Ack:
    replica_id: str
    timestamp: str | None
    nonce: str | None


@dataclass(frozen=True, slots=True)
class PresenceUpdate:
    replica_id: str
    presence: Any
    internal: JsonObject | None


@dataclass(frozen=True, slots=True)
class Disconnecting:
    replica_id: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class SyncAck:
    """Deprecated by the reference; accepted and otherwise ignored, as the reference does."""

    replica_id: str


ClientMessage: TypeAlias = Heartbeat | Sync | Op | Ack | PresenceUpdate | Disconnecting | SyncAck


WIRE_TYPES: Final[dict[type, str]] = {}


def wire_type(message: ClientMessage) -> str:
    """The `type` a parsed message had on the wire (for logs and metrics)."""
    return WIRE_TYPES[type(message)]


def decode_json(raw: str | bytes) -> Any:
    """Parse JSON strictly (no NaN, valid UTF-8, 64-bit integers, bounded depth)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None


def parse_client_message(raw: str | bytes) -> ClientMessage:
    return validate_client_message(decode_json(raw))


def _str(obj: JsonObject, key: str, where: str, *, optional: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        raise ProtocolError(f"{where}: '{key}' is required")
    if not isinstance(value, str):
        raise ProtocolError(f"{where}: '{key}' must be a string, got {_kind(value)}")
    if len(value) > MAX_ID_CHARS:
        raise ProtocolError(f"{where}: '{key}' is longer than {MAX_ID_CHARS} characters")
    return value


def _req_str(obj: JsonObject, key: str, where: str) -> str:
    value = _str(obj, key, where)
    assert value is not None
    if not value:
        raise ProtocolError(f"{where}: '{key}' must not be empty")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _number(patch: JsonObject, key: str, where: str) -> None:
    value = patch.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or abs(value) > MAX_INDEX
    ):
        raise ProtocolError(f"{where}: '{key}' must be a number, got {_kind(value)}")


def _property_name(patch: JsonObject, where: str) -> None:
    name = patch.get("name")
    if isinstance(name, bool) or not isinstance(name, (str, int, float)):
        raise ProtocolError(f"{where}: 'name' must be a string or number, got {_kind(name)}")


def _ref_value(patch: JsonObject, where: str) -> None:
    value = patch.get("value")
    if not (
        isinstance(value, dict)
        and value.get("@@type") in ("ref", "file")
        and isinstance(value.get("id"), str)
    ):
        raise ProtocolError(f"{where}: 'value' must be an object or file ref")


def _require_value(patch: JsonObject, where: str) -> None:
    if "value" not in patch:
        raise ProtocolError(f"{where}: 'value' is required")


def _check_patch(patch: Any, where: str) -> None:
    """Check the fields each patch kind needs, so compaction never meets a malformed patch."""
    if not isinstance(patch, dict):
        raise ProtocolError(f"{where}: 'data' must be an object, got {_kind(patch)}")
    op = patch.get("op")
    where = f"{where} ({op})"
    if op == "initialize":
        _require_value(patch, where)
    elif op == "set" or op == "remove":
        _property_name(patch, where)
    elif op in ("list-set",):
        _number(patch, "index", where)
    elif op in ("list-push", "list-add"):
        _require_value(patch, where)
    elif op == "list-insert":
        _number(patch, "index", where)
        if "value" not in patch and not isinstance(patch.get("values"), list):
            raise ProtocolError(f"{where}: 'value' or a 'values' array is required")
        if "values" in patch and not isinstance(patch["values"], list):
            raise ProtocolError(f"{where}: 'values' must be an array")
    elif op == "list-delete":
        _number(patch, "index", where)
        _number(patch, "count", where)
    elif op == "list-move-by-index":
        _number(patch, "from", where)
        _number(patch, "to", where)
    elif op == "list-move-by-ref":
        _ref_value(patch, where)
        _number(patch, "index", where)
    elif op == "list-remove":
        _require_value(patch, where)
        only = patch.get("only")
        if only is not None and only not in ("first", "last"):
            raise ProtocolError(f"{where}: 'only' must be 'first' or 'last'")
    elif op in ("delete", "touch"):
        pass
    elif isinstance(op, str):
        raise ProtocolError(f"{where}: unknown patch operation")
    else:
        raise ProtocolError(f"{where}: 'op' must be a string")


def _authz(key: Any, where: str) -> None:
    """A key that is present and not null (public data) must be well-formed. Whether the
    sender may use it is the library's decision (it depends on the token's user). Callers
    test for the key first: most operations have none, and this runs for each of a sync's."""
    if not isinstance(key, str):
        raise ProtocolError(f"{where}: 'authz' must be a string or null, got {_kind(key)}")
    problem = authz.key_problem(key)
    if problem is not None:
        raise ProtocolError(f"{where}: 'authz' {problem}; expected null or base64('u:<user>:*')")


def check_operation(item: Any, where: str) -> Operation:
    if not isinstance(item, dict):
        raise ProtocolError(f"{where}: an operation must be an object, got {_kind(item)}")
    _req_str(item, "oid", where)
    _req_str(item, "timestamp", where)
    key = item.get("authz")
    if key is not None:
        _authz(key, where)
    _check_patch(item.get("data"), where)
    return item


def check_baseline(item: Any, where: str) -> Baseline:
    if not isinstance(item, dict):
        raise ProtocolError(f"{where}: a baseline must be an object, got {_kind(item)}")
    _req_str(item, "oid", where)
    _req_str(item, "timestamp", where)
    key = item.get("authz")
    if key is not None:
        _authz(key, where)
    snapshot = item.get("snapshot")
    if snapshot is not None and not isinstance(snapshot, (dict, list)):
        raise ProtocolError(f"{where}: 'snapshot' must be an object, an array or null")
    return item


def _list(obj: JsonObject, key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise ProtocolError(f"{where}: '{key}' must be an array, got {_kind(value)}")
    return value


def _operations(obj: JsonObject, where: str) -> list[Operation]:
    items = _list(obj, "operations", where)
    return [check_operation(op, f"{where} operations[{i}]") for i, op in enumerate(items)]


def validate_client_message(obj: Any) -> ClientMessage:
    if not isinstance(obj, dict):
        raise ProtocolError(f"a message must be a JSON object, got {_kind(obj)}")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("'type' is required and must be a string")
    where = f"'{kind}' message"
    if kind == "heartbeat":
        return Heartbeat(replica_id=_str(obj, "replicaId", where, optional=True))
    replica_id = _req_str(obj, "replicaId", where)
    if kind == "op":
        return Op(
            replica_id=replica_id,
            timestamp=_req_str(obj, "timestamp", where),
            operations=_operations(obj, where),
        )
    if kind == "ack":
        return Ack(
            replica_id=replica_id,
            timestamp=_str(obj, "timestamp", where, optional=True),
            nonce=_str(obj, "nonce", where, optional=True),
        )
    if kind == "sync":
        if "since" not in obj:
            raise ProtocolError(f"{where}: 'since' is required (a timestamp or null)")
        since = _str(obj, "since", where, optional=True)
        baselines = _list(obj, "baselines", where)
        resync_all = obj.get("resyncAll", False)
        if not isinstance(resync_all, bool) and resync_all is not None:
            raise ProtocolError(f"{where}: 'resyncAll' must be a boolean")
        schema_version = obj.get("schemaVersion")
        if schema_version is not None and (
            isinstance(schema_version, bool) or not isinstance(schema_version, (int, float))
        ):
            raise ProtocolError(f"{where}: 'schemaVersion' must be a number")
        return Sync(
            replica_id=replica_id,
            timestamp=_req_str(obj, "timestamp", where),
            operations=_operations(obj, where),
            baselines=[
                check_baseline(b, f"{where} baselines[{i}]") for i, b in enumerate(baselines)
            ],
            since=since,
            resync_all=bool(resync_all),
            schema_version=schema_version,
        )
    if kind == "presence-update":
        internal = obj.get("internal")
        if internal is not None and not isinstance(internal, dict):
            raise ProtocolError(f"{where}: 'internal' must be an object")
        return PresenceUpdate(
            replica_id=replica_id, presence=obj.get("presence"), internal=internal
        )
    if kind == "disconnecting":
        return Disconnecting(replica_id=replica_id, reason=_str(obj, "reason", where, optional=True))
    if kind == "sync-ack":
        return SyncAck(replica_id=replica_id)
    raise ProtocolError(f"unknown message type '{kind[:64]}'")


WIRE_TYPES.update({
    Heartbeat: "heartbeat", Sync: "sync", Op: "op", Ack: "ack",
    PresenceUpdate: "presence-update", Disconnecting: "disconnecting", SyncAck: "sync-ack",
})


def encode(message: JsonObject) -> bytes:
    """A server message as UTF-8 JSON: it goes out as a text frame (the browser client
    `JSON.parse`s `event.data`), or into an HTTP response body, without being decoded."""
    return orjson.dumps(message)
