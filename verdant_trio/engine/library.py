"""Active libraries: one Trio task per library owns its shard and handles its messages in order.

Why one task per library: Verdant's decisions (server order, acknowledgements, compaction) are
sequential per library, and SQLite wants one writer. The task drains its bounded inbox in
batches, handles a whole batch in one transaction in a worker thread (so a commit's fsync or a big
initial sync never blocks the event loop; a small batch without operations runs on the event
loop instead, see `INLINE_HISTORY_ROWS`), and only after the commit hands the encoded replies
and broadcasts to the peers. The thread hand-off is also what makes batches: while one batch
commits, the next one gathers (measured: committing small batches on the event loop instead made
batches smaller and cost a quarter more CPU per operation). Under load batches grow, so commits,
acknowledgement broadcasts and compaction passes are paid per batch, not per message.

Queue policies (every queue is bounded):
- inbox (`inbox_size` envelopes): senders block. That is backpressure on the connection readers.
- peer outboxes: `Peer.deliver` never blocks; the peer decides what a full outbox means
  (`connections`: close the slow consumer).
- detaching never blocks (a finally-block must not wait on a busy library): detached peers go on
  a list bounded by the number of connections and the task is nudged.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

import trio

from ..storage.shard import Shard
from ..sync.codes import CloseCode
from ..sync.decisions import LibraryCore, Outcome, Peer, RebaseResult, Send
from ..sync.errors import ErrorCode, VerdantError
from ..sync.protocol import ClientMessage, Op, Sync
from ..sync.recovery import Recovery
from ..sync.store import RestoreMark
from .envelopes import (
    WAKE,
    Attach,
    Call,
    Encoded,
    Envelope,
    Http,
    Message,
    Work,
    can_wait,
    carries_operations,
    encode_sends,
)
from .observe import NULL_OBSERVER, Observer
from .settings import LibrarySettings
from .upkeep import Upkeep

if TYPE_CHECKING:
    from .registry import Libraries

log = logging.getLogger(__name__)

T = TypeVar("T")


INLINE_HISTORY_ROWS: Final = 512
"""A batch without operations, in a library whose history (operations and baselines) is at most
this many rows, runs on the event loop instead of in a worker thread. Measured, a worker-thread
round trip costs ~150 µs of CPU, more than such a batch (a new replica's sync of a small library,
a run of acknowledgements); operations stay in the thread, where a commit in progress lets the
next batch gather (see the module docstring)."""


class LibraryGone(Exception):
    """The library was evicted or its task stopped; the caller's connection should close."""


class LibraryHost:
    """The task that owns one library. Get one through `Libraries.use`."""

    def __init__(
        self,
        library_id: str,
        settings: LibrarySettings,
        registry: Libraries,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.id = library_id
        self.settings = settings
        self._registry = registry
        self._observer = observer
        self._send, self._receive = trio.open_memory_channel[Envelope](settings.inbox_size)
        self._detached: list[Peer] = []
        self._failed: set[int] = set()
        """Keys of realtime peers a message of which was rolled back, until they have gone
        (bounded by the peers attached: each is closed, and forgotten when it departs)."""
        self._attach_queued: set[int] = set()
        """Keys of peers whose attach is in the inbox, not applied yet. A peer that departs
        meanwhile is taken out, and its attach is then dropped: applied after the departure, it
        would stay attached (and its user present) for as long as the library runs."""
        self._upkeep = Upkeep(settings)
        self.refs = 0
        self.accepting = True
        self.closed = trio.Event()
        self.recovered = trio.Event()
        """Set once the library is not recovering from a restore: at open for a library never
        restored (or whose recovery was over), else when its restored mark is cleared."""
        self.core: LibraryCore | None = None
        self._cancel = trio.CancelScope()
        self._in_hand: list[Envelope] = []
        """The batch taken from the inbox and not handled yet: a stop that lands between taking
        and handling (at any checkpoint of `_gather`) must fail these too, or their callers
        would wait forever."""
        self._small_history: bool | None = None
        """Whether the history is at most `INLINE_HISTORY_ROWS` (None: not known yet)."""
        self._last_ops_at = -math.inf
        self._last_activity = trio.current_time()
        self.on_empty: Callable[[LibraryHost], None] | None = None

    # -- used by connections and HTTP handlers ----------------------------------------------

    async def attach(self, peer: Peer) -> None:
        self._attach_queued.add(peer.key)
        try:
            await self._put(Attach(peer))
        except BaseException:
            self._attach_queued.discard(peer.key)
            raise

    def detach(self, peer: Peer) -> None:
        """Never blocks: safe in a finally-block while the library is busy."""
        self._attach_queued.discard(peer.key)
        self._detached.append(peer)
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send.send_nowait(WAKE)

    def submit_nowait(self, peer: Peer, messages: list[ClientMessage]) -> bool:
        """Queue messages if the inbox has room; False when it is full (the caller waits)."""
        try:
            self._send.send_nowait(Message(peer, messages))
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LibraryGone(self.id) from None
        return True

    async def submit(
        self, peer: Peer, messages: list[ClientMessage], *, wait: bool = False
    ) -> None:
        """Queue messages; with `wait`, return only once they were handled (or failed).

        A connection hands over everything it has read in one envelope: the library's batch
        then holds a writer's whole window of operations rather than one operation per
        connection in turn, so they are stored, acknowledged and broadcast together.
        """
        envelope = Message(peer, messages, trio.Event() if wait else None)
        await self._put(envelope)
        if envelope.done is not None:
            await envelope.done.wait()

    async def request(self, peer: Peer, messages: list[ClientMessage]) -> None:
        """Handle an HTTP batch; returns once its replies are in the peer."""
        envelope = Http(peer, messages)
        await self._put(envelope)
        await envelope.done.wait()
        if envelope.error is not None:
            raise envelope.error

    async def call(self, fn: Callable[[LibraryCore], T]) -> T:
        """Run `fn(core)` in the library task's turn, in a worker thread, in a transaction."""
        envelope = Call(fn)
        await self._put(envelope)
        await envelope.done.wait()
        if envelope.error is not None:
            raise envelope.error
        return envelope.result  # type: ignore[no-any-return]

    async def _put(self, envelope: Envelope) -> None:
        try:
            await self._send.send(envelope)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise LibraryGone(self.id) from None

    # -- the task ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        path = settings.shard_path(self.id)

        def open_shard() -> tuple[Shard, RestoreMark | None]:
            shard = Shard.open(
                path,
                truancy_minutes=settings.truancy_minutes,
                file_expiration_days=settings.file_expiration_days,
                synchronous=settings.synchronous,
            )
            try:
                return shard, shard.restore_mark()
            except BaseException:
                shard.close()
                raise

        shard, mark = await trio.to_thread.run_sync(open_shard)
        recovery = None if mark is None else Recovery(
            mark,
            grace_ms=int(settings.restore_grace_s * 1000),
            truancy_ms=int(settings.truancy_minutes * 60_000),
        )
        self.core = LibraryCore(self.id, shard, rebase=settings.rebase, recovery=recovery)
        self._upkeep.recovering = recovery is not None
        if recovery is None:
            self.recovered.set()
        log.info("library opened library=%s path=%s", self.id, path)
        if mark is not None:
            log.info(
                "library restored from a replica; recovering library=%s source=%s "
                "restored_at_ms=%d latest_server_order=%d",
                self.id, mark.source, mark.restored_at_ms, mark.latest_server_order,
            )
        self._observer.library_opened()
        task_status.started()
        try:
            with self._cancel:
                await self._loop()
        except Exception:
            # A crash: its peers reconnect to the library's next task. An idle one would never
            # notice otherwise (the core answers heartbeats) and would miss every later
            # operation of the others. (Eviction, a move and shutdown close theirs themselves.)
            self.disconnect_all(CloseCode.TRY_AGAIN_LATER, "library is restarting")
            raise
        finally:
            self.accepting = False
            self._registry.forget(self)
            self._send.close()
            self._fail_pending()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shard.close)
            self._observer.library_closed()
            self.closed.set()
            log.info("library closed library=%s", self.id)

    def stop(self) -> None:
        self._cancel.cancel()

    def disconnect_all(self, code: int, reason: str) -> int:
        """Close every realtime peer (eviction, shutdown); they reconnect and resync."""
        if self.core is None:
            return 0
        realtime = [peer for peer in self.core.peers.values() if peer.realtime]
        for peer in realtime:
            peer.close_soon(code, reason)
        return len(realtime)

    def _fail_pending(self) -> None:
        in_hand, self._in_hand = self._in_hand, []
        for envelope in in_hand:
            self._fail(envelope)
        while True:
            try:
                envelope = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            self._fail(envelope)

    def _fail(self, envelope: Envelope) -> None:
        """An envelope the library will never handle: its caller hears `LibraryGone`."""
        if isinstance(envelope, (Http, Call)):
            if not envelope.done.is_set():
                envelope.error = LibraryGone(self.id)
                envelope.done.set()
        elif isinstance(envelope, Message) and envelope.done is not None:
            envelope.done.set()

    async def _loop(self) -> None:
        while True:
            batch: list[Envelope] = []
            self._in_hand = batch
            try:  # what is already waiting needs no timer (a cancel scope per wake-up adds up)
                batch.append(self._receive.receive_nowait())
                await trio.lowlevel.checkpoint()
            except trio.WouldBlock:
                with trio.move_on_after(self._next_timer_in()):
                    batch.append(await self._receive.receive())
            await self._gather(batch)
            if batch:
                self._last_activity = trio.current_time()
                await self._process(batch)
                # Handled: nothing of it (a large sync's parsed form, say) may stay alive through
                # the compaction pass that often follows.
                batch.clear()
            self._handle_departures()
            await self._timers()
            if self._should_close():
                return

    async def _gather(self, batch: list[Envelope]) -> None:
        """Take what is waiting; while operations keep coming, linger to batch them.

        Every batch with operations costs a frame to every peer (its `op-re`) and a frame back
        from each (its acknowledgement), whatever the number of operations in it, and a frame
        costs far more than an operation. So while operations keep coming, a library handles
        operations and acknowledgements at most once per `batch_window_s` and the window's
        traffic travels together (one commit, one `op-re` per peer, acks merged). A quiet
        library (no operations for a window) handles each message at once, so there is no added
        latency without load; syncs, presence and HTTP requests are never held back; and a
        library with few peers never lingers (its broadcasts are cheap, and every wait lengthens
        its clients' round trips).
        """
        limit = self.settings.max_batch
        deadline = self._last_ops_at + self.settings.batch_window_s
        if self.core is not None and len(self.core.peers) < self.settings.batch_min_peers:
            deadline = -math.inf  # few listeners: a broadcast is cheap, waiting is not
            if batch and can_wait(batch[0]):
                # Instead, let every connection task that is already runnable hand over what
                # it read in the same wake-up (reader -> forwarder -> inbox is two scheduler
                # ticks): no wall time is added, and the batch carries the tick's operations
                # (measured: ~10 % more operations per CPU-second with 100 libraries x 2).
                for _ in range(self.settings.coalesce_ticks):
                    await trio.lowlevel.checkpoint()
        while batch and len(batch) < limit:
            try:
                batch.append(self._receive.receive_nowait())
                continue
            except trio.WouldBlock:
                pass
            if trio.current_time() >= deadline or not all(can_wait(e) for e in batch):
                break
            with trio.move_on_at(deadline):
                batch.append(await self._receive.receive())
        if any(carries_operations(e) for e in batch):
            self._last_ops_at = trio.current_time()

    def _next_timer_in(self) -> float:
        now = trio.current_time()
        deadlines = [now + 5.0, self._upkeep.next_deadline()]
        if self.refs == 0:
            deadlines.append(self._last_activity + self.settings.idle_close_s)
        return max(0.0, min(deadlines) - now)

    def _should_close(self) -> bool:
        if self.refs or self._upkeep.http_leases or self._detached:
            return False
        if trio.current_time() - self._last_activity < self.settings.idle_close_s:
            return False
        if self._send.statistics().current_buffer_used:
            return False
        # Closing is decided synchronously with the registry update, so no caller can grab a
        # host that is about to go.
        self.accepting = False
        self._registry.forget(self)
        return True

    # -- batches ----------------------------------------------------------------------------

    async def _process(self, batch: list[Envelope]) -> None:
        core = self.core
        assert core is not None
        for envelope in batch:
            if isinstance(envelope, Attach) and envelope.peer.key in self._attach_queued:
                self._attach_queued.discard(envelope.peer.key)
                core.attach(envelope.peer)
        work: list[Work] = [e for e in batch if isinstance(e, (Message, Http, Call))]
        if not work:
            return
        for envelope in work:
            if isinstance(envelope, Http):
                core.attach(envelope.peer)
                self._upkeep.lease(envelope.peer.user_id, None)
        try:
            if self._inline(work):
                result = self._run_batch(core, work)
            else:
                result = await trio.to_thread.run_sync(self._run_batch, core, work)
        except BaseException as exc:
            # The batch failed (rolled back, or committed but not encoded): tell waiting
            # callers, drop realtime peers so they resync, and keep serving the library.
            log.exception("library batch failed; rolled back library=%s", self.id)
            self._abort_batch(work, exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            for envelope in work:
                if isinstance(envelope, Http):
                    core.detach(envelope.peer)
                    self._upkeep.lease(envelope.peer.user_id, envelope.peer.replica_id)
        outcome, encoded, global_ack = result
        if outcome.stored:
            self._observer.operations_stored(outcome.stored)
        if outcome.resynced:
            self._observer.replicas_resynced(outcome.resynced)
            self._observer.operations_recovered(outcome.recovered)
        self._hand_over(encoded)
        if outcome.failed:
            self._close_failed(outcome)
        for envelope in work:
            if envelope.done is not None:
                envelope.done.set()
        for peer in outcome.detach:
            self.detach(peer)
        self._upkeep.after_batch(
            history_moved=outcome.acks_moved or outcome.changed_history, global_ack=global_ack,
            resynced=bool(outcome.resynced),
        )

    def _inline(self, work: list[Work]) -> bool:
        """Whether a batch is small enough for the event loop (see `INLINE_HISTORY_ROWS`)."""
        if self.settings.synchronous != "NORMAL":
            return False  # every commit waits for an fsync
        for envelope in work:
            if isinstance(envelope, Call):
                return False
            for message in envelope.messages:
                if isinstance(message, Op):
                    return False
                if isinstance(message, Sync) and (
                    self._small_history is not True
                    or len(message.operations) + len(message.baselines) > INLINE_HISTORY_ROWS
                ):
                    return False
        return True

    def _run_batch(
        self, core: LibraryCore, work: list[Work]
    ) -> tuple[Outcome, Encoded, str | None]:
        """The whole batch in one transaction, encoded after the commit: in a worker thread, or
        on the event loop when it is small (`_inline`)."""
        outcome = Outcome()
        with core.shard.transaction():
            for envelope in work:
                if isinstance(envelope, (Message, Http)):
                    for message in envelope.messages:
                        self._handle_one(core, envelope.peer, message, outcome)
                elif isinstance(envelope, Call):
                    try:
                        with core.shard.transaction():
                            envelope.result = envelope.fn(core)
                    except Exception as exc:  # reported to the caller, not fatal to the library
                        envelope.error = exc
            global_ack = core.global_ack() if outcome.acks_moved else None
        if outcome.changed_history or self._small_history is not True:
            self._small_history = core.shard.history_at_most(INLINE_HISTORY_ROWS)  # O(limit)
        return outcome, encode_sends(outcome.sends), global_ack

    def _handle_one(
        self, core: LibraryCore, peer: Peer, message: ClientMessage, outcome: Outcome
    ) -> None:
        """One message in its own savepoint: a bug on one message must not undo the others'.

        Its sender's later messages are not handled (in this batch, and in later ones until the
        peer has gone): a client reads the `server-ack` of a later message as "everything
        before it is synced" and would never send the lost one again. A realtime sender is
        closed (`_close_failed`), so it resyncs and sends what was not acknowledged.
        """
        if peer.key in outcome.failed or peer.key in self._failed:
            return
        undo = outcome.checkpoint()
        try:
            with core.shard.transaction():
                core.handle(peer, message, outcome)
        except Exception:
            undo()
            log.exception(
                "message failed and was rolled back library=%s user=%s replica=%s type=%s",
                self.id, peer.user_id, message.replica_id,
                type(message).__name__,
            )
            outcome.failed[peer.key] = peer
            outcome.sends.append(
                Send({"type": "error", "code": int(ErrorCode.UNEXPECTED),
                      "message": "the server could not handle this message"}, [peer])
            )

    def _close_failed(self, outcome: Outcome) -> None:
        """Senders of a rolled-back message: a realtime one is closed and ignored until it has
        gone (`_handle_departures` forgets it); an HTTP request ends with this batch."""
        for key, peer in outcome.failed.items():
            if peer.realtime:
                self._failed.add(key)
                peer.close_soon(CloseCode.INTERNAL_ERROR, "server error; reconnect to resync")

    def _abort_batch(self, work: list[Work], exc: BaseException) -> None:
        error = VerdantError(ErrorCode.UNEXPECTED, "the server could not store this batch")
        for envelope in work:
            if isinstance(envelope, (Http, Call)):
                envelope.error = error if isinstance(envelope, Http) else exc
                envelope.done.set()
            elif isinstance(envelope, Message):
                envelope.peer.close_soon(CloseCode.INTERNAL_ERROR, "server error; reconnect to resync")
                if envelope.done is not None:
                    envelope.done.set()

    # -- presence, acknowledgements, compaction -------------------------------------------

    def _handle_departures(self) -> None:
        core = self.core
        assert core is not None
        if not self._detached:
            return
        departed, self._detached = self._detached, []
        for peer in departed:
            self._failed.discard(peer.key)
        self._deliver(self._upkeep.departures(core, departed))
        self._maybe_empty()

    def _deliver(self, sends: list[Send]) -> None:
        if sends:
            self._hand_over(encode_sends(sends))

    def _hand_over(self, encoded: Encoded) -> None:
        """Each peer gets what the batch has for it in one `deliver`: a writer's `server-ack`
        and the `op-re` of its peers' operations leave in one write, not two (measured: 0.58 ->
        0.37 writes per operation; a proxy on another core also gets one segment instead of
        two). When no peer gets two messages (a fan-out: one `op-re` to every listener), each
        message goes straight out, without grouping."""
        observer = self._observer
        recipients = 0
        for kind, _payload, peers in encoded:
            observer.message_out(kind, len(peers))
            recipients += len(peers)
        if len(encoded) == 1 or len(
            {peer.key for _kind, _payload, peers in encoded for peer in peers}
        ) == recipients:
            for _kind, payload, peers in encoded:
                for peer in peers:
                    peer.deliver(payload)
            return
        by_peer: dict[int, tuple[Peer, list[bytes]]] = {}
        for _kind, payload, peers in encoded:
            for peer in peers:
                held = by_peer.get(peer.key)
                if held is None:
                    by_peer[peer.key] = (peer, [payload])
                else:
                    held[1].append(payload)
        for peer, payloads in by_peer.values():
            peer.deliver(*payloads)

    def _maybe_empty(self) -> None:
        core = self.core
        assert core is not None
        if not core.peers and not self._upkeep.http_leases and self.on_empty is not None:
            self.on_empty(self)

    async def _timers(self) -> None:
        core = self.core
        assert core is not None
        upkeep = self._upkeep
        if upkeep.http_leases:
            left = upkeep.expired_leases(core)
            if left:
                self._deliver(left)
                self._maybe_empty()
        if upkeep.rebase_now():  # compaction is batched: one pass per interval at most
            await self._rebase()
        self._deliver(upkeep.global_ack_now(core))
        if upkeep.recovery_check_now():
            await self._check_recovery()

    async def _check_recovery(self) -> None:
        """Clear the restored mark once the recovery is over (`LibraryCore.end_recovery_if_over`);
        from then on the library is exactly one never restored."""
        core = self.core
        assert core is not None

        def run() -> str | None:
            with core.shard.transaction():
                return core.end_recovery_if_over()

        try:
            reason = await trio.to_thread.run_sync(run)
        except Exception:
            log.exception("checking the recovery from a restore failed; will retry library=%s", self.id)
            return
        if reason is not None:
            core.recovery = None
            self._upkeep.recovering = False
            self.recovered.set()
            log.info("recovery from a restore is over; mark cleared library=%s reason=%s", self.id, reason)

    async def _rebase(self) -> None:
        core = self.core
        assert core is not None
        online = core.online_replica_ids()

        def run() -> RebaseResult:
            with core.shard.transaction():
                return core.rebase(online)

        started = time.perf_counter()  # a measurement for the metric, not a timer
        try:
            result = await trio.to_thread.run_sync(run)
        except Exception:
            log.exception("compaction failed; will retry later library=%s", self.id)
            return
        duration_s = time.perf_counter() - started
        if result.folded_operations:
            self._observer.rebase(duration_s, result.folded_operations)
            log.info(
                "compacted history library=%s operations=%d objects=%d files_pending=%d "
                "duration_ms=%.1f",
                self.id, result.folded_operations, result.objects,
                len(result.deleted_file_ids), duration_s * 1000,
            )
        self._upkeep.after_rebase(result)
