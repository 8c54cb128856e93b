"""One library's decisions: what each client message means for storage and who hears about it.

Decisions, run in a worker thread against the library's shard: `LibraryCore` works on parsed
messages, a `Store` (the shard, in `storage`; plain synchronous calls, SQLite underneath) and the
set of attached peers, and appends `Send` effects to a list; it never touches a socket. The
library's task (`engine.library.LibraryHost`) runs it inside a transaction and delivers the
effects only after the commit, so nobody, sender or peer, ever hears of an operation the server
has not stored. What a sync means is decided first as plain data (`plan_sync`), without the
store, so those decisions are tested on their own. A library restored from a replica recovers
what the restore lacked from its replicas' histories (`recovery`, and `plan_sync`'s first rule).

The decisions follow the reference `Library.ts`. Where the reference loses or corrupts data
this module deliberately differs; each place says so ("Differs from the reference").
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, Protocol

import orjson

from . import authz, patches
from .errors import ErrorCode
from .presence import PresenceState
from .protocol import (
    Ack,
    ClientMessage,
    Disconnecting,
    Heartbeat,
    Op,
    PresenceUpdate,
    ReplicaType,
    Sync,
    SyncAck,
)
from .recovery import Recovery, must_resync
from .store import HistorySlice, ReplicaRow, Store, StoredOperation

log = logging.getLogger(__name__)


class Peer(Protocol):
    """A connection as a library sees it: who it is and how to hand it encoded messages."""

    key: int
    user_id: str
    type: ReplicaType
    realtime: bool
    replica_id: str | None
    profile: Any

    def deliver(self, *payloads: bytes) -> None:
        """Hand over encoded messages (UTF-8 JSON), in order, without waiting; a full queue is
        the peer's problem. A library hands each peer all it has for it from one batch in one
        call, so a socket can take them in one write (one TCP segment, not one per message)."""

    def close_soon(self, code: int, reason: str) -> None:
        """End the peer's connection (it reconnects and resyncs); never waits. A request-bound
        peer (HTTP) has nothing to close and ignores it."""


@dataclass(slots=True)
class Send:
    """A message for some peers. `restricted`: it carries authz-restricted items to filter.

    `merge_key` marks an `op-re` that later operations of the same sender, in the same batch and
    for the same peers, may join: one frame per peer per batch instead of one per message.
    """

    message: dict[str, Any]
    targets: list[Peer]
    restricted: bool = False
    merge_key: tuple[int, str, frozenset[int]] | None = None


@dataclass(slots=True)
class Outcome:
    """What handling a batch produced, beyond the messages."""

    sends: list[Send] = field(default_factory=list)
    detach: list[Peer] = field(default_factory=list)
    changed_history: bool = False
    acks_moved: bool = False
    stored: int = 0
    recovered: int = 0
    """Operations a restored library lacked that a replica's history brought back."""
    resynced: int = 0
    """Replicas that re-sent their history to a restored library."""
    server_acks: dict[int, Send] = field(default_factory=dict)
    failed: dict[int, Peer] = field(default_factory=dict)
    """Peers (by key) a message of which failed and was rolled back: nothing later of theirs
    is handled, since its acknowledgement would cover the lost message."""
    mergeable: list[Send] = field(default_factory=list)
    """Sends later messages of the batch may extend (joined op-re, coalesced server-ack)."""

    def checkpoint(self) -> Callable[[], None]:
        """Undo for one message: drops its sends and reverts what it merged into earlier ones
        (a joined `op-re`, a coalesced `server-ack`), so a rolled-back message leaves no trace."""
        mark = len(self.sends)
        acks = dict(self.server_acks)
        mergeable = len(self.mergeable)
        merged = [(send, dict(send.message), send.restricted) for send in self.mergeable]
        counts = (
            self.stored, self.recovered, self.resynced, self.changed_history, self.acks_moved,
            len(self.detach),
        )

        def restore() -> None:
            del self.sends[mark:]
            del self.mergeable[mergeable:]
            self.server_acks = acks
            for send, message, restricted in merged:
                send.message.clear()
                send.message.update(message)
                send.restricted = restricted
            (
                self.stored, self.recovered, self.resynced, self.changed_history,
                self.acks_moved, detached,
            ) = counts
            del self.detach[detached:]

        return restore


EMPTY_SLICE: Final = HistorySlice(0, None)


def _wire_items(items: HistorySlice) -> Any:
    """Built by SQLite when nothing in it is restricted; as objects to filter per user else."""
    if items.rows is not None:
        return [item.wire() for item in items.rows]
    return orjson.Fragment(items.json)


def encode_nonce(server_order: int) -> str:
    return base64.b64encode(orjson.dumps(server_order)).decode()


def decode_nonce(nonce: str) -> int | None:
    try:
        value = orjson.loads(base64.b64decode(nonce, validate=False))
    except (binascii.Error, orjson.JSONDecodeError, ValueError):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


@dataclass(slots=True)
class RebaseResult:
    folded_operations: int = 0
    objects: int = 0
    deleted_file_ids: list[str] = field(default_factory=list)
    global_ack: str | None = None


@dataclass(frozen=True, slots=True)
class SyncFacts:
    """What decides a sync, read before anything of it is applied."""

    can_write: bool
    passive: bool
    has_operations: bool
    has_baselines: bool
    resync_all: bool
    offers_since: bool
    """The replica offers only its changes since some time (else its whole history)."""
    status: Literal["new", "existing", "truant"]
    up_to_date: bool | None
    """The replica has acknowledged every operation the server holds (None: not read, for a
    new replica, whose sync never depends on it)."""
    passive_edits_stale: bool
    """A passive replica's offline edits include some older than what the others acknowledged
    (when it recovers: some of the operations in its history that the server lacks)."""
    library_empty: bool | None
    """The library holds no operation and no baseline (None: not read, for an existing replica
    that does not ask for a resync, whose sync never depends on it)."""
    recovering: bool
    """The library was restored from a replica and this replica, which may write, has not
    re-sent its history since (`recovery`)."""


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What a sync means: what is stored, who hears of it, what the replica is sent."""

    forbidden: bool = False
    """Tell the replica its edits were refused (it may not write)."""
    need_since: bool = False
    """Answer only with `need-since`: the server lost the library, ask for the whole history."""
    store: bool = False
    """Store the replica's operations and baselines and move its acknowledged time."""
    merge: bool = False
    """The replica sent its whole history to a restored library: store only the operations no
    replica's copy of is stored yet, and tell the other peers of what was new."""
    resynced: bool = False
    """Record that the replica re-sent its history since the restore."""
    rebroadcast: bool = False
    rebroadcast_baselines: bool = False
    overwrite: bool = False
    """The `sync-resp` tells the replica to replace its local data with what it is sent."""
    complete: bool = False
    """Send all baselines and every operation not folded into them (else the operations after
    the replica's acknowledged server order)."""
    note: str | None = None
    """A line for the log when the sync is out of the ordinary."""
    warn: bool = False
    """The note is a warning: the client sent something the server throws away."""


def plan_sync(facts: SyncFacts) -> SyncPlan:
    """The decisions of the reference's `Library.ts` sync handling, as plain data; where it loses
    or corrupts data we differ, each place says so."""
    if facts.recovering:
        return _plan_recovery(facts)
    if not facts.can_write and (facts.has_operations or facts.has_baselines):
        # Differs from the reference: it refuses the whole sync, so a read-only client with
        # local edits never receives anything again. We refuse the edits (never stored, never
        # broadcast) and reset the client to the server's state instead.
        return SyncPlan(forbidden=True, overwrite=True, complete=True, warn=True,
                        note="sync with changes from read-only replica refused; resetting it")
    if facts.passive and facts.offers_since and facts.has_operations and facts.passive_edits_stale:
        # A passive replica does not hold history back while offline, so others may have
        # compacted past its offline edits; clients ignore operations older than their
        # baselines, so such edits could never be applied the same everywhere. As `ReplicaType`
        # documents, a passive replica's offline changes are discarded on reconnect: refuse them
        # and reset it (the reference stored them, and replicas diverged).
        return SyncPlan(overwrite=True, complete=True,
                        note="discarding a passive replica's offline changes")
    truant_up_to_date = facts.status == "truant" and facts.up_to_date
    complete = facts.resync_all or (not truant_up_to_date and facts.status != "existing")
    note = None
    if facts.status == "truant":
        note = f"truant replica reconnected up_to_date={truant_up_to_date}"
    # Nothing to send: an empty library for a complete history, else nothing new for the replica.
    nothing = facts.library_empty if complete else facts.up_to_date
    assert nothing is not None, "the facts read for this sync leave out what decides it"
    if nothing and facts.status == "new" and facts.offers_since:
        # The server has nothing but the replica only offers changes since some time: the
        # server lost this library. Ask for the whole history and wait for the next sync.
        return SyncPlan(need_since=True,
                        note="library has no data; asking replica for its full history")
    overwrite = complete and not nothing
    warn = False
    if not nothing and not facts.offers_since:
        if facts.has_operations or facts.has_baselines:
            note = "replica offers a full history but the library has data; resetting it"
            warn = True
        overwrite = True
    store = not overwrite
    return SyncPlan(
        store=store,
        rebroadcast=store and (facts.has_operations or (nothing and facts.has_baselines)),
        # baselines only when this sync just initialised the library: other new replicas may
        # be waiting for the first data
        rebroadcast_baselines=store and nothing and facts.has_baselines,
        overwrite=overwrite,
        # Differs from the reference: a replica told to overwrite its data always gets all it
        # needs to hold exactly the server's state (the reference could send a reset with only
        # the operations after the replica's old position and no baselines).
        complete=complete or overwrite,
        note=note,
        warn=warn,
    )


def _plan_recovery(facts: SyncFacts) -> SyncPlan:
    """A sync from a replica that may write, to a library restored from a replica that it has
    not re-sent its history to (not in the reference, which has no restore).

    The restore may end before what the server acknowledged, and a client never sends again
    what a `server-ack` told it was synced. The one request 3.6.3 clients obey is `need-since`
    with `since: null` (with any timestamp they send an ordinary sync: its value is ignored);
    they answer with their whole history: every operation they hold, their own and other
    replicas' not yet compacted, all their baselines, `since: null` and `resyncAll: false`.
    That history is merged, never answered with a reset before it was taken: a reset
    (`overwriteLocalData`) would wipe the only copy of what the server lacks.
    """
    if facts.offers_since:
        return SyncPlan(need_since=True,
                        note="library restored from a replica; asking replica for its full history")
    if facts.resync_all:
        # A replica that never synced holds nothing anybody acknowledged: handled as any other
        # such replica, and it has given all it could.
        return replace(plan_sync(replace(facts, recovering=False)), resynced=True)
    # A passive replica's offline edits older than what the others acknowledged are discarded
    # as in `plan_sync` (clients would apply them differently): the rest of its history is
    # taken first, then it is reset to the server's state, its own recovered edits included.
    reset = facts.passive and facts.passive_edits_stale
    return SyncPlan(
        store=True, merge=True, resynced=True, rebroadcast=True,
        overwrite=reset, complete=reset,
        note="discarding a passive replica's stale offline changes after taking its history"
        if reset else None,
    )


class LibraryCore:
    def __init__(
        self,
        library_id: str,
        shard: Store,
        *,
        rebase: bool = True,
        recovery: Recovery | None = None,
    ) -> None:
        self.id = library_id
        self.shard = shard
        self.recovery = recovery
        """Set while the library recovers from a restore (read from the shard when it opens)."""
        self.presence = PresenceState()
        self.peers: dict[int, Peer] = {}
        self.rebase_enabled = rebase
        self.last_global_ack: str | None = None
        self._passive_peers: dict[int, str] = {}
        """Replica ids of connected passive and read-only peers, by peer key."""
        self._passive_presence: dict[str, str] = {}
        """Replica ids of passive and read-only replicas present, by user."""

    # -- peers ------------------------------------------------------------------------------

    def attach(self, peer: Peer) -> None:
        self.peers[peer.key] = peer
        self._note_replica(peer)

    def detach(self, peer: Peer) -> None:
        self.peers.pop(peer.key, None)
        self._passive_peers.pop(peer.key, None)
        if peer.realtime and peer.replica_id is not None:
            # Replicas come and go (every tab and device is a new replica id): what the shard
            # caches about one goes with its connection. (Another connection of the same
            # replica, if any, reads it again on its next message.)
            self.shard.forget_replica(peer.replica_id)

    def user_is_connected(self, user_id: str) -> bool:
        return any(p.user_id == user_id and p.realtime for p in self.peers.values())

    def user_left(self, user_id: str, replica_id: str | None, out: Outcome) -> None:
        """The user's last connection went: tell everyone (and old clients which replica)."""
        entry = self.presence.remove(user_id)
        self._passive_presence.pop(user_id, None)
        if entry is not None and replica_id is None:
            replica_id = entry.get("replicaId")
        message: dict[str, Any] = {"type": "presence-offline", "userId": user_id}
        if replica_id is not None:
            message["replicaId"] = replica_id
        self.broadcast(out, message)

    # -- helpers ----------------------------------------------------------------------------

    def _reply(self, out: Outcome, peer: Peer, message: dict[str, Any], restricted: bool = False) -> None:
        out.sends.append(Send(message, [peer], restricted))

    def broadcast(
        self,
        out: Outcome,
        message: dict[str, Any],
        exclude: Peer | None = None,
        restricted: bool = False,
    ) -> None:
        targets = [p for p in self.peers.values() if p is not exclude]
        if targets:
            out.sends.append(Send(message, targets, restricted))

    def _note_replica(self, peer: Peer) -> None:
        if peer.replica_id is not None and not peer.type.counts_for_global_ack:
            self._passive_peers[peer.key] = peer.replica_id

    def clear_presence(self) -> None:
        self.presence.clear()
        self._passive_presence.clear()

    def online_replica_ids(self) -> set[str]:
        """The passive and read-only replicas here right now: they hold history back only
        while online (active ones always do, so whether they are here changes nothing).

        Kept as peers come and go rather than gathered from every peer: the global ack is
        read for every sync and every `op-re`, and with a few hundred peers gathering them
        each time was most of a small sync's cost.
        """
        return {*self._passive_peers.values(), *self._passive_presence.values()}

    def global_ack(self) -> str | None:
        """The time every replica that counts has seen: what clients may compact up to.

        Connected passive replicas count, as in compaction (the reference left them out of the
        value it broadcast, so clients could compact past an operation a connected passive
        replica was still sending).

        None while the library recovers from a restore (not in the reference): clients must
        not fold anything then, so that a baseline recovered from one replica's history can be
        passed to another without being older than one it folded meanwhile (`_merge_history`).
        The server's own compaction goes on (`rebase` reads the store's value).
        """
        if self.recovery is not None:
            return None
        return self.shard.global_ack(self.online_replica_ids())

    # -- messages ---------------------------------------------------------------------------

    def handle(self, peer: Peer, message: ClientMessage, out: Outcome) -> None:
        """Apply one message. Must run inside a shard transaction (the caller commits)."""
        if isinstance(message, Heartbeat):
            self._reply(out, peer, {"type": "heartbeat-response"})
            return
        replica_id = message.replica_id
        owner = self.shard.replica_owner(replica_id)
        if owner is not None and owner != peer.user_id:
            # A replica id belongs to the user who first synced it; nobody may speak for it.
            log.warning(
                "replica id claimed by another user library=%s replica=%s user=%s owner=%s",
                self.id, replica_id, peer.user_id, owner,
            )
            self._reply(out, peer, {"type": "forbidden"})
            return
        if isinstance(message, (Op, Sync)) and not self._claim_authz(peer, message, out):
            return
        if peer.replica_id != replica_id:
            peer.replica_id = replica_id
            if peer.key in self.peers:
                self._note_replica(peer)
        # A message read before its connection went and handled after the departure: its data
        # is kept like any other, but nothing that means "this replica is here" is.
        departed = peer.key not in self.peers
        if isinstance(message, Op):
            self._handle_op(peer, message, out)
        elif isinstance(message, Sync):
            self._handle_sync(peer, message, out)
        elif isinstance(message, Ack):
            self._handle_ack(message, out)
        elif isinstance(message, PresenceUpdate):
            if not departed:  # else the user would stay "here" after `user_left` ran
                self._handle_presence(peer, message, out)
        elif isinstance(message, Disconnecting):
            out.detach.append(peer)
        elif isinstance(message, SyncAck):
            pass  # deprecated; the reference ignores it too
        # Presence updates are skipped: a client sends one before its sync, and counting it
        # would make a truant replica look freshly seen when its sync is judged.
        if not isinstance(message, PresenceUpdate):
            self.shard.touch_replica(replica_id)
        if departed:
            self.shard.forget_replica(replica_id)  # as `detach` did: nobody is here to use it

    def _claim_authz(self, peer: Peer, message: Op | Sync, out: Outcome) -> bool:
        """Private data may be private only to its sender; False (and the message refused
        whole, nothing stored) when a key names anybody else.

        Differs from the reference, which stores any key: user A could then write operations
        that only user B receives (into B's private documents, or new ones only B sees). The
        client has no API that makes data private to someone else; its own code sends another
        user's key only when a local library synced by B is then synced with A's token, and
        that too is writing into B's private data. The originator placeholder means the
        sender, in every sync and op: the reference rewrote it only when a sync had nothing to
        send back (its test for a new library) and stored it otherwise, so private edits made
        offline while others wrote reached nobody, not even the sender's other devices.
        """
        kind = "op" if isinstance(message, Op) else "sync"
        groups = [("operations", message.operations)]
        if isinstance(message, Sync):
            groups.append(("baselines", message.baselines))
        for field_name, items in groups:
            index = authz.claim(items, peer.user_id)
            if index is None:
                continue
            log.warning(
                "authz key naming another user refused library=%s replica=%s user=%s item=%s[%d]",
                self.id, message.replica_id, peer.user_id, field_name, index,
            )
            if authz.can_own_private_data(peer.user_id):
                expected = f"base64('u:{peer.user_id}:*')"
            else:
                expected = "nothing: a user id with ':' cannot own private data"
            self._reply(out, peer, {"type": "forbidden"})
            self._reply(out, peer, {
                "type": "error",
                "code": int(ErrorCode.FORBIDDEN),
                "message": f"'{kind}' message {field_name}[{index}]: 'authz' must name the "
                f"token's user (expected {expected}); data can be private only to its sender",
            })
            return False
        return True

    def _replica_for(
        self, peer: Peer, replica_id: str
    ) -> tuple[Literal["new", "existing", "truant"], ReplicaRow]:
        """Get or create the replica record; returns its status: new, existing or truant."""
        row = self.shard.replica(replica_id)
        if row is None:
            return "new", self.shard.create_replica(replica_id, peer.user_id, peer.type)
        if row.type != int(peer.type):
            self.shard.set_replica_type(replica_id, peer.type)
            row.type = int(peer.type)
        if self.shard.is_truant(row):
            return "truant", row
        return "existing", row

    def _store_operations(
        self, replica: ReplicaRow, operations: list[dict[str, Any]], out: Outcome
    ) -> int:
        latest, inserted = self.shard.insert_operations(replica.id, operations)
        out.stored += inserted
        # A replica has seen what it wrote: one that was up to date is still up to date (no
        # round trip of an ack needed), one that was behind is acknowledged up to where others'
        # operations begin. (The reference advanced only a replica that was up to date.)
        if inserted and latest - replica.acked_server_order == inserted:
            self.shard.update_acked_server_order(replica.id, latest)
            replica.acked_server_order = latest
        elif inserted:
            moved = self.shard.pass_own_operations(replica.id)
            if moved is not None:
                replica.acked_server_order = moved
        return inserted

    def _handle_op(self, peer: Peer, message: Op, out: Outcome) -> None:
        if not message.operations:
            return
        if not peer.type.can_write:
            log.warning(
                "write refused for read-only token library=%s replica=%s user=%s",
                self.id, message.replica_id, peer.user_id,
            )
            self._reply(out, peer, {"type": "forbidden"})
            return
        _, replica = self._replica_for(peer, message.replica_id)
        if self._store_operations(replica, message.operations, out):
            out.changed_history = True
        self.shard.update_acked_logical_time(
            message.replica_id, message.operations[-1]["timestamp"]
        )
        out.acks_moved = True
        self._acknowledge(out, peer, message.timestamp)
        self._rebroadcast_operations(out, peer, message.replica_id, message.operations)

    def _acknowledge(self, out: Outcome, peer: Peer, timestamp: str) -> None:
        """One `server-ack` per sender per batch, with its newest timestamp.

        Clients read a server-ack as "synced up to this time" (`updateLastSynced`), and a
        replica's message timestamps only grow, so the newest says everything the others would.
        """
        previous = out.server_acks.get(peer.key)
        if previous is not None:
            if timestamp > previous.message["timestamp"]:
                previous.message["timestamp"] = timestamp
            return
        send = Send({"type": "server-ack", "timestamp": timestamp}, [peer])
        out.server_acks[peer.key] = send
        out.sends.append(send)
        out.mergeable.append(send)

    def _rebroadcast_operations(
        self, out: Outcome, sender: Peer, replica_id: str, operations: list[dict[str, Any]]
    ) -> None:
        """`op-re` to every other peer; joins the sender's previous `op-re` of this batch.

        Joining keeps each recipient's order of that sender's operations, and a client applies
        an `op-re` with many operations exactly like several with one each.
        """
        targets = [p for p in self.peers.values() if p is not sender]
        if not targets:
            return
        ack = self.global_ack()
        restricted = authz.any_restricted(operations)
        key = (sender.key, replica_id, frozenset(p.key for p in targets))
        for previous in reversed(out.mergeable):
            if previous.merge_key == key:
                merged = previous.message
                merged["operations"] = [*merged["operations"], *operations]
                if ack is not None:
                    merged["globalAckTimestamp"] = ack
                previous.restricted = previous.restricted or restricted
                return
            if previous.merge_key is not None and previous.merge_key[0] == sender.key:
                break  # the sender's broadcasts to another set of peers: keep order simple
        rebroadcast: dict[str, Any] = {
            "type": "op-re",
            "operations": operations,
            "replicaId": replica_id,
        }
        if ack is not None:
            rebroadcast["globalAckTimestamp"] = ack
        send = Send(rebroadcast, targets, restricted, key)
        out.sends.append(send)
        out.mergeable.append(send)

    def _handle_ack(self, message: Ack, out: Outcome) -> None:
        if message.nonce:
            order = decode_nonce(message.nonce)
            if order is None:
                log.warning(
                    "invalid ack nonce library=%s replica=%s", self.id, message.replica_id
                )
                return
            self.shard.update_acked_server_order(message.replica_id, order)
        elif message.timestamp:
            self.shard.acknowledge_operation(message.replica_id, message.timestamp)
        else:
            return
        out.acks_moved = True

    def _handle_presence(self, peer: Peer, message: PresenceUpdate, out: Outcome) -> None:
        info = self.presence.set(
            peer.user_id, message.replica_id, message.presence, message.internal, peer.profile
        )
        if peer.type.counts_for_global_ack:
            self._passive_presence.pop(peer.user_id, None)
        else:
            self._passive_presence[peer.user_id] = message.replica_id
        # Everyone hears it, the sender too: that is how a client learns its own profile.
        self.broadcast(
            out, {"type": "presence-changed", "replicaId": message.replica_id, "userInfo": info}
        )

    def _handle_sync(self, peer: Peer, message: Sync, out: Outcome) -> None:
        replica_id = message.replica_id
        facts, replica, absent = self._sync_facts(peer, message)
        plan = plan_sync(facts)
        if plan.note:
            log.log(
                logging.WARNING if plan.warn else logging.INFO,
                "%s library=%s replica=%s user=%s", plan.note, self.id, replica_id, peer.user_id,
            )
        if plan.forbidden:
            self._reply(out, peer, {"type": "forbidden"})
        if plan.need_since:
            self._reply(out, peer, {"type": "need-since", "since": None})
            return
        if plan.merge:
            self._merge_history(peer, message, replica, absent, plan, out)
            return
        if plan.resynced:
            self.shard.record_resynced(replica_id, 0)
            out.resynced += 1
        # what the replica is sent is read before its own changes are stored: it has them
        if plan.complete:
            operations, baselines = self.shard.operations_slice(0), self.shard.baselines_slice()
        else:
            operations, baselines = self.shard.operations_slice(replica.acked_server_order), EMPTY_SLICE
        if plan.store:
            self.shard.insert_client_baselines(message.baselines)
            if self._store_operations(replica, message.operations, out) or message.baselines:
                out.changed_history = True
            self.shard.update_acked_logical_time(replica_id, message.timestamp)
            out.acks_moved = True
        if plan.rebroadcast:
            rebroadcast: dict[str, Any] = {
                "type": "op-re",
                "operations": message.operations,
                "replicaId": replica_id,
            }
            if plan.rebroadcast_baselines:
                rebroadcast["baselines"] = message.baselines
            ack = self.global_ack()
            if ack is not None:
                rebroadcast["globalAckTimestamp"] = ack
            self.broadcast(
                out,
                rebroadcast,
                exclude=peer,
                restricted=authz.any_restricted(message.operations)
                or authz.any_restricted(message.baselines),
            )
        self._respond_sync(peer, message, operations, baselines, reset=plan.overwrite, out=out)

    def _sync_facts(
        self, peer: Peer, message: Sync
    ) -> tuple[SyncFacts, ReplicaRow, list[dict[str, Any]]]:
        """What `plan_sync` needs to know, read from the store (the replica's record is created
        or, for `resyncAll`, re-created on the way), and, for a history offered to a library
        recovering from a restore, the operations of it the library lacks (a passive replica's
        stale ones left out)."""
        replica_id = message.replica_id
        refused = not peer.type.can_write and bool(message.operations or message.baselines)
        if message.resync_all and not refused:
            self.shard.delete_replica(replica_id)
        recovering = (
            self.recovery is not None
            and must_resync(peer.type)
            and not self.shard.is_resynced(replica_id)
        )
        status, replica = self._replica_for(peer, replica_id)
        stale = False
        absent: list[dict[str, Any]] = []
        if recovering and message.since is None and not message.resync_all:
            absent = self.shard.absent_operations(message.operations)
            if peer.type.is_passive and absent:
                ack = self.shard.global_ack(self.online_replica_ids() - {replica_id})
                if ack is not None:
                    kept = [op for op in absent if op["timestamp"] > ack]
                    stale, absent = len(kept) < len(absent), kept
        elif peer.type.is_passive and message.since is not None and message.operations and not refused:
            ack = self.shard.global_ack(self.online_replica_ids() - {replica_id})
            stale = ack is not None and any(op["timestamp"] <= ack for op in message.operations)
        facts = SyncFacts(
            can_write=peer.type.can_write,
            passive=peer.type.is_passive,
            has_operations=bool(message.operations),
            has_baselines=bool(message.baselines),
            resync_all=message.resync_all,
            offers_since=message.since is not None,
            status=status,
            # each read only where it can decide the sync (see `plan_sync`): a sync is the
            # first thing every connection sends, so it should cost no more than it must
            up_to_date=None if status == "new"
            else replica.acked_server_order >= self.shard.latest_server_order(),
            passive_edits_stale=stale,
            library_empty=self.shard.is_empty()
            if status != "existing" or message.resync_all else None,
            recovering=recovering,
        )
        return facts, replica, absent

    def _merge_history(
        self,
        peer: Peer,
        message: Sync,
        replica: ReplicaRow,
        absent: list[dict[str, Any]],
        plan: SyncPlan,
        out: Outcome,
    ) -> None:
        """Take a recovering replica's whole history (see `_plan_recovery`).

        Stored: the operations no replica's copy of is stored (`absent`, under the sender's id)
        and the baselines newer than the server's; recorded as resynced in the same
        transaction. The new operations go to every other peer. The replica is sent what it
        lacks: the operations after its acknowledged server order as it stood before this
        merge (its own history is not echoed back) and every baseline newer than its own for
        the same object; or, when it is reset, everything.

        Baselines need care. A 3.6.3 client folds operations into a baseline once the global
        ack passes them, so some of what the restore lacked may come back only inside a
        baseline, and a replica that never received those operations needs the baseline
        itself. But a client stores an incoming baseline with a plain put
        (`BaselinesStore.setAll`), over a newer one of its own whose folded operations it no
        longer has (measured with real clients: relaying baselines to everyone lost edits). So
        a baseline goes only where it cannot be older than the client's: to the replica that
        resyncs, those newer than the ones it just sent; to the connected replicas that
        resynced earlier, the ones this merge won (newer than the server's, which was at least
        as new as theirs when they resynced, and they have not folded anything since: no global
        ack is given out while the library recovers, see `global_ack`). A replica that resynced
        and is not connected is asked again when it returns.
        """
        replica_id = message.replica_id
        lacking = None
        if not plan.complete:
            lacking = self.shard.operations_slice(replica.acked_server_order), EMPTY_SLICE
        won = self.shard.insert_client_baselines(self._baselines_after_restore(message.baselines))
        recovered = self._store_operations(replica, absent, out)
        if recovered or won:
            out.changed_history = True
        self.shard.update_acked_logical_time(replica_id, message.timestamp)
        out.acks_moved = True
        self.shard.record_resynced(replica_id, recovered)
        out.recovered += recovered
        out.resynced += 1
        log.info(
            "replica resynced after restore library=%s replica=%s user=%s "
            "recovered_operations=%d recovered_baselines=%d history_operations=%d",
            self.id, replica_id, peer.user_id, recovered, len(won), len(message.operations),
        )
        if lacking is None:  # reset after its history was taken: it gets its own edits back too
            lacking = self.shard.operations_slice(0), self.shard.baselines_slice()
        else:
            own = {b["oid"]: b["timestamp"] for b in message.baselines}
            newer = [b for b in self.shard.baselines() if b.timestamp > own.get(b.oid, "")]
            if newer:
                lacking = lacking[0], HistorySlice(len(newer), None, rows=newer)
        others = [p for p in self.peers.values() if p is not peer]
        resynced = [
            p for p in others
            if p.realtime and p.replica_id is not None and must_resync(p.type)
            and self.shard.is_resynced(p.replica_id)
        ] if won else []
        if won:
            self.shard.forget_resynced(
                [replica_id, *(p.replica_id for p in resynced if p.replica_id is not None)]
            )
        rest = [p for p in others if p not in resynced]
        restricted = authz.any_restricted(absent)
        if resynced:
            out.sends.append(Send(
                {"type": "op-re", "operations": absent, "baselines": won, "replicaId": replica_id},
                resynced, restricted or authz.any_restricted(won),
            ))
        if absent and rest:
            out.sends.append(Send(
                {"type": "op-re", "operations": absent, "replicaId": replica_id}, rest, restricted,
            ))
        self._respond_sync(peer, message, *lacking, reset=plan.overwrite, out=out)

    def _baselines_after_restore(self, baselines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The baselines of a recovering replica's history folded after the restored state's
        end (its newest timestamp): the restored state holds everything before it exactly as
        the server had it, so an older client baseline can only repeat it, or contradict it.
        Measured: a 3.6.3 client in pull mode that receives a global ack with the operations
        it covers can fold without them; taken in, its stale snapshot replaced the server's.
        (Lost: what a client folded in the lost window under a timestamp older than the
        restored end, an offline edit synced and folded within the window.)"""
        assert self.recovery is not None
        end = self.recovery.mark.newest_timestamp
        return baselines if end is None else [b for b in baselines if b["timestamp"] > end]

    def _respond_sync(
        self,
        peer: Peer,
        message: Sync,
        operations: HistorySlice,
        baselines: HistorySlice,
        *,
        reset: bool,
        out: Outcome,
    ) -> None:
        restricted = operations.restricted or baselines.restricted
        response: dict[str, Any] = {
            "type": "sync-resp",
            "operations": _wire_items(operations),
            "baselines": _wire_items(baselines),
            "overwriteLocalData": reset,
            "peerPresence": self.presence.all(),
            "ackedTimestamp": message.timestamp,
        }
        ack = self.global_ack()
        if ack is not None:
            response["globalAckTimestamp"] = ack
        if operations.newest_server_order is not None:
            # The nonce names the newest server order sent (the reference takes the last by
            # timestamp, which can be older and makes the replica receive ops twice).
            response["ackThisNonce"] = encode_nonce(operations.newest_server_order)
        self._reply(out, peer, response, restricted=restricted)

    # -- compaction -------------------------------------------------------------------------

    def rebase(self, online_replica_ids: Iterable[str] = ()) -> RebaseResult:
        """Fold acknowledged history into baselines. Run inside a transaction.

        An operation is folded when every replica that counts has acknowledged it: its server
        order is below the lowest acknowledged server order, and its timestamp is before the
        global ack. Differs from the reference in two ways that keep the server's snapshot equal
        to what every client computes:
        - each object's operations are walked in timestamp order over ALL its history and the
          walk stops at the first operation not yet acknowledged (the reference looks only at
          the acknowledged slice, so an older unacknowledged operation could end up behind a
          newer folded one);
        - an operation not newer than the object's baseline never changes it (clients ignore
          such operations; the reference applied them on top, letting an older value win).
        """
        result = RebaseResult()
        if not self.rebase_enabled:
            return result
        global_ack = self.shard.global_ack(online_replica_ids)
        result.global_ack = global_ack
        if global_ack is None:
            return result
        server_order = self.shard.earliest_acked_server_order()
        if server_order <= 0:
            return result
        deleted_refs: list[dict[str, Any]] = []
        for oid in self.shard.oids_with_operations_before(server_order, global_ack):
            history = self.shard.operations_for(oid)
            baseline = self.shard.baseline(oid)
            floor = baseline.timestamp if baseline is not None else None
            folded: list[StoredOperation] = []
            stale: list[StoredOperation] = []
            for op in history:
                acknowledged = op.server_order < server_order and op.timestamp < global_ack
                if floor is not None and op.timestamp <= floor:
                    # Already behind the baseline: no client applies it. Drop it once acked.
                    if acknowledged:
                        stale.append(op)
                    continue
                if not acknowledged:
                    break
                folded.append(op)
            if stale:
                self.shard.delete_operations(stale)
                result.folded_operations += len(stale)
            if not folded:
                continue
            snapshot = baseline.snapshot() if baseline is not None else None
            authz_key = baseline.authz if baseline is not None else folded[0].authz
            datas = [op.data() for op in folded]
            # One fold over the whole run keeps JavaScript-only state (array holes, properties
            # on arrays) between operations exactly as a client's fold does.
            snapshot = patches.apply_operations(
                snapshot,
                ({"data": data} for data in datas),
                deleted_refs,
                on_error=functools.partial(self._unappliable, oid),
            )
            for op, data in zip(folded, datas, strict=True):
                if data.get("op") == "initialize":
                    authz_key = op.authz
            self.shard.put_baseline(oid, snapshot, folded[-1].timestamp, authz_key)
            self.shard.delete_operations(folded)
            result.folded_operations += len(folded)
            result.objects += 1
        for ref in deleted_refs:
            if patches.is_file_ref(ref):
                self.shard.mark_file_pending_delete(ref["id"])
                result.deleted_file_ids.append(ref["id"])
        return result

    # -- recovery from a restore ------------------------------------------------------------

    def recovery_waiting_for(self) -> list[str]:
        """The replicas that count and have not re-sent their history since the restore."""
        if self.recovery is None:
            return []
        resynced = (row.replica_id for row in self.shard.resynced())
        return self.recovery.waiting_for(self.shard.replicas(), resynced, self.shard.is_truant)

    def end_recovery_if_over(self) -> str | None:
        """Clear the restored mark if the recovery is over; returns why (None: not over, or no
        recovery). Run inside a transaction; once it committed, the caller sets `recovery` to
        None: from then on the library is like one never restored."""
        if self.recovery is None:
            return None
        reason = self.recovery.over(self.shard.wall_clock_ms(), len(self.recovery_waiting_for()))
        if reason is not None:
            self.shard.clear_restore_mark()
        return reason

    def _restored_info(self) -> dict[str, Any] | None:
        if self.recovery is None:
            return None
        mark = self.recovery.mark
        resynced = self.shard.resynced()
        return {
            "restoredAtMs": mark.restored_at_ms,
            "source": mark.source,
            "tool": mark.tool,
            "latestServerOrder": mark.latest_server_order,
            "newestTimestamp": mark.newest_timestamp,
            "replicaCount": mark.replica_count,
            "resynced": [
                {
                    "replicaId": row.replica_id,
                    "resyncedAtMs": row.resynced_at_ms,
                    "recoveredOperations": row.recovered_operations,
                }
                for row in resynced
            ],
            "recoveredOperations": sum(row.recovered_operations for row in resynced),
            "waitingFor": self.recovery_waiting_for(),
            # the mark goes once nobody is waited for and the grace has passed, or in any case
            # when the truancy period has
            "graceEndsAtMs": mark.restored_at_ms + self.recovery.grace_ms,
            "endsByMs": mark.restored_at_ms + self.recovery.truancy_ms,
        }

    # -- reading documents ------------------------------------------------------------------

    def object_snapshot(self, oid: str) -> Any:
        """An object's current state: its baseline plus newer operations in timestamp order."""
        baseline = self.shard.baseline(oid)
        snapshot = baseline.snapshot() if baseline is not None else None
        floor = baseline.timestamp if baseline is not None else None
        newer = (
            {"data": op.data()}
            for op in self.shard.operations_for(oid)
            if floor is None or op.timestamp > floor
        )
        return patches.apply_operations(snapshot, newer, on_error=lambda error: None)

    def _unappliable(self, oid: str, error: patches.PatchError) -> None:
        # Validated on the way in, so this is history written by someone else; clients skip
        # what they cannot apply, and so do we.
        log.error(
            "skipping unappliable operation during compaction library=%s oid=%s error=%s",
            self.id, oid, error,
        )

    def hydrate(
        self,
        oid: str,
        file_info: Callable[[str], dict[str, Any] | None],
        *,
        _seen: frozenset[str] = frozenset(),
    ) -> Any:
        """A document with nested objects and file infos resolved (for admin and tests).

        A reference cycle (possible only in hostile data) resolves to None instead of looping.
        """
        if oid in _seen or len(_seen) > 256:
            return None
        seen = _seen | {oid}
        snapshot = self.object_snapshot(oid)

        def resolve(value: Any) -> Any:
            if patches.is_object_ref(value):
                return self.hydrate(value["id"], file_info, _seen=seen)
            if patches.is_file_ref(value):
                return file_info(value["id"])
            return value

        if isinstance(snapshot, list):
            return [resolve(v) for v in snapshot]
        if isinstance(snapshot, dict):
            return {k: resolve(v) for k, v in snapshot.items()}
        return snapshot

    def info(self) -> dict[str, Any] | None:
        replicas = self.shard.replicas()
        data = {
            "id": self.id,
            "replicas": [
                {
                    "id": r.id,
                    "userId": r.user_id,
                    "ackedLogicalTime": r.acked_logical_time,
                    "ackedServerOrder": r.acked_server_order,
                    "type": r.type,
                    "truant": self.shard.is_truant(r),
                }
                for r in replicas
            ],
            "latestServerOrder": self.shard.latest_server_order(),
            "operationsCount": self.shard.operation_count(),
            "baselinesCount": self.shard.baseline_count(),
            "globalAck": self.global_ack(),
            "restored": self._restored_info(),
        }
        if not replicas and not data["operationsCount"] and not data["baselinesCount"]:
            return None
        return data
