"""A node's blobs on the network: its `BlobStore`, served over hivemind streams and fetched from
the providers the DHT names. Runs on the node's `NetworkLoop`; callable from any thread."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from hivemind.p2p import PeerID

from node.blobs.banlist import BanList
from node.blobs.fetch import MAX_PROVIDERS, NotProvided, fetch_blob
from node.blobs.provider import holds
from node.blobs.server import BlobServer
from node.blobs.store import BlobStore, CorruptBlob
from node.swarm.membership import SwarmMembership
from node.network import NetworkLoop
from protocol.hashing import BlobRef

logger = logging.getLogger("ddm_swarm.blobs")


class BlobService:
    def __init__(self, membership: SwarmMembership, store: BlobStore, loop: NetworkLoop, *, serve: bool = True):
        self.membership, self.store, self.loop = membership, store, loop
        self.bans = BanList()
        self.server: Optional[BlobServer] = None
        self.p2p = loop.run(membership.dht.replicate_p2p(), timeout=60)
        if serve:
            self.server = BlobServer(store)
            loop.run(self.server.start(self.p2p), timeout=60)

    def providers(self, sha256: str, extra: Iterable[str] = (), limit: int = MAX_PROVIDERS) -> List[PeerID]:
        """Peers the DHT names as providers of `sha256` (`extra` peer ids first), never this peer; at
        most `limit`, a random sample of the records (anyone can sign thousands, in any order)."""
        extra = [name for name in dict.fromkeys(extra) if name != self.membership.peer_id]
        named = {record.peer_id for record in self.membership.providers(sha256)} - {self.membership.peer_id, *extra}
        names = extra[:limit] + random.sample(sorted(named), min(len(named), max(0, limit - len(extra))))
        return [PeerID.from_base58(name) for name in names]

    def holds(self, peer_id: str, sha256: str, timeout: float = 10.0) -> bool:
        """Whether peer `peer_id` answers, over the blob protocol, that it holds blob `sha256`."""
        try:
            return self.loop.run(holds(self.p2p, PeerID.from_base58(peer_id), sha256, timeout), timeout=timeout + 5)
        except Exception as error:  # a malformed peer id in someone's record, a daemon gone: not held
            logger.debug(f"probe of {peer_id[:16]} for {sha256[:12]} failed: {error}")
            return False

    def answering_providers(self, sha256: str, limit: int = MAX_PROVIDERS, timeout: float = 10.0) -> List[str]:
        """Of the peers the DHT names as providers of `sha256` (a sample of `limit`), those that answer
        that they hold it, probed at once."""
        peers = self.providers(sha256, limit=limit)

        async def probe() -> List[bool]:
            return await asyncio.gather(*(holds(self.p2p, peer, sha256, timeout) for peer in peers))
        answers = self.loop.run(probe(), timeout=timeout + 5) if peers else []
        return [peer.to_base58() for peer, yes in zip(peers, answers) if yes]

    def fetch(self, ref: BlobRef, *, extra_providers: Iterable[str] = (),
              progress: Optional[Callable[[int, int], None]] = None, timeout: Optional[float] = None) -> Path:
        """The verified blob `ref`, from the local store or downloaded from its providers."""
        if self.store.has(ref.sha256):
            try:  # a cached file may have rotted on disk since: hash it again before anyone loads it
                self.store.verify(ref.sha256)
                return self.store.path(ref.sha256)
            except CorruptBlob as error:
                logger.warning(f"{error}; fetching it again from the swarm")
        providers = self.providers(ref.sha256, extra_providers)
        for delay in (0.5, 1.0, 2.0):  # a provider record may trail its checkpoint record by a moment
            if providers:
                break
            time.sleep(delay)
            providers = self.providers(ref.sha256, extra_providers)
        if not providers:
            raise NotProvided(ref, {}, ref.num_chunks)
        return self.loop.run(fetch_blob(self.p2p, ref, providers, self.store, bans=self.bans, progress=progress),
                             timeout=timeout)

    def stop(self) -> None:
        try:
            if self.server is not None:
                self.loop.run(self.server.stop(), timeout=10)
            self.loop.run(self.p2p.shutdown(), timeout=10)
        except Exception as error:  # the daemon may already be gone at shutdown
            logger.debug(f"blob service stop: {error}")
