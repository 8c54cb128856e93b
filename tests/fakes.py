"""A peer as a library sees it, recording what it is handed (for tests without sockets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from verdant_trio.sync.protocol import ReplicaType


@dataclass(eq=False)
class RecordingPeer:
    key: int
    user_id: str
    type: ReplicaType = ReplicaType.REALTIME
    realtime: bool = True
    replica_id: str | None = None
    profile: Any = None
    inbox: list[dict[str, Any]] = field(default_factory=list)
    closed_with: tuple[int, str] | None = None

    def deliver(self, *payloads: bytes) -> None:
        self.inbox.extend(orjson.loads(payload) for payload in payloads)

    def close_soon(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    def kinds(self) -> list[str]:
        return [m["type"] for m in self.inbox]

    def take(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Remove and return the messages of a type (all without one)."""
        items = [m for m in self.inbox if kind is None or m["type"] == kind]
        self.inbox = [m for m in self.inbox if not (kind is None or m["type"] == kind)]
        return items
