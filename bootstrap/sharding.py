"""Lay a clustered spool out as shards: per cluster a training part and a held-out part, plus a
bounded router sample across clusters, each written as size-bounded webdataset shards.

1. Cluster k's samples (in source order) are split at random, seeded by (split_seed, k): held out
   round(n_k * heldout_fraction) of them, at least one, the rest for training. A cluster of fewer
   than two samples cannot be split and is refused (ask for fewer clusters).
2. The router sample draws an equal quota of router_samples / K training samples from every cluster
   (seeded), so a small cluster is not drowned out by a big one; each sample keeps its cluster id.
3. Samples are written in index order, shard after shard; a shard is closed before it would pass
   `max_shard_bytes` (a single larger sample gets a shard of its own).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from bootstrap.ingest import Spool
from bootstrap.progress import progress_bar
from bootstrap.shards import ShardWriter, sample_bytes
from ddm_models.clustering import ClusterSplit
from ddm_models.sources import SourceError
from protocol.manifest_data import ClusterShards, ShardRef

DEFAULT_ROUTER_SAMPLES = 4096


class ClusterTooSmall(SourceError):
    """A cluster has too few samples to set any aside as held-out data."""


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    clusters: tuple[ClusterShards, ...]
    router_sample: tuple[ShardRef, ...]


def split_cluster(members: np.ndarray, fraction: float, seed: int, cluster: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, heldout): sorted int64 indices of one cluster's `members`, held-out part >= 1."""
    if len(members) < 2:
        raise ClusterTooSmall(f"cluster {cluster} has {len(members)} image(s); at least 2 are needed to hold "
                              f"one out; ask for fewer clusters")
    held = min(len(members) - 1, max(1, int(round(len(members) * fraction))))
    order = np.random.Generator(np.random.PCG64([seed, cluster])).permutation(len(members))
    return np.sort(members[order[held:]]), np.sort(members[order[:held]])


def router_indices(train_parts: list[np.ndarray], total: int, seed: int) -> np.ndarray:
    """Sorted indices of the router sample: at most `total`, an equal quota from every cluster's
    train part (a cluster smaller than its quota gives all it has)."""
    k = len(train_parts)
    rng = np.random.Generator(np.random.PCG64([seed, 2**31]))
    picks = []
    for cluster, part in enumerate(train_parts):
        quota = total // k + (cluster < total % k)
        picks.append(part if len(part) <= quota else rng.choice(part, quota, replace=False))
    return np.sort(np.concatenate(picks)).astype(np.int64)


def write_shards(spool: Spool, indices: np.ndarray, assignments: np.ndarray, folder: Path,
                 max_shard_bytes: int, bar) -> tuple[ShardRef, ...]:
    """Write the spool samples at `indices` (in that order) as shards in `folder`."""
    refs, writer = [], None
    try:
        for index in indices:
            png, caption = spool.png(int(index)), spool.caption(int(index))
            if writer is not None and writer.samples and \
                    writer.bytes + sample_bytes(png, caption.encode()) > max_shard_bytes:
                refs.append(ShardRef(writer.finish(), writer.samples))
                writer = None
            writer = writer or ShardWriter(folder)
            writer.add(f"{int(index):09d}", png, caption, int(assignments[index]))
            bar.advance()
        if writer is not None:
            refs.append(ShardRef(writer.finish(), writer.samples))
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    return tuple(refs)


def lay_out_shards(spool: Spool, split: ClusterSplit, folder: Path, *, heldout_fraction: float, split_seed: int,
                   router_samples: int = DEFAULT_ROUTER_SAMPLES, max_shard_bytes: int) -> ShardLayout:
    """Write every cluster's train and held-out shards and the router sample into `folder`."""
    assignments = split.assignments
    parts = [split_cluster(split.indices(k), heldout_fraction, split_seed, k) for k in range(split.num_clusters)]
    router = router_indices([train for train, _ in parts], router_samples, split_seed)
    clusters = []
    with progress_bar("writing shards", spool.count + len(router)) as bar:
        for k, (train, heldout) in enumerate(parts):
            clusters.append(ClusterShards(k, write_shards(spool, train, assignments, folder, max_shard_bytes, bar),
                                          write_shards(spool, heldout, assignments, folder, max_shard_bytes, bar)))
        router_refs = write_shards(spool, router, assignments, folder, max_shard_bytes, bar)
    return ShardLayout(tuple(clusters), router_refs)
