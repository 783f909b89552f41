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
