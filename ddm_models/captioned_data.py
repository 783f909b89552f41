"""Images with their own captions: a cluster's WebDataset shards, decoded once and cached.

A swarm's data arrive as WebDataset tar shards pinned by sha256 (one cluster's training shards, its
held-out shards, the router's sample across clusters). Reading them:

1. For each shard, look in the cache dir for `<sha256>-<C>x<S>x<S>-v1.{npy,json}`: the decoded
   uint8 pixels (N, C, S, S) and the captions, keys and clusters. Both present and consistent: a
   hit, nothing is decoded.
2. On a miss, check that the file hashes to the pinned sha256 (the cache must hold the pinned
   bytes' images and nothing else), stream its samples through `iter_webdataset_records`
   (each image decoded, centre-cropped and resized once), write the `.npy` and then the `.json`
   (each atomically: temporary file, fsync, rename), so a crash leaves a miss, never a torn entry.
3. Copy every shard's rows (or a seeded bounded sample of them) into one preallocated uint8 tensor,
   reading the `.npy` files memory-mapped: peak memory is the result plus one shard.

Pixels stay uint8 (a quarter of float32); `CaptionedDataset.images_at` converts a batch to
float32 in [-1, 1] when a trainer draws it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ddm_models.data import DataSetError, iter_webdataset_records
from ddm_models.local_cache import exclusive, write_atomically
from protocol.hashing import BlobHasher

CACHE_VERSION = 1  # bump when decoding changes (crop, resampling), so old entries become misses


@dataclasses.dataclass(frozen=True, eq=False)
class CaptionedDataset:
    """Images, each with its own caption.

    pixels: (N, C, H, W) uint8 in [0, 255], or float32 latents of a VAE (already scaled: what the
    experts see, returned as they are; see `with_latents`); captions: N strings; clusters: (N,) int64 cluster of
    each image, or None when unknown (a router needs them, an expert does not); keys: N sample keys
    of the shards they came from (for messages), or None.
    """

    pixels: torch.Tensor
    captions: tuple[str, ...]
    name: str
    clusters: torch.Tensor | None = None
    keys: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.pixels.dtype not in (torch.uint8, torch.float32) or self.pixels.ndim != 4:
            raise DataSetError(f"{self.name}: pixels must be uint8 (N, C, H, W) or float32 latents, got {self.pixels.dtype} "
                               f"{tuple(self.pixels.shape)}")
        n = self.pixels.shape[0]
        if len(self.captions) != n or not all(isinstance(c, str) for c in self.captions):
            raise DataSetError(f"{self.name}: {len(self.captions)} captions for {n} images; one string each")
        if self.clusters is not None and (self.clusters.dtype != torch.int64 or self.clusters.shape != (n,)
                                          or (n and int(self.clusters.min()) < 0)):
            raise DataSetError(f"{self.name}: clusters must be int64 (N,) >= 0 matching the images, got "
                               f"{self.clusters.dtype} {tuple(self.clusters.shape)}")
        if self.keys is not None and len(self.keys) != n:
            raise DataSetError(f"{self.name}: {len(self.keys)} keys for {n} images")

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.pixels.shape[1:])

    def images_at(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The images at `index` (int indices or a slice), (B, C, H, W) float32 in [-1, 1] (latents as stored)."""
        if self.pixels.dtype == torch.float32:
            return self.pixels[index]
        return self.pixels[index].float() * (2.0 / 255.0) - 1.0

    def with_latents(self, latents: torch.Tensor) -> CaptionedDataset:
        """The same samples seen through a VAE: `latents` (N, C_z, h, w) float32 in place of the pixels."""
        return dataclasses.replace(self, pixels=latents.float().contiguous(), name=f"{self.name}/latents")

    def captions_at(self, index: torch.Tensor | Sequence[int]) -> list[str]:
        """The captions of the images at `index` (int indices), in order."""
        return [self.captions[i] for i in torch.as_tensor(index).reshape(-1).tolist()]

    def distinct_captions(self) -> list[str]:
        """Every caption once, in order of first appearance."""
        return list(dict.fromkeys(self.captions))

    def subset(self, idx: Sequence[int] | np.ndarray | torch.Tensor, name: str | None = None) -> CaptionedDataset:
        """The items at `idx` (int indices, in the given order), as a new data set."""
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        rows = index.tolist()
        return CaptionedDataset(self.pixels[index].contiguous(), tuple(self.captions[i] for i in rows),
                                name or self.name, None if self.clusters is None else self.clusters[index].clone(),
                                None if self.keys is None else tuple(self.keys[i] for i in rows))

    def fingerprint(self) -> str:
        """sha256 (hex) of pixels, captions and clusters: equal fingerprints mean equal data, in order."""
        digest = hashlib.sha256(self.pixels.contiguous().numpy().tobytes())
        digest.update(json.dumps(list(self.captions)).encode())
        if self.clusters is not None:
            digest.update(self.clusters.numpy().tobytes())
        return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ShardFile:
    """One WebDataset shard on local disk: its path, the blob id the manifest pins (`sha256`; None:
    hash the file), and the cluster of all its samples when the shard is one cluster's (None: take each
    sample's own `.cls`/json cluster, if any)."""

    path: Path
    sha256: str | None = None
    cluster: int | None = None


def file_blob_id(path: Path) -> str:
    """A file's blob id, what a swarm manifest pins for a shard: the root of its chunk digests
    (`protocol.hashing`), read 4 MiB at a time."""
    hasher = BlobHasher()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            hasher.update(block)
    return hasher.finish().sha256


@dataclasses.dataclass(frozen=True)
class DecodedShard:
    """One shard's decoded samples as cached: pixels (n, C, S, S) uint8 (memory-mapped), and per sample
    its caption, key and cluster (None where the shard gave none)."""

    pixels: np.ndarray
    captions: list[str]
    keys: list[str]
    clusters: list[int | None]


def _cache_paths(cache_dir: Path, sha256: str, channels: int, size: int) -> tuple[Path, Path]:
    stem = f"{sha256}-{channels}x{size}x{size}-v{CACHE_VERSION}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def _read_cached(pixels_path: Path, index_path: Path, shape: tuple[int, int, int]) -> DecodedShard | None:
    try:
        index = json.loads(index_path.read_text())
        pixels = np.load(pixels_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):  # absent, torn by a crash from an older writer, or rotten: a miss
        return None
    n = len(index.get("captions", ()))
    if pixels.dtype != np.uint8 or pixels.shape != (n, *shape) or not (
            len(index.get("keys", ())) == len(index.get("clusters", ())) == n):
        return None
    return DecodedShard(pixels, index["captions"], index["keys"], index["clusters"])


def _decode_into_cache(shard: ShardFile, sha256: str, size: int, channels: int, pixels_path: Path,
                       index_path: Path) -> None:
    actual = file_blob_id(shard.path)
    if actual != sha256:
        raise DataSetError(f"{shard.path} has blob id {actual}, the swarm pins {sha256}: fetch the shard again")
    records = list(iter_webdataset_records(shard.path, size, channels))
    pixels = (np.stack([r.pixels for r in records]) if records
              else np.zeros((0, channels, size, size), dtype=np.uint8))
    index = {"shard_sha256": sha256, "captions": [r.caption for r in records], "keys": [r.key for r in records],
             "clusters": [r.cluster for r in records]}

    def write_pixels(temporary: Path) -> None:
        with open(temporary, "wb") as file:  # a file object: np.save would append ".npy" to a path
            np.save(file, pixels, allow_pickle=False)

    write_atomically(pixels_path, write_pixels)
    write_atomically(index_path, lambda temporary: temporary.write_text(json.dumps(index)))


def cached_shard(shard: ShardFile, size: int, channels: int, cache_dir: str | Path) -> DecodedShard:
    """The decoded samples of one shard, from `cache_dir` or decoded now and cached (concurrent
    callers for one shard wait for the first)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sha256 = shard.sha256 or file_blob_id(shard.path)
    pixels_path, index_path = _cache_paths(cache_dir, sha256, channels, size)
    found = _read_cached(pixels_path, index_path, (channels, size, size))
    if found is not None:
        return found
    with exclusive(index_path):
        found = _read_cached(pixels_path, index_path, (channels, size, size))
        if found is None:
            _decode_into_cache(shard, sha256, size, channels, pixels_path, index_path)
            found = _read_cached(pixels_path, index_path, (channels, size, size))
    if found is None:
        raise DataSetError(f"the cache entry {index_path} for {shard.path} cannot be read back after writing it")
    return found


def load_captioned_shards(shards: Sequence[ShardFile], size: int, channels: int, cache_dir: str | Path, *,
                          name: str = "shards", max_items: int | None = None, seed: int = 0) -> CaptionedDataset:
    """One `CaptionedDataset` of the samples of `shards`, in shard order, each shard decoded at
    most once per cache dir (images centre-cropped, resized to (channels, size, size)).

    max_items: keep a uniform random sample of at most this many (drawn with `seed`, the same on
    every machine, kept in shard order), e.g. the router's bounded sample across clusters.
    Clusters: a shard's `cluster`, else each sample's own; set on the result only when every sample
    has one. An empty result raises `DataSetError` naming the shards."""
    if not shards:
        raise DataSetError("no shards to read")
    parts = [cached_shard(shard, size, channels, cache_dir) for shard in shards]
    counts = np.array([len(part.captions) for part in parts], dtype=np.int64)
    total = int(counts.sum())
    keep = np.arange(total)
    if max_items is not None and max_items < total:
        generator = np.random.Generator(np.random.PCG64(seed))
        keep = np.sort(generator.choice(total, size=max_items, replace=False))
    if len(keep) == 0:
        raise DataSetError(f"the shards {[str(s.path) for s in shards][:3]} hold no captioned images")
    pixels = torch.empty((len(keep), channels, size, size), dtype=torch.uint8)
    captions, keys, clusters = [], [], []
    starts = np.concatenate([[0], np.cumsum(counts)])
    written = 0
    for shard, part, start, stop in zip(shards, parts, starts[:-1], starts[1:]):
        rows = keep[(keep >= start) & (keep < stop)] - start
        if len(rows) == 0:
            continue
        pixels[written:written + len(rows)] = torch.from_numpy(np.ascontiguousarray(part.pixels[rows]))
        written += len(rows)
        captions += [part.captions[r] for r in rows]
        keys += [part.keys[r] for r in rows]
        clusters += [shard.cluster if shard.cluster is not None else part.clusters[r] for r in rows]
    known = all(c is not None for c in clusters)
    return CaptionedDataset(pixels, tuple(captions), name,
                            torch.tensor(clusters, dtype=torch.int64) if known else None, tuple(keys))
