"""Peers this node refuses to download from, each with the reason it was banned.

A peer is banned for proof of bad faith: bytes that do not match a signed digest, or a digest list
that does not match a signed record. Slow or vanished peers are not banned (that is bad luck, not
bad faith): a download simply stops using them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ban:
    peer: str
    reason: str
    since: float
    until: float  # unix time; inf for the life of the process


class BanList:
    """Thread-safe set of banned peers (by base58 peer id), with reasons; bans may expire."""

    def __init__(self, default_duration_s: float = float("inf")) -> None:
        self.default_duration_s = default_duration_s
        self._bans: dict[str, Ban] = {}
        self._lock = threading.Lock()

    def ban(self, peer: object, reason: str, duration_s: Optional[float] = None) -> Ban:
        now = time.time()
        entry = Ban(str(peer), reason, now, now + (self.default_duration_s if duration_s is None else duration_s))
        with self._lock:
            self._bans[entry.peer] = entry
        logger.warning("banned peer %s: %s", entry.peer, reason)
        return entry

    def get(self, peer: object) -> Optional[Ban]:
        with self._lock:
            entry = self._bans.get(str(peer))
            if entry is not None and entry.until <= time.time():
                del self._bans[entry.peer]
                return None
            return entry

    def is_banned(self, peer: object) -> bool:
        return self.get(peer) is not None

    def reason(self, peer: object) -> Optional[str]:
        entry = self.get(peer)
        return entry.reason if entry else None

    def unban(self, peer: object) -> None:
        with self._lock:
            self._bans.pop(str(peer), None)

    def __iter__(self) -> Iterator[Ban]:
        with self._lock:
            peers = list(self._bans)
        return iter([entry for entry in map(self.get, peers) if entry is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))
