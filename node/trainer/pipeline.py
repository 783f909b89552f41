"""Checkpoints off the training thread: a node hands each checkpoint (held-out evaluation, state
file, blob, published.json, announcement) to one worker thread and trains on meanwhile.

On a CPU node the held-out evaluation alone costs about two training steps, so a synchronous
checkpoint every 100 steps took ~3% of the training time. One checkpoint is in flight at most: a
new one first waits for the previous one, so their writes keep their order, and an error (a full
disk) surfaces on the training thread at its next `check`, `submit` or `wait`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

logger = logging.getLogger("ddm_swarm.node")


class CheckpointPipeline:
    """Runs submitted checkpoint work one at a time on a thread of its own (inline if not `background`)."""

    def __init__(self, background: bool = True):
        self.background = background
        self.busy_seconds = 0.0  # spent running checkpoint work, on whichever thread
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ddm-checkpoint") if background else None
        self._in_flight: Optional[Future] = None
        self._lock = threading.Lock()

    def submit(self, work: Callable[[], None]) -> None:
        """Wait for the checkpoint in flight (raising its error), then start `work`."""
        self.wait()
        if self._executor is None:
            self._timed(work)
        else:
            self._in_flight = self._executor.submit(self._timed, work)

    def _timed(self, work: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            work()
        finally:
            with self._lock:
                self.busy_seconds += time.perf_counter() - started

    def check(self) -> None:
        """Raise the error of a checkpoint that has finished with one; never waits."""
        if self._in_flight is not None and self._in_flight.done():
            self.wait()

    def wait(self) -> None:
        """Wait for the checkpoint in flight, if any; raise its error."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def close(self) -> None:
        """Let the checkpoint in flight finish (the node is leaving: its error is only logged) and stop."""
        try:
            self.wait()
        except Exception as error:
            logger.warning(f"the last checkpoint could not be completed: {error}")
        if self._executor is not None:
            self._executor.shutdown(wait=True)
