"""An asyncio event loop on a background thread: the blob server and downloads live here while
the main thread trains (torch releases the GIL in its kernels, so both make progress)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Awaitable, Optional, TypeVar

T = TypeVar("T")


class NetworkLoop:
    def __init__(self, name: str = "ddm-network"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Awaitable[T]) -> "concurrent.futures.Future[T]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[T], timeout: Optional[float] = None) -> T:
        """Run `coro` on the loop and wait for its result (from any other thread)."""
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it and close it."""
        if not self.loop.is_running():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), timeout=5)
        except Exception:  # best effort: the loop is going away anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
