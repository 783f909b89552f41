"""A job's data in a swarm made by `swarm create` (dataset kind `shards`): only that job's shards,
fetched as blobs, verified, kept in the node's blob store and served on from there.

1. Which shards: an expert of cluster k trains on `clusters[k].train` and measures its held-out loss
   on `clusters[k].heldout`; the router trains on the manifest's `router_sample` (every sample
   labelled with its cluster) and measures its accuracy on the first held-out shard of each cluster.
   Nothing else is fetched, so no node needs the whole data set.
2. From where: the swarm first (the operator's bootstrap peer or `ddm-swarm seed` serve them, and
   every node that fetched a shard serves it on), each chunk verified against the manifest's
   `BlobRef` and a provider that sends bad bytes banned, exactly as for checkpoints; then each of the
   manifest's `shard_urls` (`<url>/<sha256>.tar`), whose bytes must hash to the same `BlobRef`.
3. Then: decoded once into the data dir's cache (`ddm_models.captioned_data`), and announced as
   provided, so the next node of the job can fetch it from this one.
"""

from __future__ import annotations

import logging
import os
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Set, Tuple

from ddm_models.captioned_data import CaptionedDataset, ShardFile, load_captioned_shards
from node.blobs.store import BlobStore
from node.errors import NodeError
from protocol.hashing import BlobRef
from protocol.manifest import SwarmManifest
from protocol.manifest_data import ShardRef

logger = logging.getLogger("ddm_swarm.shards")
URL_TIMEOUT_S = 60.0
ROUTER_HELDOUT_ITEMS = 1024  # the router's accuracy is measured on at most this many held-out samples


class ShardUnavailable(NodeError):
    """No provider and no mirror URL delivered a shard's verified bytes."""


Fetch = Callable[[BlobRef], Path]


@dataclass(frozen=True)
class JobShards:
    """The shards one job needs: (shard, cluster or None: each sample names its own) pairs."""

    train: Tuple[Tuple[ShardRef, Optional[int]], ...]
    heldout: Tuple[Tuple[ShardRef, Optional[int]], ...]

    @property
    def blobs(self) -> List[BlobRef]:
        return [shard.blob for shard, _ in (*self.train, *self.heldout)]

    @property
    def bytes(self) -> int:
        return sum(blob.size for blob in self.blobs)


def expert_shards(manifest: SwarmManifest, cluster: int) -> JobShards:
    shards = manifest.dataset.clusters[cluster]
    return JobShards(tuple((s, cluster) for s in shards.train), tuple((s, cluster) for s in shards.heldout))


def router_shards(manifest: SwarmManifest) -> JobShards:
    heldout = tuple((c.heldout[0], c.cluster) for c in manifest.dataset.clusters if c.heldout)
    return JobShards(tuple((s, None) for s in manifest.dataset.router_sample), heldout)


def fetch_from_urls(ref: BlobRef, urls: Sequence[str], store: BlobStore) -> Path:
    """The shard `ref` from the first mirror URL whose bytes hash to it; `ShardUnavailable` names each try."""
    reasons = []
    for base in urls:
        url = f"{base.rstrip('/')}/{ref.sha256}.tar"
        fd, tmp = store.temp_file(".download")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as answer:
                copied = _copy_at_most(answer, out, ref.size + 1)
            if copied != ref.size:
                reasons.append(f"{url}: {copied} bytes, the manifest pins {ref.size}")
                continue
            got = store.put_file(tmp)
            if got != ref:
                store.delete(got.sha256)
                reasons.append(f"{url}: bytes hash to {got.sha256[:12]}…, not to the pinned shard")
                continue
            return store.path(ref.sha256)
        except OSError as error:  # urllib's URLError and HTTPError are OSErrors
            reasons.append(f"{url}: {error}")
        finally:
            Path(tmp).unlink(missing_ok=True)
    raise ShardUnavailable(f"shard {ref.sha256[:12]}… could not be had from the swarm nor from "
                           f"{len(urls)} mirror URL(s): {'; '.join(reasons) or 'no URL in the manifest'}")


def fetch_shard(ref: BlobRef, blobs, urls: Sequence[str], job: str) -> Path:
    """The verified shard `ref` from the swarm (`blobs`: a `BlobService`), else from the mirror `urls`."""
    try:
        return blobs.fetch(ref)
    except NodeError as error:
        if not urls:
            raise ShardUnavailable(f"data shard {ref.sha256[:12]}… of {job}: {error}") from None
        logger.info(f"data shard {ref.sha256[:12]}… not in the swarm, trying the mirror URLs: {error}")
        return fetch_from_urls(ref, urls, blobs.store)


def _copy_at_most(source, target, limit: int) -> int:
    """Copy up to `limit` bytes (a mirror that sends more than the pinned size is cut off)."""
    copied = 0
    while copied < limit:
        piece = source.read(min(1 << 20, limit - copied))
        if not piece:
            break
        target.write(piece)
        copied += len(piece)
    return copied


@dataclass
class ShardData:
    """The swarm's data as a node sees it: fetched per job, on demand. `fetch` returns a verified
    shard file (see `node.trainer.peer` for the node's: swarm first, then mirror URLs); `held`
    collects every shard fetched, which the node keeps and serves."""

    manifest: SwarmManifest
    fetch: Fetch
    cache_dir: Path
    held: Set[str] = field(default_factory=set)
    _codec: Optional[object] = None  # the manifest's VAE, loaded on first use

    def _through_vae(self, data: CaptionedDataset) -> CaptionedDataset:
        """A latent swarm's samples as its experts see them: encoded once by the manifest's VAE and
        cached in the data dir (keyed by the samples and the VAE's weights)."""
        if self.manifest.vae is None:
            return data
        from ddm_models.latents import LatentCodec, cached_latents  # diffusers' VAE: only latent swarms need it

        if self._codec is None:
            self._codec = LatentCodec.from_manifest_spec(self.manifest.vae)
        latents = cached_latents(self._codec, data.images_at(slice(None)), self.cache_dir / "latents",
                                 name=data.name.replace("/", "-"), inputs_sha256=data.fingerprint())
        return data.with_latents(latents)

    def _load(self, shards: Sequence[Tuple[ShardRef, Optional[int]]], name: str,
              max_items: Optional[int] = None) -> CaptionedDataset:
        files = []
        for shard, cluster in shards:
            path = self.fetch(shard.blob)
            self.held.add(shard.blob.sha256)
            files.append(ShardFile(path, sha256=shard.blob.sha256, cluster=cluster))
        spec = self.manifest.dataset
        return self._through_vae(load_captioned_shards(files, spec.image_size, spec.channels,
                                                       self.cache_dir / "decoded", name=name, max_items=max_items))

    def prefetch(self, job) -> None:
        """Fetch every shard `job` needs now (before the node's other training processes read them)."""
        shards = router_shards(self.manifest) if job.is_router else expert_shards(self.manifest, job.cluster)
        for blob in shards.blobs:
            self.fetch(blob)
            self.held.add(blob.sha256)

    def expert_data(self, cluster: int) -> Tuple[CaptionedDataset, CaptionedDataset]:
        """(train, held-out) samples of one cluster."""
        shards = expert_shards(self.manifest, cluster)
        return (self._load(shards.train, f"{self.manifest.name}/cluster-{cluster}"),
                self._load(shards.heldout, f"{self.manifest.name}/cluster-{cluster}/heldout"))

    def heldout_data(self, cluster: int) -> Optional[CaptionedDataset]:
        """The held-out samples of one cluster if this node holds their shards already (those of its
        own job), else None: an auditor never downloads another cluster's data, so a node holds only
        its own job's shards."""
        shards = expert_shards(self.manifest, cluster).heldout
        if not shards or any(shard.blob.sha256 not in self.held for shard, _ in shards):
            return None
        return self._load(shards, f"{self.manifest.name}/cluster-{cluster}/heldout")

    def router_data(self) -> Tuple[CaptionedDataset, None, Tuple[CaptionedDataset, None]]:
        """The router's sample (its own cluster labels) and a bounded held-out sample of every cluster."""
        shards = router_shards(self.manifest)
        return (self._load(shards.train, f"{self.manifest.name}/router"), None,
                (self._load(shards.heldout, f"{self.manifest.name}/router/heldout", ROUTER_HELDOUT_ITEMS), None))


def copy_out(path: Path, target: Path) -> None:
    """Copy a verified shard out of a store (e.g. to seed it elsewhere), atomically."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(target)
