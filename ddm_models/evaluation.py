"""Measuring a loaded expert on data it did not train on (used to check what a checkpoint claims)."""

from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn.functional as F

from ddm_models.captions import sample_captions
from ddm_models.data import ImageDataset
from ddm_models.sampling import LoadedExpert
from ddm_models.text import TextEncoder


@torch.no_grad()
def expert_loss(expert: LoadedExpert, data: ImageDataset, text_encoder: TextEncoder, *, max_images: int = 512,
                seed: int = 0, batch_size: int = 256,
                caption_sampler: Callable[[torch.Tensor, torch.Generator], List[str]] = sample_captions) -> float:
    """Mean squared error of `expert`'s own training target on up to `max_images` of `data`, with
    noise and times fixed by `seed` and t stratified over [0, 1) (comparable across experts of one
    objective). data: images (N, C, H, W) in [-1, 1]."""
    n = min(max_images, len(data))
    if n == 0:
        raise ValueError("cannot measure an expert on an empty data set")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *data.image_shape), generator=generator)
    u = (torch.arange(n) + torch.rand(n, generator=generator)) / n
    captions = caption_sampler(data.labels[:n], generator)
    device = next(expert.model.parameters()).device
    total = 0.0
    for start in range(0, n, batch_size):
        part = slice(start, min(n, start + batch_size))
        x_in, timestep, target = expert.objective.training_example(data.images[part], noise[part], u[part])
        prediction = expert.model(x_in.to(device), timestep.to(device), text_encoder.encode(captions[part]).to(device))
        total += float(F.mse_loss(prediction.float(), target.to(device).float(), reduction="sum"))
    return total / noise.numel()
