"""Bookkeeping of one download: which chunks are missing, in flight, verified; and the whole-file
hash, computed in order while the download runs (chunks arrive out of order)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from concurrent.futures import Executor
from typing import Callable, Iterable, Optional


class ChunkScheduler:
    """Hands out missing chunk indices to download workers, lowest first.

    A worker that fails gives its chunks back, and another worker picks them up. Endgame (as in
    BitTorrent): once nothing is left to hand out, a worker asking for more gets a chunk that is in
    flight on another worker (each chunk at most `ENDGAME_HOLDERS` times), so the last chunks of a
    download never wait on the slowest provider; whichever copy verifies first counts (`done`), the
    other is ignored. When every in-flight chunk is already held twice, `take()` waits: a chunk may
    come back if its worker fails.
    """

    ENDGAME_HOLDERS = 2

    def __init__(self, missing: Iterable[int]) -> None:
        self._pending = deque(sorted(missing))
        self._holders: dict[int, int] = {}  # in flight: how many workers hold each
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

    def try_take(self, held: Iterable[int] = (), endgame: bool = False) -> Optional[int]:
        """A chunk to fetch now, or None. With `endgame`, a chunk in flight elsewhere once nothing
        is pending; `held`: the caller's own outstanding chunks (never handed to it twice)."""
        if self._pending:
            index = self._pending.popleft()
            self._holders[index] = 1
            return index
        if not endgame:
            return None
        held = set(held)
        for index, holders in sorted(self._holders.items()):
            if holders < self.ENDGAME_HOLDERS and index not in held:
                self._holders[index] = holders + 1
                return index
        return None

    async def take(self, held: Iterable[int] = (), endgame: bool = False) -> Optional[int]:
        """The next chunk to fetch, or None once every chunk is verified. `held` is read afresh on
        every try (a live set of the caller's chunks may change while it waits)."""
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


class OrderedHasher:
    """sha256 of the whole blob, fed chunk by chunk in index order on a worker thread.

    `offer(index, data)` hands over a verified chunk that is already written to disk; chunks that
    arrive ahead of the hashing cursor wait in memory, up to `max_buffered`, beyond which they are
    read back from disk (`read_chunk`) when their turn comes. Every buffer offered goes to
    `give_back` once the hasher no longer reads it (see `node.blobs.buffers`).
    """

    def __init__(self, num_chunks: int, read_chunk: Callable[[int], bytes], executor: Executor,
                 max_buffered: int = 16, give_back: Callable[[bytearray], None] = lambda buffer: None) -> None:
        self.num_chunks = num_chunks
        self._read_chunk = read_chunk
        self._give_back = give_back
        self._executor = executor
        self._max_buffered = max_buffered
        self._ready: dict[int, Optional[bytes]] = {}
        self._buffered = 0
        self._cursor = 0
        self._digest = hashlib.sha256()
        self._pump: Optional[asyncio.Task] = None

    def offer(self, index: int, data: Optional[bytearray] = None) -> None:
        if index < self._cursor or index in self._ready:
            if data is not None:
                self._give_back(data)
            return
        if data is not None and (index == self._cursor or self._buffered < self._max_buffered):
            self._ready[index] = data
            self._buffered += 1
        else:
            if data is not None:  # on disk already: read back when its turn comes
                self._give_back(data)
            self._ready[index] = None
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._cursor in self._ready:
            data = self._ready.pop(self._cursor)
            if data is None:
                await loop.run_in_executor(self._executor, self._digest.update,
                                           await loop.run_in_executor(self._executor, self._read_chunk, self._cursor))
            else:
                self._buffered -= 1
                await loop.run_in_executor(self._executor, self._digest.update, data)
                self._give_back(data)  # not reached when cancelled mid-update: the thread may still read it
            self._cursor += 1

    async def hexdigest(self) -> str:
        """The whole blob's sha256, once every chunk has been offered."""
        if self._pump is not None:
            await self._pump
        if self._cursor != self.num_chunks:
            raise RuntimeError(f"hashed {self._cursor} of {self.num_chunks} chunks")
        return self._digest.hexdigest()

    def cancel(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
