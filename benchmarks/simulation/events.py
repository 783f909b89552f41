"""Simulated time: an event queue of generator processes, and the network's latency and loss.

A process is a generator that yields the seconds it waits; the queue resumes it then. Nothing
sleeps: a run of simulated hours takes as long as its events take to handle.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from types import GeneratorType
from typing import Callable, Generator, List, Tuple

import numpy as np

Process = Generator[float, None, None]


class EventQueue:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: List[Tuple[float, int, object]] = []
        self._order = itertools.count()  # ties in time run in the order they were scheduled
        self.handled = 0

    def call_at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._order), action))

    def start(self, process: Process, delay: float = 0.0) -> None:
        """Run `process` from `delay` seconds from now; each value it yields is a wait in seconds."""
        heapq.heappush(self._heap, (self.now + delay, next(self._order), process))

    def run_until(self, end: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= end:
            when, _, item = heapq.heappop(heap)
            self.now = when
            self.handled += 1
            if type(item) is GeneratorType:  # isinstance against typing's Generator is 10x slower
                try:
                    wait = next(item)
                except StopIteration:
                    continue
                heapq.heappush(heap, (when + wait, next(self._order), item))
            else:
                item()  # type: ignore[operator]
        self.now = end


@dataclass(frozen=True)
class NetworkModel:
    """Latency of one DHT operation: `hops` round trips, each lognormal with median `rtt_s`
    (spread `rtt_sigma`); each operation is lost with probability `loss` (a store that never lands,
    a read that returns nothing, as hivemind's get does when no replica answers in time)."""

    rtt_s: float = 0.08
    rtt_sigma: float = 0.6
    hops: int = 4
    loss: float = 0.01
    beam: int = 20  # hivemind's k: a lookup asks at most this many peers (find RPCs, see swarm_scale)

    @staticmethod
    def internet(n: int, loss: float = 0.01) -> "NetworkModel":
        """Kademlia hops grow with log N (iterative lookups over 2^b-ary buckets; b = 3 here)."""
        return NetworkModel(hops=max(1, math.ceil(math.log2(max(n, 2)) / 3)), loss=loss)

    def rpcs_per_lookup(self, n: int) -> int:
        return min(n, self.beam)


class Draws:
    """Pre-drawn latencies and loss coins, handed out in turn (numpy draws in bulk are ~100x cheaper)."""

    def __init__(self, model: NetworkModel, rng: np.random.Generator, size: int = 1 << 16):
        self.model, self.rng, self.size = model, rng, size
        self._refill()

    def _refill(self) -> None:
        m = self.model
        self._lat = (m.hops * m.rtt_s * np.exp(m.rtt_sigma * self.rng.standard_normal(self.size))).tolist()
        self._lost = (self.rng.random(self.size) < m.loss).tolist()
        self._i = 0

    def op(self) -> Tuple[float, bool]:
        """(seconds the operation takes, whether it is lost)."""
        if self._i >= self.size:
            self._refill()
        i = self._i
        self._i += 1
        return self._lat[i], self._lost[i]

    def sequential(self, count: int) -> float:
        """Seconds for `count` operations made one after another (a loop of awaited gets)."""
        if count <= 0:
            return 0.0
        m = self.model
        return float((m.hops * m.rtt_s * np.exp(m.rtt_sigma * self.rng.standard_normal(count))).sum())
