"""A server-wide budget of bytes for large inbound messages: how many can be in memory at once.

A websocket message may be as large as `max_message_bytes` (100 MiB by default: a large first
sync needs it). One such message costs twice its size while it is received and decoded, and
about three and a half times while it is parsed; a handful of clients sending them at once
could take the process down. So every large message reserves its share of one budget before its
payload is read from the socket (until then TCP holds the sender back), and gives it back once
the library has handled it. Reservations are granted first come, first served: a big message is
never starved by a stream of smaller ones.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import trio

MEMORY_PER_BYTE: Final = 3
"""Bytes of memory reserved per byte of a large message. Measured on a 90 MiB sync of 2 KB
operations: receiving peaks at twice its size (the bytes the parser gathered and their unmasked
copy), parsing at about 3.5 times (its text, orjson's document, the Python objects); the
server's peak RSS grew by 313 MiB for one such message. Messages of tiny operations parse into
more objects (6.5 times their size), so the budget bounds them less tightly."""


class MessageTooLarge(Exception):
    """The message could never fit the budget, however long it waited."""


class Reservation:
    """Bytes taken from a `MemoryBudget`; `release` gives them back (once, however often called)."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget: MemoryBudget | None = budget
        self.nbytes = nbytes

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.nbytes)


class MemoryBudget:
    """`total_bytes` to share; `reserve` waits (FIFO) until its bytes are free.

    Waiters are bounded by the connections: each waits for at most one reservation at a time.
    """

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.used_bytes = 0
        self._waiters: deque[tuple[int, trio.Event]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def reserve(self, nbytes: int) -> Reservation:
        """Take `nbytes`, waiting behind earlier reservations; the caller bounds the wait.

        Raises `MessageTooLarge` at once if `nbytes` exceeds the whole budget.
        """
        if nbytes > self.total_bytes:
            raise MessageTooLarge(f"{nbytes} bytes exceed the budget of {self.total_bytes}")
        if not self._waiters and self.used_bytes + nbytes <= self.total_bytes:
            self.used_bytes += nbytes
            await trio.lowlevel.checkpoint()
            return Reservation(self, nbytes)
        entry = (nbytes, trio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():  # granted as we were cancelled: hand it on
                self._give_back(nbytes)
            else:
                self._waiters.remove(entry)
                self._grant()  # we may have been the one holding the others up
            raise
        return Reservation(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        self.used_bytes -= nbytes
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used_bytes + self._waiters[0][0] <= self.total_bytes:
            nbytes, granted = self._waiters.popleft()
            self.used_bytes += nbytes
            granted.set()
