"""The node-to-node endpoint: how slots move between running nodes.

It listens on `[cluster] internal_host`/`internal_port`, never behind HAProxy, and every request
must carry the cluster secret as its bearer token (compared in constant time). `verdant-trio
cluster move` (`move`) drives it; a target node uses it to pull from its source.

    GET  /cluster/status                    this node: table version, slots, libraries, its move
    GET  /cluster/placement                 the running table (text)
    POST /cluster/lock      {move, role, slots, version, peer}   one move at a time per node
    POST /cluster/release   {move}          source: fence, close (1012), wait closed, manifest
    GET  /cluster/moves/<move>/manifest     source: per library: shard (bytes, sha256, counts), files
    GET  /cluster/moves/<move>/shards/<name>, .../files/<library>/<file>/<name>   the bytes
    POST /cluster/receive   {move}          target: pull, check, install; stays fenced
    POST /cluster/placement {move, table}   write the table file atomically, apply it (as SIGHUP)
    POST /cluster/unfence   {move, slots}   target: serve the slots the new table gives it
    POST /cluster/finish    {move, role, slots, outcome}   done: the source drops its copies;
                                            undo: the source serves again, the target drops its
                                            copies; either way the lock goes

**The commit point** is the source applying the new table (`placement` with its move, once
released): before it, only the source may serve the slots (it is fenced, the target does not own
them), and undoing is unfencing the source; after it, the source never serves them again and the
move can only go forward. The source takes that table only if it released the slots within
this move's lock and they are still fenced, so its files are the ones the target copied (a
restart loses the lock and the fence: a source that could have served again refuses). Likewise
a target takes a table that gives it the slots only once it has received them in this lock.

**Leases.** A lock lasts `[cluster] move_timeout_s`; long requests run under the same deadline.
If the orchestrator vanishes, the lock expires: a source serves its slots again if its table
still gives them to it (otherwise it keeps its copies for a new run to copy again); a target
serves them if its table gives them to it, or else drops what it received.

Queue policy: there is none; one move holds the node at a time, and a request for another move
is refused (409). Big reads, hashes, fsyncs and renames run in worker threads (`copies`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ...engine.core import VerdantCore
from . import copies
from .copies import CopyError, Manifest, Sink
from .node import ClusterNode, PlacementRefused
from .peer import Peer, PeerError, open_peers
from .placement import PlacementError, format_slots, parse, parse_slots, render
from .tablefile import write_placement

log = logging.getLogger(__name__)

MOVE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_BODY_BYTES: Final = 1024 * 1024
"""Requests carry ids, slot lists and at most one table (~60 KB): anything bigger is refused."""


class Role(StrEnum):
    SOURCE = "source"
    TARGET = "target"
    BYSTANDER = "bystander"
    """Neither: locked so that no other move runs, and given the new table."""


class Phase(StrEnum):
    LOCKED = "locked"
    RELEASING = "releasing"
    RELEASED = "released"
    COMMITTING = "committing"
    COMMITTED = "committed"
    RECEIVING = "receiving"
    RECEIVED = "received"
    FAILED = "failed"


class TransferError(Exception):
    """A request refused: `status` and a message for the caller (never a secret)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)
class Move:
    """The move holding this node."""

    id: str
    role: Role
    slots: frozenset[int]
    peer: str | None
    version: int
    started_at: float
    deadline: float
    phase: Phase = Phase.LOCKED
    manifest: Manifest | None = None
    answer: dict[str, Any] | None = None
    """What release or receive answered (asked again, it answers the same)."""
    work: trio.CancelScope = field(default_factory=trio.CancelScope)
    """Cancelled by an undo: a release or receive still running stops."""
    busy: int = 0
    idle: trio.Event = field(default_factory=trio.Event)
    """Set while no request is working for this move (the lease waits for it)."""

    def __post_init__(self) -> None:
        self.idle.set()

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "move": self.id, "role": str(self.role), "phase": str(self.phase),
            "slots": format_slots(self.slots), "peer": self.peer, "version": self.version,
            "age_s": round(now - self.started_at, 3),
            "lease_left_s": round(max(0.0, self.deadline - now), 3),
        }


def _move_id(value: Any) -> str:
    if not isinstance(value, str) or not MOVE_ID.fullmatch(value):
        raise TransferError(400, f"a move id is 1-64 letters, digits, '-' or '_', got {value!r}")
    return value


def _role(value: Any) -> Role:
    try:
        return Role(str(value))
    except ValueError:
        raise TransferError(400, f"role must be one of {', '.join(Role)}") from None


def _slots(value: Any) -> frozenset[int]:
    try:
        return parse_slots(value)
    except ValueError as exc:
        raise TransferError(400, f"slots: {exc}") from None


class Transfers:
    """This node's side of moves: the lock, the decisions, and the disk work they start."""

    def __init__(
        self,
        node: ClusterNode,
        core: VerdantCore,
        *,
        secret: str,
        placement_file: Path,
        databases_dir: Path,
        files_root: Path | None,
        lease_s: float,
    ) -> None:
        self.node = node
        self.core = core
        self._secret = secret
        self.placement_file = placement_file
        self.databases_dir = databases_dir
        self.files_root = files_root
        self.lease_s = lease_s
        self.move: Move | None = None
        self._changed = trio.Event()
        """Set (and replaced) whenever the lock changes: the lease task re-reads it."""

    def _poke(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- helpers ------------------------------------------------------------------------------

    def _current(self, move_id: str, role: Role | None = None) -> Move:
        move = self.move
        if move is None or move.id != move_id:
            held = f" (this node is locked by move {move.id})" if move is not None else ""
            raise TransferError(409, f"move {move_id} does not hold this node{held}; it expired "
                                "or the node restarted")
        if role is not None and move.role is not role:
            raise TransferError(409, f"this node is the move's {move.role}, not its {role}")
        return move

    def _not_locked_by_another(self, move_id: str) -> Move | None:
        move = self.move
        if move is not None and move.id != move_id:
            left = move.deadline - trio.current_time()
            raise TransferError(409, f"locked by move {move.id} ({left:.0f} s of its lease left)")
        return move

    @contextlib.contextmanager
    def _working(self, move: Move) -> Iterator[None]:
        move.busy += 1
        move.idle = trio.Event() if move.idle.is_set() else move.idle
        try:
            yield
        finally:
            move.busy -= 1
            if move.busy == 0:
                move.idle.set()

    @contextlib.contextmanager
    def _bounded(self, move: Move, what: str) -> Iterator[None]:
        """The lease bounds the work; an undo cancels it."""
        try:
            with trio.fail_at(move.deadline), move.work:
                yield
        except trio.TooSlowError:
            move.phase = Phase.FAILED
            raise TransferError(504, f"{what} did not finish within the move's lease") from None
        if move.work.cancelled_caught:
            move.phase = Phase.FAILED
            raise TransferError(409, f"{what} stopped: the move was undone")

    # -- lock ---------------------------------------------------------------------------------

    def lock(self, body: dict[str, Any]) -> dict[str, Any]:
        move_id = _move_id(body.get("move"))
        current = self._not_locked_by_another(move_id)
        if current is not None:
            return self._lock_answer(current)
        role = _role(body.get("role"))
        slots = _slots(body.get("slots"))
        version = body.get("version")
        peer = body.get("peer")
        node = self.node
        if version != node.placement.version:
            raise TransferError(409, f"this node runs table version {node.placement.version}, "
                                f"not {version}")
        if role is not Role.BYSTANDER and not isinstance(peer, str):
            raise TransferError(400, "a source or target lock names its peer")
        if role is Role.SOURCE:
            in_table = sum(1 for slot in slots if node.in_table(slot))
            if in_table not in (0, len(slots)):
                raise TransferError(409, "this node's table gives it only some of the slots")
        elif role is Role.TARGET:
            served = [slot for slot in slots if node.serves(slot)]
            if served:
                raise TransferError(409, f"this node already serves slots {format_slots(served)}")
            if peer not in node.peers:
                raise TransferError(409, f"no address for the source {peer} in [cluster] peers")
        now = trio.current_time()
        move = Move(move_id, role, slots, peer if isinstance(peer, str) else None,
                    node.placement.version, now, now + self.lease_s)
        self.move = move
        self._poke()
        log.info(
            "move locked move=%s role=%s slots=%s peer=%s version=%d lease_s=%.0f",
            move.id, move.role, format_slots(slots), move.peer, move.version, self.lease_s,
        )
        return self._lock_answer(move)

    def _lock_answer(self, move: Move) -> dict[str, Any]:
        return {"node": self.node.node_id, **move.describe(trio.current_time())}

    # -- the source ---------------------------------------------------------------------------

    async def release(self, body: dict[str, Any]) -> dict[str, Any]:
        """Fence the slots, release their libraries, settle and describe their shards."""
        move = self._current(_move_id(body.get("move")), Role.SOURCE)
        if move.phase is Phase.RELEASED and move.answer is not None:
            return move.answer
        if move.phase is not Phase.LOCKED:
            raise TransferError(409, f"the move is {move.phase} here")
        node = self.node
        with self._working(move), self._bounded(move, "the release"):
            move.phase = Phase.RELEASING
            started = trio.current_time()
            fence = all(node.in_table(slot) for slot in move.slots)
            closed_before = node.libraries_released
            if fence:  # otherwise the table already took them (a run that finishes a move)
                node.fence(move.slots)
                await node.wait_released()
            released = trio.current_time()
            try:
                manifest = await trio.to_thread.run_sync(
                    copies.describe, self.databases_dir, self.files_root, move.slots
                )
            except (CopyError, OSError) as exc:
                move.phase = Phase.FAILED
                raise TransferError(500, f"the slots' data cannot be described: {exc}") from None
            move.manifest = manifest
            move.phase = Phase.RELEASED
            done = trio.current_time()
            move.answer = {
                "move": move.id, "node": node.node_id, "fenced": fence,
                "libraries_closed": node.libraries_released - closed_before,
                "release_s": round(released - started, 4),
                "describe_s": round(done - released, 4),
                "totals": manifest.totals.to_json(),
            }
        log.info(
            "move released move=%s slots=%s fenced=%s libraries=%d closed=%d bytes=%d "
            "release_ms=%.1f describe_ms=%.1f",
            move.id, format_slots(move.slots), fence, len(manifest.libraries),
            move.answer["libraries_closed"], manifest.totals.size_bytes,
            (released - started) * 1000, (done - released) * 1000,
        )
        return move.answer

    def download_path(self, move_id: str, kind: str, name: str) -> tuple[Path, int]:
        move = self._current(_move_id(move_id), Role.SOURCE)
        if move.manifest is None or move.phase not in (
            Phase.RELEASED, Phase.COMMITTING, Phase.COMMITTED
        ):
            raise TransferError(409, f"the move is {move.phase} here, not released")
        found = copies.source_path(self.databases_dir, self.files_root, move.manifest, kind, name)
        if found is None:
            raise TransferError(404, f"{kind} {name!r} is not in this move's manifest")
        return found

    def manifest(self, move_id: str) -> dict[str, Any]:
        move = self._current(_move_id(move_id), Role.SOURCE)
        if move.manifest is None:
            raise TransferError(409, f"the move is {move.phase} here, not released")
        return move.manifest.to_json()

    # -- the target ---------------------------------------------------------------------------

    async def receive(self, body: dict[str, Any]) -> dict[str, Any]:
        """Pull the source's copies, check them, install them; the slots stay fenced."""
        move = self._current(_move_id(body.get("move")), Role.TARGET)
        if move.phase is Phase.RECEIVED and move.answer is not None:
            return move.answer
        if move.phase is not Phase.LOCKED:
            raise TransferError(409, f"the move is {move.phase} here")
        node = self.node
        assert move.peer is not None
        served = [slot for slot in move.slots if node.serves(slot)]
        if served:
            raise TransferError(409, f"this node already serves slots {format_slots(served)}")
        url = node.peers.get(move.peer)
        if url is None:
            raise TransferError(409, f"no address for the source {move.peer} in [cluster] peers")
        with self._working(move), self._bounded(move, "the receive"):
            move.phase = Phase.RECEIVING
            # Held back until the move says so, whatever table arrives meanwhile.
            node.fence(move.slots)
            started = trio.current_time()
            staging = copies.staging_dirs(self.databases_dir, self.files_root, move.id)
            await trio.to_thread.run_sync(copies.remove_staging, self.databases_dir, self.files_root)
            try:
                async with open_peers({move.peer: url}, self._secret) as peers:
                    manifest = await self._pull_all(peers[move.peer], move, staging)
                await trio.to_thread.run_sync(
                    copies.install, self.databases_dir, self.files_root, staging, manifest
                )
            except PeerError as exc:
                move.phase = Phase.FAILED
                raise TransferError(502, f"pulling from {move.peer}: {exc.message}") from None
            except CopyError as exc:
                move.phase = Phase.FAILED
                raise TransferError(422, f"the copy does not match the source: {exc}") from None
            except OSError as exc:  # a full disk, say: nothing of it is installed
                move.phase = Phase.FAILED
                raise TransferError(500, f"writing the copy: {exc}") from None
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        copies.remove_staging, self.databases_dir, self.files_root
                    )
            move.phase = Phase.RECEIVED
            move.answer = {
                "move": move.id, "node": node.node_id, "totals": manifest.totals.to_json(),
                "receive_s": round(trio.current_time() - started, 4),
            }
        log.info(
            "move received move=%s slots=%s source=%s libraries=%d bytes=%d receive_ms=%.1f",
            move.id, format_slots(move.slots), move.peer, len(manifest.libraries),
            manifest.totals.size_bytes, move.answer["receive_s"] * 1000,
        )
        return move.answer

    async def _pull_all(self, source: Peer, move: Move, staging: list[Path]) -> Manifest:
        base = f"/cluster/moves/{move.id}"
        try:
            manifest = Manifest.from_json(await source.call("GET", f"{base}/manifest"), move.slots)
        except ValueError as exc:
            raise CopyError(f"the source's manifest is not usable: {exc}") from None
        if self.files_root is None and any(lib.files for lib in manifest.libraries):
            raise CopyError("the source has files for these libraries and this node has no "
                            "[files] root")
        for lib in manifest.libraries:
            if lib.shard is not None:
                path = staging[0] / lib.shard.name
                await self._pull(source, f"{base}/shards/{quote(lib.shard.name, safe='')}",
                                 path, lib.shard.size_bytes, lib.shard.sha256, move.deadline)
                await trio.to_thread.run_sync(copies.check_shard, path, lib.shard)
            for item in lib.files:
                file_dir, name = item.path.split("/")
                url = f"{base}/files/{quote(lib.directory, safe='')}/{quote(file_dir, safe='')}" \
                      f"/{quote(name, safe='')}"
                await self._pull(source, url, staging[1] / lib.directory / file_dir / name,
                                 item.size_bytes, item.sha256, move.deadline)
        return manifest

    async def _pull(
        self, source: Peer, url: str, path: Path, size: int, sha256: str, deadline: float
    ) -> None:
        """One file to `path`, written and hashed in a worker thread chunk by chunk."""
        sink = await trio.to_thread.run_sync(Sink, path)

        async def write(chunk: bytes) -> None:
            await trio.to_thread.run_sync(sink.write, chunk)

        try:
            await source.download(url, write, timeout_s=max(1.0, deadline - trio.current_time()))
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(sink.abort)
            raise
        await trio.to_thread.run_sync(sink.finish, size, sha256)

    def unfence(self, body: dict[str, Any]) -> dict[str, Any]:
        move_id = _move_id(body.get("move"))
        current = self._not_locked_by_another(move_id)
        slots = current.slots if current is not None else _slots(body.get("slots"))
        if current is not None and current.role is not Role.TARGET:
            raise TransferError(409, f"this node is the move's {current.role}, not its target")
        if current is not None and current.phase is not Phase.RECEIVED:
            raise TransferError(409, f"the move is {current.phase} here: nothing received to serve")
        self.node.unfence(slots)
        serving = all(self.node.serves(slot) for slot in slots)
        log.info("move unfenced move=%s slots=%s serving=%s", move_id, format_slots(slots), serving)
        return {"move": move_id, "node": self.node.node_id, "serving": serving}

    # -- the table ----------------------------------------------------------------------------

    async def apply_placement(self, body: dict[str, Any]) -> dict[str, Any]:
        """Write the table file atomically, then switch to it; for the move's source, the
        move's commit point (see the module)."""
        move_id = _move_id(body.get("move"))
        text = body.get("table")
        if not isinstance(text, str):
            raise TransferError(400, "table: the placement table's text")
        try:
            table = parse(text, "the table sent")
        except PlacementError as exc:
            raise TransferError(400, str(exc)) from None
        move = self._not_locked_by_another(move_id)
        if move is None:
            raise TransferError(409, f"move {move_id} does not hold this node; it expired or "
                                "the node restarted")
        node = self.node
        running = node.placement
        if table.version < running.version or (
            table.version == running.version and table.owners != running.owners
        ):
            raise TransferError(409, f"refused: version {table.version} against the running "
                                f"{running.version} (a changed table needs a newer version)")
        if table.version == running.version:
            return {"node": node.node_id, "version": table.version, "applied": False}
        commit = move.role is Role.SOURCE and any(
            node.in_table(slot) and table.owners[slot] != node.node_id for slot in move.slots
        )
        if commit and (move.phase is not Phase.RELEASED or not move.slots <= node.fenced):
            raise TransferError(409, f"the table takes slots this node has not released in this "
                                f"move (the move is {move.phase} here)")
        gains = move.role is Role.TARGET and any(
            table.owners[slot] == node.node_id and not node.in_table(slot) for slot in move.slots
        )
        if gains and move.phase is not Phase.RECEIVED:
            raise TransferError(409, f"the table gives this node slots it has not received in "
                                f"this move (the move is {move.phase} here)")
        with self._working(move):
            if commit:
                move.phase = Phase.COMMITTING
            try:
                await trio.to_thread.run_sync(write_placement, self.placement_file, table)
                node.update(table)
            except (OSError, PlacementRefused) as exc:
                move.phase = Phase.FAILED
                log.error("placement not applied move=%s version=%d error=%s",
                          move.id, table.version, exc)
                raise TransferError(500, f"the table was not applied: {exc}") from None
            if commit:
                move.phase = Phase.COMMITTED
        log.info("placement applied by move move=%s version=%d commit=%s",
                 move.id, table.version, commit)
        return {"node": node.node_id, "version": table.version, "applied": True}

    # -- the end ------------------------------------------------------------------------------

    async def finish(self, body: dict[str, Any]) -> dict[str, Any]:
        """End the move here: `done` after the switch, `undo` before it; see the module."""
        move_id = _move_id(body.get("move"))
        move = self._not_locked_by_another(move_id)
        outcome = body.get("outcome")
        if outcome not in ("done", "undo"):
            raise TransferError(400, "outcome must be done or undo")
        role = _role(body.get("role"))
        slots = move.slots if move is not None else _slots(body.get("slots"))
        if move is not None:
            if move.role is not role:
                raise TransferError(409, f"this node is the move's {move.role}, not its {role}")
            if outcome == "undo":
                move.work.cancel()  # a release or receive still running stops first
            await move.idle.wait()
        answer = await self._finish(move_id, role, slots, outcome)
        if move is not None and self.move is move:
            self.move = None
            self._poke()
        log.info(
            "move finished move=%s role=%s outcome=%s slots=%s serving=%s shards_removed=%s "
            "file_dirs_removed=%s", move_id, role, outcome, format_slots(slots),
            answer.get("serving", "-"), answer.get("shards_removed", 0),
            answer.get("file_dirs_removed", 0),
        )
        return {"move": move_id, "node": self.node.node_id, **answer}

    async def _finish(
        self, move_id: str, role: Role, slots: frozenset[int], outcome: str
    ) -> dict[str, Any]:
        node = self.node
        in_table = [slot for slot in slots if node.in_table(slot)]
        if role is Role.BYSTANDER:
            return {}
        if role is Role.SOURCE and outcome == "undo":  # serve again what the table gives
            node.unfence(slots)
            return {"serving": all(node.serves(slot) for slot in slots)}
        if role is Role.SOURCE or outcome == "undo":  # the copies of slots this node lost
            if in_table:
                raise TransferError(409, f"this node's table still gives it slots "
                                    f"{format_slots(in_table)}: its copies are the live ones")
            shards, directories = await trio.to_thread.run_sync(
                copies.remove_slots, self.databases_dir, self.files_root, slots
            )
            node.unfence(slots)
            return {"shards_removed": shards, "file_dirs_removed": directories}
        node.unfence(slots)  # the target, done
        return {"serving": all(node.serves(slot) for slot in slots)}

    # -- the lease ----------------------------------------------------------------------------

    async def run_leases(self) -> None:
        """End a move whose orchestrator went away (see the module), until cancelled."""
        while True:
            changed, move = self._changed, self.move
            if move is None:
                await changed.wait()
                continue
            if trio.current_time() < move.deadline:
                with trio.move_on_at(move.deadline):
                    await changed.wait()
                continue
            if move.busy:
                await move.idle.wait()  # requests are bounded by the same deadline
                continue
            await self._expire(move)

    async def _expire(self, move: Move) -> None:
        node = self.node
        lost = [slot for slot in move.slots if not node.in_table(slot)]
        try:
            if move.role is Role.TARGET and lost:
                await trio.to_thread.run_sync(
                    copies.remove_slots, self.databases_dir, self.files_root, lost
                )
            if move.role is not Role.BYSTANDER:
                node.unfence(move.slots)
        finally:
            if self.move is move:
                self.move = None
                self._poke()
        log.warning(
            "move lease expired; the move is abandoned here move=%s role=%s phase=%s slots=%s "
            "serving=%s copies_dropped=%s",
            move.id, move.role, move.phase, format_slots(move.slots),
            all(node.serves(slot) for slot in move.slots) if not lost else False,
            move.role is Role.TARGET and bool(lost),
        )

    # -- status -------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        node = self.node
        per_slot = await trio.to_thread.run_sync(copies.shards_per_slot, self.databases_dir)
        owned = sum(n for slot, n in enumerate(per_slot) if node.in_table(slot))
        table = render(node.placement)
        return {
            "node": node.node_id,
            "version": node.placement.version,
            "table_sha256": hashlib.sha256(table.encode()).hexdigest(),
            "slots_in_table": node.placement.counts().get(node.node_id, 0),
            "slots_served": node.slots_owned,
            "fenced": format_slots(node.fenced),
            "libraries_open": len(self.core.libraries.active),
            "shards": owned,
            "stray_shards": sum(per_slot) - owned,
            "move": None if self.move is None else self.move.describe(trio.current_time()),
            "peers": sorted(node.peers),
        }

    def table_text(self) -> str:
        return render(self.node.placement)


# -- HTTP ---------------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status=status, content_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


async def _body() -> dict[str, Any]:
    raw = await request.get_data()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise TransferError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise TransferError(400, "the body must be a JSON object")
    return body


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    async with await trio.open_file(path, "rb") as handle:
        while chunk := await handle.read(copies.CHUNK_BYTES):
            yield chunk


def internal_app(transfers: Transfers, secret: str) -> QuartTrio:
    """The endpoint's routes (see the module), behind the cluster secret."""
    app = QuartTrio("verdant_trio.internal")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = 30
    app.config["RESPONSE_TIMEOUT"] = None  # a shard streams as long as it takes (the lease)
    expected = secret.encode()

    @app.before_request
    async def authenticate() -> Response | None:
        kind, _, token = request.headers.get("Authorization", "").partition(" ")
        if kind != "Bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            log.warning("internal request refused: no or wrong cluster secret path=%s remote=%s",
                        request.path, request.remote_addr)
            return _error(401, "the cluster secret is missing or wrong")
        return None

    @app.errorhandler(TransferError)
    async def refused(error: TransferError) -> Response:
        if error.status >= 500:
            log.error("internal request failed path=%s error=%s", request.path, error.message)
        else:
            log.info("internal request refused path=%s status=%d error=%s",
                     request.path, error.status, error.message)
        return _error(error.status, error.message)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        return _error(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        log.exception("internal request failed path=%s", request.path)
        return _error(500, f"internal error: {type(error).__name__}")

    def post(path: str, handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        async def route() -> Response:
            return _json(await handler(await _body()))

        app.add_url_rule(path, path, route, methods=["POST"])

    async def lock(body: dict[str, Any]) -> dict[str, Any]:
        return transfers.lock(body)

    async def unfence(body: dict[str, Any]) -> dict[str, Any]:
        return transfers.unfence(body)

    post("/cluster/lock", lock)
    post("/cluster/release", transfers.release)
    post("/cluster/receive", transfers.receive)
    post("/cluster/placement", transfers.apply_placement)
    post("/cluster/unfence", unfence)
    post("/cluster/finish", transfers.finish)

    @app.get("/cluster/status")
    async def status() -> Response:
        return _json(await transfers.status())

    @app.get("/cluster/placement")
    async def placement() -> Response:
        return Response(transfers.table_text(), content_type="text/plain; charset=utf-8")

    @app.get("/cluster/moves/<move_id>/manifest")
    async def manifest(move_id: str) -> Response:
        return _json(transfers.manifest(move_id))

    def stream(kind: str, move_id: str, name: str) -> Response:
        path, size = transfers.download_path(move_id, kind, name)
        return Response(
            _file_chunks(path), content_type="application/octet-stream",
            headers={"Content-Length": str(size)},
        )

    @app.get("/cluster/moves/<move_id>/shards/<name>")
    async def shard(move_id: str, name: str) -> Response:
        return stream("shard", move_id, name)

    @app.get("/cluster/moves/<move_id>/files/<directory>/<file_dir>/<name>")
    async def file(move_id: str, directory: str, file_dir: str, name: str) -> Response:
        return stream("file", move_id, f"{directory}/{file_dir}/{name}")

    return app


def _hypercorn_config(host: str, port: int, graceful_timeout_s: float) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = graceful_timeout_s
    config.include_server_header = False
    return config


async def serve_internal(
    transfers: Transfers,
    *,
    secret: str,
    host: str,
    port: int,
    shutdown: trio.Event,
    graceful_timeout_s: float = 5.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The internal listener and the lease task, until `shutdown` (requests in flight get
    `graceful_timeout_s`) or cancellation; reports the bound addresses once listening."""
    app = internal_app(transfers, secret)
    config = _hypercorn_config(host, port, graceful_timeout_s)
    async with trio.open_nursery() as nursery:

        async def http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await hypercorn_serve(
                    app, config, shutdown_trigger=shutdown.wait, task_status=task_status
                )
            finally:
                nursery.cancel_scope.cancel()  # the lease task ends with the listener

        nursery.start_soon(transfers.run_leases)
        binds = await nursery.start(http)
        log.info("internal listener (node to node) on %s node=%s", " ".join(binds),
                 transfers.node.node_id)
        task_status.started(binds)
    log.info("internal listener stopped node=%s", transfers.node.node_id)
