"""Measuring a loaded expert or a whole ensemble on data it did not train on (checking what a checkpoint
claims; comparing an ensemble with a monolithic model image by image)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F

from ddm_models.captions import sample_captions
from ddm_models.conditioning import CaptionSampler, TrainingData, batch_captions
from ddm_models.sampling import LoadedExpert
from ddm_models.text import TextBatch, TextEncoder


def _seeded_draw(data: TrainingData, max_images: int, seed: int, caption_sampler: CaptionSampler, what: str):
    """(n, noise (n, *image_shape), t (n,) stratified over [0, 1), n captions) for the first n =
    min(max_images, len(data)) images, all fixed by `seed`, drawn in this order from one generator."""
    n = min(max_images, len(data))
    if n == 0:
        raise ValueError(f"cannot measure {what} on an empty data set")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *data.image_shape), generator=generator)
    t = (torch.arange(n) + torch.rand(n, generator=generator)) / n
    return n, noise, t, batch_captions(data, torch.arange(n), generator, caption_sampler)


@torch.no_grad()
def expert_loss(expert: LoadedExpert, data: TrainingData, text_encoder: TextEncoder, *, max_images: int = 512,
                seed: int = 0, batch_size: int = 256, caption_sampler: CaptionSampler = sample_captions) -> float:
    """Mean squared error of `expert`'s own training target on up to `max_images` of `data`, with
    noise and times fixed by `seed` and t stratified over [0, 1) (comparable across experts of one
    objective). data: images (N, C, H, W), with their own captions (`CaptionedDataset`) or labels
    that `caption_sampler` turns into captions (`ImageDataset`)."""
    n, noise, u, captions = _seeded_draw(data, max_images, seed, caption_sampler, "an expert")
    device = next(expert.model.parameters()).device
    total = 0.0
    for start in range(0, n, batch_size):
        part = slice(start, min(n, start + batch_size))
        x_in, timestep, target = expert.objective.training_example(data.images_at(part), noise[part], u[part])
        prediction = expert.model(x_in.to(device), timestep.to(device), text_encoder.encode(captions[part]).to(device))
        total += float(F.mse_loss(prediction.float(), target.to(device).float(), reduction="sum"))
    return total / noise.numel()


@torch.no_grad()
def router_accuracy(router, data: TrainingData, clusters: torch.Tensor, text_encoder: TextEncoder, *,
                    max_images: int = 512, seed: int = 0, batch_size: int = 256,
                    caption_sampler: CaptionSampler = sample_captions) -> float:
    """Fraction of up to `max_images` of `data` whose cluster (`clusters`, (N,) int64) the router
    predicts from x_t on the sampler's path, with noise and t stratified over [0, 1) fixed by `seed`:
    the measure a router record's `heldout_accuracy` claims."""
    from ddm_models.router import Router

    n, noise, t, captions = _seeded_draw(data, max_images, seed, caption_sampler, "a router")
    device = next(router.parameters()).device
    correct = 0
    for start in range(0, n, batch_size):
        part = slice(start, min(n, start + batch_size))
        text = text_encoder.encode(captions[part]).to(device) if router.config.use_text else None
        x_t = Router.training_example(data.images_at(part), noise[part], t[part]).to(device)
        logits = router(x_t, t[part].to(device), text)
        correct += int((logits.argmax(1).cpu() == clusters[:n][part]).sum())
    return correct / n


@torch.no_grad()
def velocity_losses(velocity: Callable[[torch.Tensor, torch.Tensor, TextBatch], torch.Tensor], data: TrainingData,
                    text_encoder: TextEncoder, *, seed: int = 0, rows: torch.Tensor | None = None,
                    batch_size: int = 256, caption_sampler: CaptionSampler = sample_captions) -> torch.Tensor:
    """Per-image squared error (N,) of a flow-matching velocity on `data`, in FM velocity space, so
    experts of any objective and whole ensembles are measured on one scale.

    velocity(x_t (B, C, H, W), t (B,), text) -> v (B, C, H, W), e.g. `LoadedExpert.velocity` or
    `EnsembleSampler.velocity(...)[0]`; target v = eps - x0 at x_t = (1 - t) x0 + t eps. Noise,
    captions and t (stratified over (0, 1), in a seeded order) are fixed per image by `seed` and
    the image's position in `data`, so `rows` (indices into `data`) selects a subset with exactly
    the noise the full set gets: an expert on its own cluster and a model on all the data are
    compared image by image. Returns the mean over pixels of each selected image's error."""
    n = len(data)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *data.image_shape), generator=generator)
    t = ((torch.arange(n) + torch.rand(n, generator=generator).clamp(1e-3, 1 - 1e-3)) / n)
    t = t[torch.randperm(n, generator=generator)]
    captions = batch_captions(data, torch.arange(n), generator, caption_sampler)
    rows = torch.arange(n) if rows is None else torch.as_tensor(rows, dtype=torch.int64)
    losses = []
    for part in rows.split(batch_size):
        x0, eps, t_part = data.images_at(part), noise[part], t[part]
        x_t = (1 - t_part.view(-1, 1, 1, 1)) * x0 + t_part.view(-1, 1, 1, 1) * eps
        v = velocity(x_t, t_part, text_encoder.encode([captions[i] for i in part.tolist()]))
        losses.append((v.float() - (eps - x0)).pow(2).flatten(1).mean(1))
    return torch.cat(losses) if losses else torch.zeros(0)


# --- audits: a measurement other peers can repeat ----------------------------------------------------
AUDIT_IMAGES = 128
AUDIT_BATCH = 32


def audit_seed(blob_sha256: str) -> int:
    """The seed of every honest audit of one checkpoint: its blob's sha256, read as a number (60 bits),
    so auditors draw the same (t, noise) without agreeing on anything but the checkpoint."""
    return int(blob_sha256[:15], 16)


@torch.no_grad()
def audit_loss(expert: LoadedExpert, data: TrainingData, text_encoder: TextEncoder, *, seed: int,
               max_images: int = AUDIT_IMAGES, batch_size: int = AUDIT_BATCH,
               caption_sampler: CaptionSampler = sample_captions) -> float:
    """`expert_loss`, made repeatable by other peers: the first `max_images` images of `data` in their
    order, in fixed batches, with (t, noise, captions) drawn from `seed` on the CPU, the network run
    in float64 on a copy of the weights and the squared errors summed in float64. Two peers with
    other torch thread counts then differ only by float64 rounding (about 1e-12 relative, see
    tests/test_audits.py), where float32 differs by about 1e-6."""
    n = min(max_images, len(data))
    if n == 0:
        raise ValueError("cannot audit an expert on an empty data set")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *data.image_shape), generator=generator, dtype=torch.float64)
    u = ((torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n)
    captions = batch_captions(data, torch.arange(n), generator, caption_sampler)
    model = copy.deepcopy(expert.model).to("cpu", torch.float64).eval()
    images = data.images_at(slice(0, n)).to(torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, n, batch_size):
        part = slice(start, min(n, start + batch_size))
        x_in, timestep, target = expert.objective.training_example(images[part], noise[part], u[part])
        encoded = text_encoder.encode(captions[part]).to("cpu")
        text = TextBatch(encoded.states.to(torch.float64), encoded.mask,
                         None if encoded.pooled is None else encoded.pooled.to(torch.float64))
        prediction = model(x_in.to(torch.float64), timestep.to(torch.float64), text)
        total += (prediction.to(torch.float64) - target.to(torch.float64)).pow(2).sum()
    return float(total) / noise.numel()
