"""Serving a swarm's data shards from a folder: what the operator's bootstrap peer does with the
folder `swarm create` wrote beside the manifest, and what `ddm-swarm seed FOLDER` does on any peer.

Only shards the manifest pins are served: every file of the folder named `<sha256>.tar` is hashed
into the peer's blob store and accepted only if its `BlobRef` (sha256, size, chunk digests) is the
pinned one; the peer then announces itself as their provider, renewed like a node's."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List

from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.errors import NodeError
from node.network import NetworkLoop
from node.swarm.announcer import Announcer
from node.swarm.membership import SwarmMembership
from node.swarm.presence import Presence
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.seeding")


class NoShardsToSeed(NodeError):
    """The folder holds none of the shards the swarm's manifest pins."""


def import_shards(manifest: SwarmManifest, folder: Path, store: BlobStore) -> List[str]:
    """Hash the folder's pinned shards into `store`; the sha256s now held. Files that do not match
    their pin are reported and left out."""
    held = []
    for shard in manifest.dataset.all_shards():
        ref, path = shard.blob, Path(folder) / f"{shard.blob.sha256}.tar"
        if store.has(ref.sha256):
            held.append(ref.sha256)
            continue
        if not path.is_file():
            continue
        got = store.put_file(path)
        if got != ref:
            store.delete(got.sha256)
            logger.warning(f"not seeding {path}: its bytes are not the shard the manifest pins under that name")
            continue
        held.append(ref.sha256)
    return held


class ShardSeeder:
    """Serves the pinned shards of `folder` from a blob store at `store_dir` until `stop()`."""

    def __init__(self, membership: SwarmMembership, presence: Presence, folder: Path, store_dir: Path):
        manifest = membership.manifest
        pinned = len(manifest.dataset.all_shards())
        if not pinned:
            raise NoShardsToSeed(f"swarm '{manifest.name}' has no data shards (dataset kind "
                                 f"'{manifest.dataset.kind}'); nothing to seed")
        self.store = BlobStore(store_dir)
        self.held = import_shards(manifest, Path(folder), self.store)
        if not self.held:
            raise NoShardsToSeed(f"{folder} holds none of the {pinned} shards swarm '{manifest.name}' pins "
                                 "(files named <sha256>.tar, as `swarm create` writes them)")
        self.loop = NetworkLoop()
        self.blobs = BlobService(membership, self.store, self.loop)
        self.announcer = Announcer(membership, presence, lambda: 0)
        for sha in self.held:
            self.announcer.provide(self.store.ref(sha), now=True)
        self.announcer.start()
        logger.info(f"seeding {len(self.held)} of the swarm's {pinned} data shards from {folder}")

    def stop(self) -> None:
        self.announcer.stop(release=False)
        self.blobs.stop()
        self.loop.stop()
