"""A test replica on our client (`verdant_trio.client`) that behaves like a Verdant client where
the pressure tests need it: it syncs offering its unacknowledged operations, acks every `op-re`
and `sync-resp` nonce, heeds `overwriteLocalData`, and keeps the state it learned.

State model: the tests only write `initialize` (an empty object) and `set` of property names
that are unique per operation, so an object's state is the union of its baseline and the
properties set after it, whatever the order they arrive in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from verdant_trio.client import Closed, VerdantClient, timestamp


@dataclass
class Replica:
    id: str
    user: str
    node: str = ""
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Own op messages sent and not yet acknowledged, by message timestamp (in send order)."""
    acked: list[dict[str, Any]] = field(default_factory=list)
    """Own operations the server acknowledged (`server-ack` or a `sync-resp` after resending)."""
    last_synced: str | None = None
    heartbeats_sent: int = 0
    heartbeats_answered: int = 0
    op_re_received: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.node = self.node or self.id[-7:]

    def stamp(self) -> str:
        return timestamp(node=self.node)

    # -- state --------------------------------------------------------------------------------

    def apply(self, operations: list[dict[str, Any]]) -> None:
        for op in operations:
            data = op["data"]
            target = self.state.setdefault(op["oid"], {})
            if data["op"] == "set":
                target[data["name"]] = data["value"]
            elif data["op"] == "initialize":
                for key, value in (data.get("value") or {}).items():
                    target.setdefault(key, value)
        self._notify()

    def apply_baselines(self, baselines: list[dict[str, Any]]) -> None:
        for baseline in baselines:
            snapshot = baseline.get("snapshot") or {}
            self.state.setdefault(baseline["oid"], {}).update(snapshot)
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def properties(self) -> set[tuple[str, str]]:
        return {(oid, name) for oid, props in self.state.items() for name in props}

    # -- protocol -----------------------------------------------------------------------------

    def op_message(self, operations: list[dict[str, Any]]) -> dict[str, Any]:
        stamp = self.stamp()
        self.pending[stamp] = operations
        self.apply(operations)
        return {"type": "op", "replicaId": self.id, "timestamp": stamp, "operations": operations}

    def _acknowledged(self, stamp: str) -> None:
        # a server-ack says: synced up to this timestamp (the client's `updateLastSynced`)
        for pending_stamp in list(self.pending):
            if pending_stamp <= stamp:
                self.acked.extend(self.pending.pop(pending_stamp))
        if self.last_synced is None or stamp > self.last_synced:
            self.last_synced = stamp
        self._notify()

    async def sync(self, client: VerdantClient, timeout_s: float = 30.0) -> dict[str, Any]:
        """Sync like a reconnecting client: offer every unacknowledged operation."""
        offered = [op for ops in self.pending.values() for op in ops]
        offered_stamps = list(self.pending)
        with trio.fail_after(timeout_s):
            response = await client.sync(
                self.id, operations=offered, since=self.last_synced, ts=self.stamp()
            )
        if response["type"] != "sync-resp":
            raise AssertionError(f"sync refused: {response}")
        if response.get("overwriteLocalData"):
            # the server says its state wins: what we offered is dropped, as a client does
            self.state.clear()
            for stamp in offered_stamps:
                self.pending.pop(stamp, None)
        else:
            for stamp in offered_stamps:
                self.acked.extend(self.pending.pop(stamp, []))
        self.apply_baselines(response["baselines"])
        self.apply(response["operations"])
        nonce = response.get("ackThisNonce")
        if nonce:
            await client.send(
                {"type": "ack", "replicaId": self.id, "timestamp": self.stamp(), "nonce": nonce}
            )
        self.last_synced = response["ackedTimestamp"]
        return response

    async def pump(self, client: VerdantClient, *, ack: bool = True) -> None:
        """Handle server messages until the connection closes (raises `Closed`)."""
        for message in client.drain():
            await self._handle(client, message, ack)
        while True:
            message = await client.receive(timeout_s=3600)
            await self._handle(client, message, ack)

    async def _handle(self, client: VerdantClient, message: dict[str, Any], ack: bool) -> None:
        kind = message.get("type")
        if kind == "op-re":
            operations = message.get("operations") or []
            self.op_re_received += 1
            self.apply_baselines(message.get("baselines") or [])
            self.apply(operations)
            if ack and operations:
                await client.send(
                    {"type": "ack", "replicaId": self.id, "timestamp": operations[-1]["timestamp"]}
                )
        elif kind == "server-ack":
            self._acknowledged(message["timestamp"])
        elif kind == "heartbeat-response":
            self.heartbeats_answered += 1
        elif kind in ("error", "forbidden"):
            self.errors.append(message)

    async def heartbeats(self, client: VerdantClient, interval_s: float) -> None:
        while True:
            await trio.sleep(interval_s)
            try:
                await client.send({"type": "heartbeat"})
            except Closed:
                return
            self.heartbeats_sent += 1


def initialize(replica: Replica, oid: str) -> dict[str, Any]:
    return {"oid": oid, "timestamp": replica.stamp(), "data": {"op": "initialize", "value": {}}}


def set_property(replica: Replica, oid: str, name: str, value: Any) -> dict[str, Any]:
    return {
        "oid": oid, "timestamp": replica.stamp(),
        "data": {"op": "set", "name": name, "value": value},
    }
