"""Split a data set into K clusters, one per expert, by two-stage k-means over image embeddings.

As in DDM and Paris: k-means into many fine centroids, then k-means over those centroids (weighted
by their member counts) into K coarse clusters; each image joins the coarse cluster of its fine
centroid. The embedded default embeds images by PCA of their pixels: Euclidean pixel structure is
what stays visible under the Gaussian noising the router sees, and the result groups similar-looking
digits. Real data sets bring precomputed DINOv2/open_clip embeddings (see `image_embeddings`),
possibly memory-mapped and too big for RAM; `faiss` is used there when asked for.

Everything is deterministic for a seed: BLAS threads are pinned to one while fitting, cluster ids
are renumbered in order of first appearance, and the split carries the sha256 of its assignment so
peers can check they computed the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from ddm_models.errors import ModelError

PIXEL_PCA_DIM = 32
FINE_CENTROIDS = 64
MAX_FIT_POINTS = 1_000_000  # fine centroids are fitted on at most this many points (a fixed sample)
ASSIGN_CHUNK = 65_536  # rows of a (memory-mapped) embedding read at a time


class ClusterSplitError(ModelError, ValueError):
    """A stored cluster split is unreadable or does not match its recorded sha256."""


@dataclasses.dataclass(frozen=True, eq=False)
class ClusterSplit:
    """assignments: (N,) int64 cluster id of every item, ids in [0, num_clusters), numbered in order
    of first appearance; sha256: hex digest of the assignment array's little-endian int64 bytes."""

    assignments: np.ndarray
    num_clusters: int
    sha256: str

    @staticmethod
    def from_assignments(assignments: np.ndarray, num_clusters: int) -> ClusterSplit:
        assignments = np.ascontiguousarray(assignments, dtype="<i8")
        assignments.setflags(write=False)
        return ClusterSplit(assignments, num_clusters, assignment_sha256(assignments))

    @property
    def sizes(self) -> list[int]:
        """Number of items in each cluster."""
        return np.bincount(self.assignments, minlength=self.num_clusters).tolist()

    def indices(self, cluster: int) -> np.ndarray:
        """Sorted int64 indices of the items in `cluster`."""
        if not 0 <= cluster < self.num_clusters:
            raise ValueError(f"cluster {cluster} does not exist; this split has {self.num_clusters}")
        return np.flatnonzero(self.assignments == cluster).astype(np.int64)

    def label_table(self, labels: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
        """(num_clusters, num_classes) counts: row k is the label distribution of cluster k."""
        table = np.zeros((self.num_clusters, num_classes), dtype=np.int64)
        np.add.at(table, (self.assignments, np.asarray(labels, dtype=np.int64)), 1)
        return table

    def save(self, path: str | Path) -> None:
        """Write the split as .npz (atomically: temporary file, fsync, rename)."""
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            np.savez(file, assignments=self.assignments, num_clusters=self.num_clusters, sha256=self.sha256)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)

    @staticmethod
    def load(path: str | Path) -> ClusterSplit:
        """Read a split written by `save`, checking its assignments against the stored sha256."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                assignments, num_clusters = stored["assignments"], int(stored["num_clusters"])
                recorded = str(stored["sha256"])
        except Exception as error:  # zipfile, numpy's header parser and the OS each fail their own way
            raise ClusterSplitError(f"{path} is not a readable cluster split: {type(error).__name__}: {error}") \
                from error
        split = ClusterSplit.from_assignments(assignments, num_clusters)
        if split.sha256 != recorded:
            raise ClusterSplitError(f"{path}: assignments hash to {split.sha256}, the file records {recorded}; "
                                    f"recompute the split")
        return split


def assignment_sha256(assignments: np.ndarray) -> str:
    """sha256 (hex) of an assignment array as little-endian int64 bytes."""
    return hashlib.sha256(np.ascontiguousarray(assignments, dtype="<i8").tobytes()).hexdigest()


def embed_for_clustering(images: torch.Tensor, dim: int = PIXEL_PCA_DIM) -> np.ndarray:
    """PCA of the flattened pixels: images (N, C, H, W) -> (N, dim) float64 (full SVD: exact and
    deterministic). Fine for data sets that fit in memory, like the embedded digits."""
    from sklearn.decomposition import PCA

    pixels = images.reshape(images.shape[0], -1).double().numpy()
    with threadpool_limits(1):
        return PCA(dim, svd_solver="full").fit_transform(pixels)


def cluster_embeddings(embeddings: np.ndarray, k: int, seed: int, *, fine: int = FINE_CENTROIDS,
                       backend: str = "sklearn") -> ClusterSplit:
    """Two-stage k-means over embeddings (N, D), which may be an `np.memmap` larger than RAM.

    Fine centroids are fitted on a fixed sample of at most MAX_FIT_POINTS rows; every row is then
    assigned chunk by chunk. backend "sklearn" (exact Lloyd, the default) or "faiss" (imported only
    when asked for; for millions of rows).
    """
    n = embeddings.shape[0]
    if not 1 <= k <= fine <= n:
        raise ValueError(f"need 1 <= k ({k}) <= fine centroids ({fine}) <= items ({n})")
    sample = np.arange(n) if n <= MAX_FIT_POINTS else np.sort(
        np.random.Generator(np.random.PCG64(seed)).choice(n, MAX_FIT_POINTS, replace=False))
    fit_points = np.asarray(embeddings[sample], dtype=np.float64 if backend == "sklearn" else np.float32)
    with threadpool_limits(1):
        centroids, nearest = _fine_centroids(fit_points, fine, seed, backend)
        fine_of_item = np.concatenate([nearest(np.asarray(embeddings[start:start + ASSIGN_CHUNK]))
                                       for start in range(0, n, ASSIGN_CHUNK)])
        coarse_of_fine = _merge_centroids(centroids, np.bincount(fine_of_item, minlength=fine), k, seed)
    return ClusterSplit.from_assignments(_number_by_first_appearance(coarse_of_fine[fine_of_item]), k)


def cluster_images(images: torch.Tensor, k: int, seed: int, *, fine: int = FINE_CENTROIDS,
                   embedding: str = "pixel-pca") -> ClusterSplit:
    """The embedded default's split: two-stage k-means of `embed_for_clustering(images)`.
    images: (N, C, H, W) in [-1, 1]; returns one of `k` cluster ids per image. `embedding` is the
    manifest's `clustering.embedding`; in-memory images support only "pixel-pca"."""
    if embedding != "pixel-pca":
        raise ValueError(f"cluster_images embeds by 'pixel-pca' only, not {embedding!r}; for DINOv2 or "
                         f"open_clip embeddings use image_embeddings.embed_to_memmap, then cluster_embeddings")
    return cluster_embeddings(embed_for_clustering(images), k, seed, fine=fine)


def _fine_centroids(points: np.ndarray, fine: int, seed: int, backend: str):
    if backend == "sklearn":
        from sklearn.cluster import KMeans

        model = KMeans(fine, n_init=1, random_state=seed).fit(points)
        return model.cluster_centers_, lambda chunk: model.predict(np.asarray(chunk, dtype=np.float64))
    if backend == "faiss":
        try:
            import faiss
        except ImportError as error:
            raise ImportError("backend='faiss' needs faiss (pip install faiss-cpu)") from error
        model = faiss.Kmeans(points.shape[1], fine, niter=25, seed=seed, verbose=False)
        model.train(points)
        return model.centroids.astype(np.float64), lambda chunk: model.index.search(
            np.ascontiguousarray(chunk, dtype=np.float32), 1)[1][:, 0]
    raise ValueError(f"unknown k-means backend {backend!r}; use 'sklearn' or 'faiss'")


def _merge_centroids(centroids: np.ndarray, counts: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Coarse cluster of every fine centroid: k-means over the centroids weighted by member counts."""
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=seed).fit(centroids, sample_weight=counts).labels_


def _number_by_first_appearance(assignments: np.ndarray) -> np.ndarray:
    """Renumber cluster ids so that id 0 is the cluster of item 0, id 1 the next new one, and so on:
    the split then does not depend on the arbitrary ids k-means hands out."""
    _, first = np.unique(assignments, return_index=True)
    order = np.argsort(first)
    renumber = np.empty(assignments.max() + 1, dtype=np.int64)
    renumber[np.unique(assignments)[order]] = np.arange(len(order))
    return renumber[assignments]
