"""What a job trains on: the swarm's data split into clusters.

For the embedded default every peer builds the data and its split locally and deterministically
(and checks the split's sha256 against the manifest when it pins one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from ddm_models.clustering import ClusterSplit, ClusterSplitError, cluster_images
from ddm_models.data import ImageDataset, heldout_split, load_embedded_digits, load_image_folder, load_small_digits, subset
from node.errors import InvalidJobSetup
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.data")


@dataclass(frozen=True)
class SwarmData:
    dataset: ImageDataset
    split: ClusterSplit
    train_idx: np.ndarray
    heldout_idx: np.ndarray

    def expert_data(self, cluster: int) -> Tuple[ImageDataset, ImageDataset]:
        """(train, held-out) images of one cluster."""
        members = self.split.assignments == cluster
        train = self.train_idx[members[self.train_idx]]
        heldout = self.heldout_idx[members[self.heldout_idx]]
        return (subset(self.dataset, train, f"{self.dataset.name}/cluster-{cluster}"),
                subset(self.dataset, heldout, f"{self.dataset.name}/cluster-{cluster}/heldout"))

    def heldout_data(self, cluster: int) -> ImageDataset:
        """The held-out images of one cluster (what an auditor measures experts on)."""
        return self.expert_data(cluster)[1]

    def prefetch(self, job) -> None:
        """Nothing to fetch: every peer builds this data set itself."""

    @property
    def held(self) -> frozenset:
        """Blobs this data set keeps in the node's store: none (every peer builds it itself)."""
        return frozenset()

    def router_data(self) -> Tuple[ImageDataset, torch.Tensor, Tuple[ImageDataset, torch.Tensor]]:
        """All training images with their cluster labels, and the held-out ones likewise."""
        clusters = torch.as_tensor(self.split.assignments, dtype=torch.long)
        train, heldout = torch.as_tensor(self.train_idx), torch.as_tensor(self.heldout_idx)
        return (subset(self.dataset, self.train_idx), clusters[train],
                (subset(self.dataset, self.heldout_idx), clusters[heldout]))


def load_dataset(manifest: SwarmManifest) -> ImageDataset:
    spec = manifest.dataset
    if spec.kind == "embedded-digits":
        dataset = load_embedded_digits()
    elif spec.kind == "small-digits":
        dataset = load_small_digits()
    elif spec.kind == "image-folder":
        dataset = load_image_folder(spec.uri, spec.image_size, spec.channels)
    else:
        raise InvalidJobSetup(f"data set kind '{spec.kind}' is read by `ddm_models.data.iter_webdataset_shard`; "
                              "a node trains on image-folder or embedded data sets only for now")
    if dataset.image_shape != (spec.channels, spec.image_size, spec.image_size):
        raise InvalidJobSetup(f"data set '{dataset.name}' has images {dataset.image_shape}, the manifest says "
                              f"{(spec.channels, spec.image_size, spec.image_size)}")
    return dataset


def prepare_swarm_data(manifest: SwarmManifest, cache_dir: Path) -> SwarmData:
    """The swarm's data and cluster split, built once and cached under `cache_dir`."""
    dataset = load_dataset(manifest)
    clustering = manifest.clustering
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) / (f"split-{dataset.fingerprint()[:16]}-k{clustering.num_clusters}"
                               f"-f{clustering.fine_clusters}-s{clustering.seed}.npz")
    split = None
    if cache.exists():
        try:
            split = ClusterSplit.load(cache)
        except (ClusterSplitError, OSError, ValueError) as error:
            logger.warning(f"rebuilding the cluster split: the cached one is unusable ({error})")
    if split is None:
        split = cluster_images(dataset.images, clustering.num_clusters, clustering.seed, fine=clustering.fine_clusters,
                               embedding=clustering.embedding)
        split.save(cache)
    if clustering.assignment_sha256 and split.sha256 != clustering.assignment_sha256:
        raise InvalidJobSetup(f"this peer's cluster split hashes to {split.sha256[:16]}…, the swarm's manifest pins "
                              f"{clustering.assignment_sha256[:16]}…: its numeric libraries differ from the swarm's; "
                              "install the versions the swarm names")
    train_idx, heldout_idx = heldout_split(len(dataset), manifest.dataset.heldout_fraction, manifest.dataset.split_seed)
    return SwarmData(dataset, split, train_idx, heldout_idx)


def job_data(manifest: SwarmManifest, cache_dir: Path, fetch=None):
    """The swarm's data as a job needs it: `SwarmData` for the data sets every peer builds itself,
    `ShardData` (fetching only the job's shards through `fetch`) for swarms made by `swarm create`."""
    if manifest.dataset.kind == "shards":
        from node.data.shards import ShardData  # the shard path needs the blob room; digit swarms do not

        if fetch is None:
            raise InvalidJobSetup(f"swarm '{manifest.name}' trains on data shards, which need a running node "
                                  "to fetch them")
        return ShardData(manifest, fetch, Path(cache_dir))
    return prepare_swarm_data(manifest, cache_dir)
