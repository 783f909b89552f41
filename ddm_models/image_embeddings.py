"""Image embeddings for clustering real data sets (DINOv2 or open_clip), written to a memory-mapped
.npy file so that millions of rows never need to fit in RAM.

Weights come from the local cache only; nothing is downloaded. None of this is used by the
embedded default (which clusters on PCA of pixels), and every heavy import happens inside a call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ddm_models.errors import ModelError

# ImageNet statistics, which both DINOv2 and (approximately) CLIP expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EmbedderUnavailable(ModelError, RuntimeError):
    """The embedding model's package or weights are not available locally."""


class DINOv2Embedder:
    """Pooled DINOv2 features (the CLS token of the last layer), as DDM and Paris cluster on.
    `model_name` is a Hugging Face id already in the local cache, or a local folder."""

    def __init__(self, model_name: str = "facebook/dinov2-base", device: torch.device | str = "cpu",
                 resolution: int = 224):
        os.environ["HF_HUB_OFFLINE"] = "1"
        import transformers

        try:
            self.model = transformers.AutoModel.from_pretrained(model_name, local_files_only=True)
        except OSError as error:
            raise EmbedderUnavailable(f"{model_name} is not in the local Hugging Face cache ({error}); "
                                      f"copy its weights there or pass a local folder") from error
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device, self.resolution = torch.device(device), resolution
        self.dim = self.model.config.hidden_size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] (C = 1 or 3) -> (B, dim) float32."""
        with torch.no_grad():
            out = self.model(pixel_values=_imagenet_normalise(images, self.resolution).to(self.device))
        return out.last_hidden_state[:, 0].float().cpu()


class OpenCLIPImageEmbedder:
    """open_clip image embeddings (normalised), from a local checkpoint file or cached tag."""

    def __init__(self, arch: str, pretrained: str, device: torch.device | str = "cpu", resolution: int = 224):
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import open_clip

            model, _, _ = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        except Exception as error:  # ImportError, or open_clip's errors for weights it cannot find
            raise EmbedderUnavailable(f"open_clip {arch} / {pretrained} is not available locally ({error}); "
                                      f"pip install 'ddm-swarm[real]' and put its weights in the cache") from error
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.resolution = torch.device(device), resolution
        self.dim = self(torch.zeros(1, 3, resolution, resolution)).shape[1]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.model.encode_image(_imagenet_normalise(images, self.resolution).to(self.device),
                                               normalize=True)
        return features.float().cpu()


def _imagenet_normalise(images: torch.Tensor, resolution: int) -> torch.Tensor:
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    images = F.interpolate(images.float(), size=(resolution, resolution), mode="bicubic", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


def embed_to_memmap(embedder, batches: Iterable[torch.Tensor], count: int, path: str | Path) -> np.memmap:
    """Run `embedder` over `batches` of images (B, C, H, W) in [-1, 1], `count` images in all, and
    write the (count, embedder.dim) float32 rows into a .npy file at `path` (written under a
    temporary name and renamed when complete, so a crash leaves no partial file behind)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    rows = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=(count, embedder.dim))
    filled = 0
    for batch in batches:
        features = embedder(batch).numpy()
        rows[filled:filled + len(features)] = features
        filled += len(features)
    if filled != count:
        raise ValueError(f"expected {count} images, got {filled}")
    rows.flush()
    del rows
    os.replace(temporary, path)
    return np.load(path, mmap_mode="r")


# --- the offline embedding: thumbnails through PCA -----------------------------------------------
# For small swarms and tests: no weights at all. A tiny thumbnail keeps an image's colours and
# coarse layout, which is what k-means can group without a learned feature space; PCA then keeps
# the directions along which the collection varies most.

THUMBNAIL_SIDE = 8
THUMBNAIL_PCA_DIM = 32
PCA_FIT_ROWS = 20_000  # PCA is fitted on a fixed sample of at most this many thumbnails
OFFLINE_EMBEDDING = "thumbnail-pca"
DINOV2_PREFIX = "dinov2:"


class ThumbnailEmbedder:
    """images (B, 3, H, W) in [-1, 1] -> (B, 3 * side * side) float32: area-averaged thumbnails."""

    def __init__(self, side: int = THUMBNAIL_SIDE):
        self.side, self.dim = side, 3 * side * side

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), self.side).flatten(1)


def pca_to_memmap(rows: np.ndarray, dim: int, path: str | Path, seed: int,
                  fit_rows: int = PCA_FIT_ROWS, chunk: int = 8192) -> np.memmap:
    """Project (N, D) rows (possibly memory-mapped) onto their top `dim` principal components, into
    a (N, min(dim, D, N)) float32 .npy at `path`. Fitted on a seeded sample of `fit_rows` rows and
    applied chunk by chunk, so memory does not grow with N."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    n = rows.shape[0]
    dim = min(dim, rows.shape[1], n)
    sample = np.arange(n) if n <= fit_rows else np.sort(
        np.random.Generator(np.random.PCG64(seed)).choice(n, fit_rows, replace=False))
    with threadpool_limits(1):  # BLAS threads change float summation order, hence the result
        pca = PCA(dim, svd_solver="full").fit(np.asarray(rows[sample], dtype=np.float64))
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
        out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, chunk):
            out[start:start + chunk] = pca.transform(np.asarray(rows[start:start + chunk], dtype=np.float64))
    out.flush()
    del out
    os.replace(temporary, path)
    return np.load(path, mmap_mode="r")


def embedder_for(embedding: str, device: torch.device | str = "cpu"):
    """The embedder a manifest's `clustering.embedding` names: "thumbnail-pca" (the thumbnails; PCA
    follows with `pca_to_memmap`) or "dinov2:<Hugging Face id or local folder>"."""
    if embedding == OFFLINE_EMBEDDING:
        return ThumbnailEmbedder()
    if embedding.startswith(DINOV2_PREFIX) and len(embedding) > len(DINOV2_PREFIX):
        return DINOv2Embedder(embedding[len(DINOV2_PREFIX):], device=device)
    raise EmbedderUnavailable(f"unknown image embedding {embedding!r}; use {OFFLINE_EMBEDDING!r} or "
                              f"'{DINOV2_PREFIX}facebook/dinov2-base' (weights in the local Hugging Face cache)")
