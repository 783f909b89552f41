"""Peers this node refuses to download from, each with the reason it was banned.

A peer is banned for bytes that contradict a digest list, and only *for the blob reference the
download was for* (`scope`): the digest list itself came from some provider, checked against a
signed record that anyone could have signed, so wrong bytes prove bad faith only relative to that
reference. A signed record with an honest blob's sha256 and a made-up chunk digest list must not
cost an honest provider more than the one bogus reference (review finding 1). Every ban expires
(`DEFAULT_BAN_S`): a peer id is cheap, so a permanent ban buys little and a mistaken one costs a lot.

Slow or vanished peers are not banned (that is bad luck, not bad faith): a download simply stops
using them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

logger = logging.getLogger(__name__)

DEFAULT_BAN_S = 3600.0
GLOBAL = ""  # the scope of a ban that applies to every download


@dataclass(frozen=True)
class Ban:
    peer: str
    reason: str
    since: float
    until: float  # unix time
    scope: str = GLOBAL  # a blob reference's key (`ref_key`), or GLOBAL


class BanList:
    """Thread-safe set of banned (peer, scope) pairs (peers by base58 id), with reasons; bans expire."""

    def __init__(self, default_duration_s: float = DEFAULT_BAN_S) -> None:
        self.default_duration_s = default_duration_s
        self._bans: dict[tuple[str, str], Ban] = {}
        self._lock = threading.Lock()

    def ban(self, peer: object, reason: str, duration_s: Optional[float] = None, scope: str = GLOBAL) -> Ban:
        now = time.time()
        entry = Ban(str(peer), reason, now, now + (self.default_duration_s if duration_s is None else duration_s),
                    scope)
        with self._lock:
            self._bans[(entry.peer, scope)] = entry
        logger.warning("banned peer %s%s: %s", entry.peer, f" for {scope[:24]}" if scope else "", reason)
        return entry

    def _live(self, key: tuple[str, str]) -> Optional[Ban]:
        entry = self._bans.get(key)
        if entry is not None and entry.until <= time.time():
            del self._bans[key]
            return None
        return entry

    def get(self, peer: object, scope: str = GLOBAL) -> Optional[Ban]:
        """The ban that keeps `peer` out of a download of `scope` (a global one or one of that scope)."""
        with self._lock:
            return self._live((str(peer), GLOBAL)) or (self._live((str(peer), scope)) if scope else None)

    def is_banned(self, peer: object, scope: str = GLOBAL) -> bool:
        return self.get(peer, scope) is not None

    def reason(self, peer: object, scope: str = GLOBAL) -> Optional[str]:
        entry = self.get(peer, scope)
        return entry.reason if entry else None

    def unban(self, peer: object, scope: str = GLOBAL) -> None:
        with self._lock:
            self._bans.pop((str(peer), scope), None)

    def __iter__(self) -> Iterator[Ban]:
        with self._lock:
            keys = list(self._bans)
            return iter([entry for entry in map(self._live, keys) if entry is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))
