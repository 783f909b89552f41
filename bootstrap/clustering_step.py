"""Embed every spooled image into a memory-mapped matrix and cluster it by two-stage k-means.

The embedding is named as the manifest records it (`clustering.embedding`): "thumbnail-pca"
(8x8 thumbnails, then PCA to 32 dimensions; needs no weights) or "dinov2:<model id>" (pooled DINOv2
features from the local Hugging Face cache, as DDM and Paris cluster). Fine centroids are fitted
by faiss when it is installed, else by scikit-learn; the method string says which, because the
two give different (each deterministic) assignments.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bootstrap.ingest import Spool
from bootstrap.progress import progress_bar
from ddm_models.clustering import ClusterSplit, cluster_embeddings
from ddm_models.image_embeddings import (OFFLINE_EMBEDDING, THUMBNAIL_PCA_DIM, embed_to_memmap, embedder_for,
                                         pca_to_memmap)
from ddm_models.sources import SourceError

EMBED_BATCH = 64
METHOD_SKLEARN, METHOD_FAISS = "kmeans-2stage", "kmeans-2stage-faiss"


class TooFewImages(SourceError):
    """Fewer usable images than clusters asked for."""


@dataclasses.dataclass(frozen=True)
class Clustering:
    split: ClusterSplit
    method: str
    embedding: str
    fine_clusters: int
    seed: int


def _batches(spool: Spool, bar) -> Iterator[torch.Tensor]:
    for start in range(0, spool.count, EMBED_BATCH):
        stop = min(start + EMBED_BATCH, spool.count)
        pixels = np.stack([spool.pixels(i) for i in range(start, stop)])  # (B, H, W, 3) uint8
        yield torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, 3, H, W) in [-1, 1]
        bar.advance(stop - start)


def embed_spool(spool: Spool, embedding: str, work: Path, seed: int) -> np.ndarray:
    """(N, D) float32 memory-mapped embeddings of the spool's images, one row per sample."""
    embedder = embedder_for(embedding)
    with progress_bar("embedding", spool.count) as bar:
        rows = embed_to_memmap(embedder, _batches(spool, bar), spool.count, work / "embeddings.npy")
    if embedding == OFFLINE_EMBEDDING:
        rows = pca_to_memmap(rows, THUMBNAIL_PCA_DIM, work / "embeddings-pca.npy", seed)
    return rows


def cluster_spool(spool: Spool, *, clusters: int, embedding: str, fine_clusters: int, seed: int,
                  work: Path, backend: str = "auto") -> Clustering:
    """Two-stage k-means of the spool's embeddings into `clusters` clusters (fine centroids: at most
    `fine_clusters`, and no more than there are images). backend: "auto", "faiss" or "sklearn"."""
    if spool.count < 2 * clusters:
        raise TooFewImages(f"{spool.count} usable images cannot make {clusters} clusters with a held-out part "
                           f"each; ask for at most {max(1, spool.count // 2)} clusters")
    rows = embed_spool(spool, embedding, work, seed)
    if backend == "auto":
        backend = "faiss" if importlib.util.find_spec("faiss") else "sklearn"
    fine = max(clusters, min(fine_clusters, spool.count))
    with progress_bar(f"k-means ({backend})", None):
        split = cluster_embeddings(rows, clusters, seed, fine=fine, backend=backend)
    del rows
    return Clustering(split, METHOD_FAISS if backend == "faiss" else METHOD_SKLEARN, embedding, fine, seed)
