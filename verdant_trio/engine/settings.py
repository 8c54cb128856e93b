"""The engine's settings, as plain frozen dataclasses: what the configuration file builds, with
nothing else imported (checking a configuration must not load the server).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ..storage.names import encode_id


@dataclass(frozen=True, slots=True)
class LibrarySettings:
    databases_dir: Path
    truancy_minutes: float = 7 * 24 * 60
    file_expiration_days: float = 14
    idle_close_s: float = 60.0 * 60
    inbox_size: int = 256
    max_batch: int = 256
    batch_window_s: float = 0.05
    batch_min_peers: int = 8
    """Linger for batches only with at least this many peers (fan-out is what batching saves)."""
    global_ack_interval_s: float = 0.5
    """At most one `global-ack` broadcast per interval (clients only use it to compact their
    own history; every `op-re` carries the current value as well)."""
    rebase_interval_s: float = 1.0
    http_presence_ttl_s: float = 60.0
    synchronous: str = "NORMAL"
    """WAL + NORMAL, as the Node server (better-sqlite3 builds with that default): a commit
    survives a process crash; FULL adds an fsync per batch so it survives a power cut too."""
    rebase: bool = True
    coalesce_ticks: int = 2
    """Scheduler ticks a batch of operations waits for the rest of the same wake-up."""
    restore_grace_s: float = 24 * 60 * 60.0
    """A library restored from a replica keeps asking returning replicas for their history
    until every replica it knows has re-sent it and this long has passed since the restore
    (for replicas the restored state cannot know about), or the truancy period has."""
    recovery_check_interval_s: float = 60.0
    """How often a recovering library checks whether its recovery is over (and at once after
    a replica re-sent its history)."""

    def shard_path(self, library_id: str) -> Path:
        return self.databases_dir / f"{encode_id(library_id, 'library id')}.sqlite"


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    outbound_queue: int = 1024
    inbound_queue: int = 64
    idle_timeout_s: float = 120.0
    max_protocol_errors: int = 16
    close_timeout_s: float = 2.0
    slow_close_timeout_s: float = 30.0
    """How long a slow consumer's close (1013) waits for it to read what is in flight."""


DEFAULT_MAX_UPLOAD_BYTES: Final = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CoreSettings:
    libraries: LibrarySettings
    connections: ConnectionSettings = field(default_factory=ConnectionSettings)
    max_connections: int = 10_000
    max_concurrent_syncs: int = 16
    max_concurrent_handshakes: int = 64
    handshake_timeout_s: float = 10.0
    max_http_messages: int = 10_000
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    serve_active_content_inline: bool = False
    """Serve uploaded HTML/SVG/JS as pages of our origin (off: they download as attachments)."""
    message_memory_bytes: int = 384 * 1024 * 1024
    """Memory large inbound websocket messages may hold at once (see `budget`)."""
    message_memory_wait_s: float = 30.0
    """How long a large message waits for its share before its connection is closed (1013)."""
    refusal_delay_s: float = 1.0
    """How long a websocket upgrade for a library this server does not own is held before its
    503 (cluster mode): clients reconnect a refused socket at once."""
