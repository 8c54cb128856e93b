"""Two servers loaded in turns, so that one run compares them on the same machine at once.

A shared cloud core does not run at one speed: here, the same Python loop took 0.18 s or 0.31 s
a few seconds apart, with no steal time to show for it. CPU per operation measured on one server
and then on another, a minute later, moves by ±30 % with that, more than the differences worth
measuring. With `--interleave SLICE`, both servers run on the server core; their scenarios
connect and initialize, meet at a barrier, then flood in turns of SLICE seconds (the writers of
the server whose turn it is send; the others only finish what is in flight), and each measures
its own window, both windows over the same span. Each server's CPU per operation then spans the
same mix of fast and slow moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio


class Turns:
    """Whose turn it is to send, among `parties` scenarios; `conduct` hands the turns out."""

    def __init__(self, parties: int, slice_s: float) -> None:
        self.slice_s = slice_s
        self._parties = parties
        self._arrived = 0
        self._all_here = trio.Event()
        self._open = [trio.Event() for _ in range(parties)]
        self._finished: set[int] = set()
        self._changed = trio.Event()
        self.turns_given = [0] * parties

    def party(self, index: int) -> Turn:
        return Turn(self, index)

    async def arrive(self) -> None:
        """Wait until every party has arrived (a barrier)."""
        self._arrived += 1
        if self._arrived == self._parties:
            self._all_here.set()
        await self._all_here.wait()

    async def wait_turn(self, index: int) -> None:
        await self._open[index].wait()

    def finish(self, index: int) -> None:
        self._finished.add(index)
        self._open[index].set()  # its writers may be waiting to see they are done
        self._changed.set()

    async def conduct(self) -> None:
        """Rotate the turn every `slice_s` from the moment every party is ready until every party
        has finished; a finished party is skipped, and at the end every gate stays open."""
        await self._all_here.wait()
        k = 0
        while len(self._finished) < self._parties:
            index = k % self._parties
            k += 1
            if index in self._finished:
                continue
            for other, gate in enumerate(self._open):
                if other != index and gate.is_set():
                    self._open[other] = trio.Event()
            self._open[index].set()
            self.turns_given[index] += 1
            with trio.move_on_after(self.slice_s):
                await self._changed.wait()
            self._changed = trio.Event()
        for gate in self._open:
            gate.set()


@dataclass(frozen=True)
class Turn:
    """One party's view of the turns: a scenario waits at `ready` once connected, its writers at
    `wait` before each message, and it calls `finished` when it sends no more."""

    turns: Turns
    index: int

    async def ready(self) -> None:
        await self.turns.arrive()

    async def wait(self) -> None:
        await self.turns.wait_turn(self.index)

    def finished(self) -> None:
        self.turns.finish(self.index)
