"""A node's blobs on the network: its `BlobStore`, served over hivemind streams and fetched from
the providers the DHT names. Runs on the node's `NetworkLoop`; callable from any thread.

With `direct_host`, blobs are also served on a direct TCP port there (`node.blobs.direct`); fetches
use a provider's direct port where it offers one, and p2p otherwise."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from hivemind.p2p import PeerID

from node.blobs.banlist import BanList
from node.blobs.direct import DirectRoutes, DirectServer
from node.blobs.fetch import MAX_PROVIDERS, BlobUnavailable, FetchReport, NotProvided, fetch_blob
from node.blobs.provider import holds
from node.blobs.server import BlobServer
from node.blobs.store import BlobStore, CorruptBlob
from node.swarm.membership import SwarmMembership
from node.swarm.reachability import connected_ip, dial_through_relay
from node.network import NetworkLoop
from protocol.hashing import BlobRef

logger = logging.getLogger("ddm_swarm.blobs")
HOLE_PUNCH_WAIT_S = 10.0


class BlobService:
    def __init__(self, membership: SwarmMembership, store: BlobStore, loop: NetworkLoop, *, serve: bool = True,
                 direct_host: Optional[str] = None, direct_port: int = 0):
        self.membership, self.store, self.loop = membership, store, loop
        self.bans = BanList()
        self.routes = DirectRoutes()
        self.server: Optional[BlobServer] = None
        self.direct: Optional[DirectServer] = None
        self.p2p = loop.run(membership.dht.replicate_p2p(), timeout=60)
        if serve:
            self.server = BlobServer(store)
            loop.run(self.server.start(self.p2p), timeout=60)
            if direct_host is not None:
                self.direct = DirectServer(self.server, direct_host, direct_port)
                loop.run(self.direct.start(self.p2p), timeout=60)

    def providers(self, ref: BlobRef, extra: Iterable[str] = (), limit: int = MAX_PROVIDERS) -> List[PeerID]:
        """Peers the DHT names as providers of `ref` (`extra` peer ids first), never this peer; at
        most `limit`, a random sample of the records (anyone can sign thousands, in any order)."""
        extra = [name for name in dict.fromkeys(extra) if name != self.membership.peer_id]
        named = {record.peer_id for record in self.membership.providers(ref)} - {self.membership.peer_id, *extra}
        names = extra[:limit] + random.sample(sorted(named), min(len(named), max(0, limit - len(extra))))
        return [PeerID.from_base58(name) for name in names]

    def holds(self, peer_id: str, sha256: str, timeout: float = 10.0) -> bool:
        """Whether peer `peer_id` answers, over the blob protocol, that it holds blob `sha256`."""
        try:
            return self.loop.run(holds(self.p2p, PeerID.from_base58(peer_id), sha256, timeout), timeout=timeout + 5)
        except Exception as error:  # a malformed peer id in someone's record, a daemon gone: not held
            logger.debug(f"probe of {peer_id[:16]} for {sha256[:12]} failed: {error}")
            return False

    def fetch(self, ref: BlobRef, *, extra_providers: Iterable[str] = (),
              progress: Optional[Callable[[int, int], None]] = None, timeout: Optional[float] = None) -> Path:
        """The verified blob `ref`, from the local store or downloaded from its providers."""
        if self.store.has(ref.sha256):
            try:  # a cached file may have rotted on disk since: hash it again before anyone loads it
                self.store.verify(ref.sha256)
                return self.store.path(ref.sha256)
            except CorruptBlob as error:
                logger.warning(f"{error}; fetching it again from the swarm")
        providers = self.providers(ref, extra_providers)
        for delay in (0.5, 1.0, 2.0):  # a provider record may trail its checkpoint record by a moment
            if providers:
                break
            time.sleep(delay)
            providers = self.providers(ref, extra_providers)
        if not providers:
            raise NotProvided(ref, {}, ref.num_chunks)
        try:
            return self.loop.run(fetch_blob(self.p2p, ref, providers, self.store, bans=self.bans, progress=progress,
                                            direct=self.routes), timeout=timeout)
        except BlobUnavailable:
            # providers behind NATs are reached through the relays they reserve a slot on (the
            # swarm's initial peers); the partial download resumes where the first try stopped
            relayed = self.loop.run(self._through_relays(providers), timeout=60)
            if not relayed:
                raise
            logger.info(f"blob {ref.sha256[:12]}: reached {len(relayed)} provider(s) through a relay")
            report = FetchReport()
            path = self.loop.run(fetch_blob(self.p2p, ref, relayed, self.store, bans=self.bans, progress=progress,
                                            report=report, reconnect=self._dial_through_relays), timeout=timeout)
            if report.pieces_resumed:
                logger.info(f"blob {ref.sha256[:12]}: {report.pieces_resumed} piece(s) resumed on new streams "
                            f"(a relayed connection is cut at the relay's data limit)")
            return path

    async def _dial_through_relays(self, peer: PeerID) -> bool:
        """A new connection to `peer` through the first relay (an initial peer) that has its reservation."""
        for relay in self.membership.initial_peers:
            if await dial_through_relay(self.p2p, peer, relay):
                return True
        return False

    async def _through_relays(self, providers: List[PeerID]) -> List[PeerID]:
        """The providers this peer has no connection to that it could reach through a relay."""
        connected = {info.peer_id for info in await self.p2p.list_peers()}
        reached = []
        for peer in providers:
            if peer not in connected and await self._dial_through_relays(peer):
                reached.append(peer)
        # A download through the relay works as it is (a cut connection is dialled again and its
        # chunk resumed: node.blobs.download); the direct connection that hole punching may make of the
        # relayed one takes the relay's load off, so give it a moment
        deadline = time.monotonic() + HOLE_PUNCH_WAIT_S
        while reached and time.monotonic() < deadline:
            if all([await connected_ip(self.p2p, peer) for peer in reached]):
                break
            await asyncio.sleep(0.25)
        return reached

    def stop(self) -> None:
        try:
            if self.direct is not None:
                self.loop.run(self.direct.stop(), timeout=10)
            if self.server is not None:
                self.loop.run(self.server.stop(), timeout=10)
            self.loop.run(self.p2p.shutdown(), timeout=10)
        except Exception as error:  # the daemon may already be gone at shutdown
            logger.debug(f"blob service stop: {error}")
