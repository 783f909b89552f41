"""Run the peer scripts of tests/peers/ as real processes and follow their JSON-lines output."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]


class PeerProcess:
    """A peer script in its own process; `events` collects every JSON line it prints."""

    def __init__(self, script: str, *args: str, log_dir: Path) -> None:
        self.name = f"{Path(script).stem}-{time.monotonic_ns()}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "HIVEMIND_LOGLEVEL": "WARNING"}
        self.stderr_path = log_dir / f"{self.name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "peers" / script), *args],
                                        stdout=subprocess.PIPE, stderr=self._stderr, env=env, cwd=REPO,
                                        start_new_session=True)
        self.events: list[dict] = []
        self._new: queue.Queue = queue.Queue()
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            self._new.put(event)
        self._new.put(None)

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> dict:
        """The first event (seen so far or later) for which `predicate` holds; fail after `timeout` s."""
        for event in list(self.events):
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._new.get(timeout=left)
            except queue.Empty:
                break
            if event is None:
                raise AssertionError(f"{self.name} exited ({self.process.poll()}): {self.stderr_tail()}")
            if predicate(event):
                return event
        raise AssertionError(f"{self.name}: no matching event within {timeout} s; stderr: {self.stderr_tail()}")

    def wait_event(self, name: str, timeout: float) -> dict:
        return self.wait_for(lambda event: event.get("event") == name, timeout)

    def last(self, name: str) -> Optional[dict]:
        return next((event for event in reversed(self.events) if event.get("event") == name), None)

    def stderr_tail(self, chars: int = 3000) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-chars:]

    def _signal_group(self, sig: int) -> None:
        # The script, its hivemind DHT process and their p2pd daemons share one process group,
        # created for this peer alone: signalling the group is how a whole peer crashes or stops.
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Crash the whole peer at once (SIGKILL to its process group)."""
        self._signal_group(signal.SIGKILL)
        self.process.wait(15)

    def stop(self) -> None:
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)  # whatever of the group outlived SIGTERM
        self.process.wait(5)
        self._stderr.close()


@contextlib.contextmanager
def blob_providers(root, behaviours: dict, blob_bytes: int):
    """One `blob_provider.py` process per behaviour (name -> flags), all holding the same random blob of
    `blob_bytes`, started in parallel; yields (blob path, providers, ready events by name); stops them all."""
    blob = root / "blob.bin"
    blob.write_bytes(os.urandom(blob_bytes))
    providers = {name: PeerProcess("blob_provider.py", "--store", str(root / name), "--put", str(blob), *flags,
                                   log_dir=root) for name, flags in behaviours.items()}
    try:
        yield blob, providers, {name: peer.wait_event("ready", 60) for name, peer in providers.items()}
    finally:
        for peer in providers.values():
            peer.stop()
