"""This node's share of a cluster: which libraries it serves now, and changes to that.

The engine's only view of the cluster is `ClusterNode.owns(library_id)`: true while the
placement table gives the library's slot to this node and the slot is not fenced. It reads a
precomputed flag per slot, so it costs a CRC of the id on every request.

A change that takes slots away (a new table on SIGHUP, or a fence for a move) takes effect on
the event loop at once: from then on every new request for those libraries is refused. The
libraries already open are then released in the node's own task (`run`): their sockets
closed with 1012, their batches finished, their shards checkpointed and closed. Slots gained
are served from the same moment.

Queue policy: changes are not queued. Each one updates the flags at once and adds its slots
to one set of slots awaiting release (at most `SLOT_COUNT`); the task releases whatever the
set holds when it wakes, so any number of changes costs one release at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import trio

from .placement import SLOT_COUNT, Placement, slot_of

log = logging.getLogger(__name__)


class Releaser(Protocol):
    """What the node needs of the engine's core (`VerdantCore.release`)."""

    async def release(self, predicate: Callable[[str], bool]) -> list[str]: ...


class PlacementRefused(ValueError):
    """A table that must not replace the running one (an older version, or the same version
    with other contents)."""


class ClusterNode:
    """The slots this node serves; `owns` is handed to the engine."""

    def __init__(
        self, node_id: str, placement: Placement, peers: Mapping[str, str] | None = None
    ) -> None:
        self.node_id = node_id
        self.placement = placement
        self.peers: Mapping[str, str] = dict(peers or {})
        """Other nodes' internal URLs (reloaded on SIGHUP)."""
        self._fenced: set[int] = set()
        self._serving = bytearray(SLOT_COUNT)
        self._to_release: set[int] = set()
        self._wake = trio.Event()
        """Set when `_to_release` gains slots; the task replaces it before each release."""
        self._settled = trio.Event()
        """Set while no release is pending or running (`wait_released`)."""
        self._settled.set()
        self.libraries_released = 0
        self.on_change: Callable[[], None] | None = None
        """Called when slots become served (a new table, a fence lifted): the daemon wires it
        to `VerdantCore.ownership_changed`, so refusals held meanwhile end at once."""
        self._recompute()

    # -- what the engine asks -----------------------------------------------------------------

    def owns(self, library_id: str) -> bool:
        return bool(self._serving[slot_of(library_id)])

    def serves(self, slot: int) -> bool:
        return bool(self._serving[slot])

    @property
    def fenced(self) -> frozenset[int]:
        """Slots held back whatever the table says (a move in progress)."""
        return frozenset(self._fenced)

    def in_table(self, slot: int) -> bool:
        """Whether the table gives `slot` to this node (fenced or not)."""
        return self.placement.owners[slot] == self.node_id

    @property
    def slots_owned(self) -> int:
        """Slots served now (the table's, less the fenced ones)."""
        return sum(self._serving)

    # -- changes ------------------------------------------------------------------------------

    def update(self, placement: Placement) -> None:
        """Switch to a newer table: slots lost are fenced now and released soon; slots gained
        are served now. The same table again changes nothing."""
        current = self.placement
        if placement.version < current.version:
            raise PlacementRefused(
                f"table version {placement.version} is older than the running {current.version}"
            )
        if placement.version == current.version:
            if placement.owners != current.owners:
                raise PlacementRefused(
                    f"table version {placement.version} has other contents than the running "
                    "table of the same version (a changed table needs a new version)"
                )
            return
        before = bytes(self._serving)
        self.placement = placement
        self._recompute()
        lost = [slot for slot in range(SLOT_COUNT) if before[slot] and not self._serving[slot]]
        gained = sum(1 for slot in range(SLOT_COUNT) if self._serving[slot] and not before[slot])
        log.info(
            "placement applied node=%s version=%d slots=%d lost=%d gained=%d",
            self.node_id, placement.version, self.slots_owned, len(lost), gained,
        )
        self._release_soon(lost)
        self._changed()

    def fence(self, slots: Iterable[int]) -> None:
        """Stop serving `slots` now, whatever the table says (a move in progress); their open
        libraries are released soon (`wait_released`)."""
        fenced = {slot for slot in slots if 0 <= slot < SLOT_COUNT}
        self._fenced |= fenced
        lost = [slot for slot in fenced if self._serving[slot]]
        self._recompute()
        self._release_soon(lost)

    def unfence(self, slots: Iterable[int]) -> None:
        """Serve `slots` again, if the table gives them to this node."""
        self._fenced -= set(slots)
        self._recompute()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def _recompute(self) -> None:
        node, fenced = self.node_id, self._fenced
        for slot, owner in enumerate(self.placement.owners):
            self._serving[slot] = owner == node and slot not in fenced

    def _release_soon(self, slots: list[int]) -> None:
        if slots:
            self._to_release.update(slots)
            self._settled = trio.Event() if self._settled.is_set() else self._settled
            self._wake.set()

    def _released_by(self, slots: set[int]) -> Callable[[str], bool]:
        serving = self._serving

        def picks(library_id: str) -> bool:
            slot = slot_of(library_id)
            return slot in slots and not serving[slot]  # lost and regained meanwhile: kept

        return picks

    async def wait_released(self) -> None:
        """Until every slot lost so far has been released (its shards closed)."""
        await self._settled.wait()

    # -- the task -----------------------------------------------------------------------------

    async def run(
        self, core: Releaser, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Release what this node stops serving, one release at a time, until cancelled."""
        if not self.slots_owned:
            log.warning(
                "this node owns no slots in the placement table node=%s version=%d nodes=%s",
                self.node_id, self.placement.version, ",".join(self.placement.nodes),
            )
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            slots, self._to_release = self._to_release, set()
            try:
                released = await core.release(self._released_by(slots))
            except Exception:
                # Still fenced (nothing new opens); what stayed open closes when idle.
                log.exception("release failed node=%s slots=%d", self.node_id, len(slots))
            else:
                self.libraries_released += len(released)
                log.info(
                    "slots released node=%s slots=%d libraries=%d",
                    self.node_id, len(slots), len(released),
                )
            if not self._to_release:
                self._settled.set()
