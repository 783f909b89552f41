"""Receive buffers for a download's chunks, reused instead of allocated per chunk.

Why: `bytearray(4 MiB)` maps fresh pages and zeroes them, and the kernel then faults every one of
them in again as the socket fills it; freeing it unmaps them. On this machine that costs about
0.14 CPU s per GB on top of the receive copy itself (a reused buffer is filled at ~0.17 s/GB, a
fresh one at ~0.31), paid on every chunk.

A buffer has one owner at a time and is handed back by the last one to read it: the download's
stream worker, once its chunk was verified and written (or refused, or already delivered by another
stream in the endgame). A buffer dropped on an error path is simply not reused (the
garbage collector frees it): `give_back` is the only way into the pool, so a buffer still read by
a worker thread is never handed out twice.
"""

from __future__ import annotations


class ChunkBuffers:
    """A pool of `size`-byte `bytearray`s, keeping at most `keep` idle ones. Event-loop thread only.

    One pool lives as long as one download, so it holds no more than that download's peak of chunks
    in memory at once: two per stream (one being read, one being verified). A pool kept smaller than
    that peak allocated afresh most of the time (py-spy: the fresh buffers' zeroing and page faults
    cost more than the pwrite of the same bytes).
    """

    def __init__(self, size: int, keep: int = 32) -> None:
        self.size, self.keep = size, keep
        self._idle: list[bytearray] = []
        self.allocated = 0  # buffers made (not reused), for benchmarks and tests

    def take(self, length: int) -> bytearray:
        """A buffer of exactly `length` bytes, contents undefined: the caller fills all of it."""
        if length == self.size and self._idle:
            return self._idle.pop()
        self.allocated += 1
        return bytearray(length)

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer that nobody reads any more (a short last chunk is not kept)."""
        if len(buffer) != self.size or len(self._idle) >= self.keep:
            return
        if any(idle is buffer for idle in self._idle):  # twice would hand it to two chunks at once
            raise RuntimeError("a chunk buffer was given back twice")
        self._idle.append(buffer)
