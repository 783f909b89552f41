"""The peers a node has met, kept in its data dir, so that it can rejoin the swarm when every
bootstrap peer is down (the bootstrap is then no single point of failure).

The cache holds at most MAX_CACHED_PEERS multiaddrs (each ending in /p2p/<peer id>) of peers that
this node's DHT has actually talked to (its routing table) and that announced themselves serving in
a signed peer record: a Sybil's peer records name addresses, but only peers that answered us get
in. It is written atomically (a crash leaves the old list or the new one), read leniently (a
damaged cache is an empty one: it is a hint, never needed to start), and used only when the
configured initial peers all fail.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, List, Sequence, TypeVar

from node.errors import JoinFailed
from node.files import atomic_write_bytes
from protocol.records import SERVING_STATES

logger = logging.getLogger("ddm_swarm.peer_cache")
MAX_CACHED_PEERS = 32
MAX_CACHE_BYTES = 64 * 1024
M = TypeVar("M")


class PeerCache:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> List[str]:
        """The cached multiaddrs (at most MAX_CACHED_PEERS), [] if there is no readable cache."""
        try:
            if self.path.stat().st_size > MAX_CACHE_BYTES:
                return []
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        peers = data.get("peers") if isinstance(data, dict) else None
        if not isinstance(peers, list):
            return []
        return [p for p in peers if isinstance(p, str) and "/p2p/" in p and len(p) < 300][:MAX_CACHED_PEERS]

    def save(self, maddrs: Sequence[str]) -> None:
        """Keep `maddrs` (deduplicated, the first MAX_CACHED_PEERS) in place of the cache, if any."""
        unique = list(dict.fromkeys(maddrs))[:MAX_CACHED_PEERS]
        if unique:
            atomic_write_bytes(self.path, json.dumps({"peers": unique}, indent=1).encode())

    def remember(self, membership) -> int:
        """Cache the peers of the swarm `membership` has met; how many were cached."""
        try:
            maddrs = met_peers(membership)
        except Exception as error:  # the DHT is slow or away: the old cache stays
            logger.info(f"could not refresh the peer cache: {error}")
            return 0
        self.save(maddrs)
        return len(maddrs)


def met_peers(membership) -> List[str]:
    """Full multiaddrs of serving peers (a peer record in a SERVING_STATES state) in this node's routing table."""
    contacted = set(membership.contacted_peer_ids())
    maddrs = []
    for record in membership.peers():
        if record.state not in SERVING_STATES or record.peer_id == membership.peer_id or record.peer_id not in contacted:
            continue
        for maddr in record.maddrs:
            maddrs.append(maddr if "/p2p/" in maddr else f"{maddr}/p2p/{record.peer_id}")
    return maddrs


def join_with_cache(join: Callable[[List[str]], M], initial_peers: Sequence[str], cache: PeerCache) -> M:
    """`join(initial_peers)`; if none of them answers, `join` through the cached peers instead."""
    try:
        return join(list(initial_peers))
    except JoinFailed:
        cached = [p for p in cache.load() if p not in initial_peers]
        if not cached:
            raise
        logger.warning(f"no initial peer answered; rejoining through {len(cached)} peer(s) met before "
                       f"({cache.path})")
        return join(cached)
