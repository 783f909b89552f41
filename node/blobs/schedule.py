"""Bookkeeping of one download: which chunks are missing, in flight, verified."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Iterable, Optional


class ChunkScheduler:
    """Hands out missing chunk indices to download workers, lowest first.

    A worker that fails gives its chunks back, and another worker picks them up. Endgame (as in
    BitTorrent): once nothing is left to hand out, a worker asking for more gets a chunk that is in
    flight on another worker (each chunk at most `ENDGAME_HOLDERS` times), so the last chunks of a
    download never wait on the slowest provider; whichever copy verifies first counts (`done`), the
    other is ignored. The copy handed out is of the chunk taken last (the one its holder has most
    likely not begun to send: it queues behind that holder's earlier chunks). When every in-flight
    chunk is already held twice, `take()` waits: a chunk may come back if its worker fails.
    """

    ENDGAME_HOLDERS = 2

    def __init__(self, missing: Iterable[int]) -> None:
        self._pending = deque(sorted(missing))
        self._holders: dict[int, int] = {}  # in flight: how many workers hold each, in the order taken
        self._done: set[int] = set()
        self._changed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return not self._pending and not self._holders

    @property
    def remaining(self) -> int:
        return len(self._pending) + len(self._holders)

    def is_done(self, index: int) -> bool:
        return index in self._done

    def try_take(self, held: Iterable[int] = (), endgame: bool | Callable[[], bool] = False) -> Optional[int]:
        """A chunk to fetch now, or None. With `endgame` (or once `endgame()` is true), a chunk in
        flight elsewhere once nothing is pending; `held`: the caller's own outstanding chunks (never
        handed to it twice)."""
        if self._pending:
            index = self._pending.popleft()
            self._holders[index] = 1
            return index
        if not (endgame() if callable(endgame) else endgame):
            return None
        held = set(held)
        for index, holders in reversed(self._holders.items()):
            if holders < self.ENDGAME_HOLDERS and index not in held:
                self._holders[index] = holders + 1
                return index
        return None

    async def take(self, held: Iterable[int] = (), endgame: bool | Callable[[], bool] = False) -> Optional[int]:
        """The next chunk to fetch, or None once every chunk is verified. `held` and `endgame()` are
        read afresh on every try (the caller's chunks may change while it waits)."""
        while True:
            index = self.try_take(held, endgame)
            if index is not None or self.finished:
                return index
            self._changed.clear()
            await self._changed.wait()

    def done(self, index: int) -> None:
        self._holders.pop(index, None)
        self._done.add(index)
        self._changed.set()

    def give_back(self, indices: Iterable[int]) -> None:
        for index in sorted(indices, reverse=True):
            holders = self._holders.get(index)
            if holders is None:  # done meanwhile by another worker, or never taken
                continue
            if holders > 1:
                self._holders[index] = holders - 1
            else:
                del self._holders[index]
                self._pending.appendleft(index)
        self._changed.set()

