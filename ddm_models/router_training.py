"""The router's trainer: cross-entropy on noised samples labelled by their cluster, on exactly the
sampler's noising path and time convention (see `ddm_models.router`). Shares the optimiser, EMA,
checkpoint and DDP machinery of `ddm_models.training`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from ddm_models.captions import sample_captions
from ddm_models.conditioning import CaptionSampler, TrainingData, batch_captions, caption_encoder, cluster_labels
from ddm_models.configs import RouterConfig
from ddm_models.router import Router, build_router
from ddm_models.text import TextBatch, TextEncoder
from ddm_models.training import TIME_SAMPLINGS, _sample_times, _Trainer


@dataclasses.dataclass(frozen=True)
class RouterEvaluation:
    """Held-out accuracy overall and per FM-time bin: bins[i] = (t_low, t_high, accuracy)."""

    accuracy: float
    bins: tuple[tuple[float, float, float], ...]


class RouterTrainer(_Trainer):
    """Trains the router with cross-entropy on x_t = (1-t) x0 + t eps (the sampler's path), t
    uniform in [0, 1], labelled by cluster; with `config.use_text` it sees each image's caption
    (its own, or drawn from its label as for experts). `clusters`: (N,) int64 cluster of each
    image; None takes a `CaptionedDataset`'s own `clusters` (for `heldout` too: (data, None))."""

    kind = "router"

    def __init__(self, config: RouterConfig, dataset: TrainingData, clusters: torch.Tensor | None,
                 text_encoder: TextEncoder | None = None, *, seed: int = 0, batch_size: int = 128, lr: float = 1e-3,
                 ema_decay: float = 0.999, weight_decay: float = 0.0, warmup_steps: int = 50, grad_clip: float = 1.0,
                 device: torch.device | str = "cpu",
                 heldout: tuple[TrainingData, torch.Tensor | None] | None = None, time_sampling: str = "uniform",
                 caption_sampler: CaptionSampler = sample_captions, compile_model: bool | str = False):
        clusters = cluster_labels(dataset, clusters)
        if heldout is not None:
            heldout = (heldout[0], cluster_labels(heldout[0], heldout[1]))
        if len(clusters) != len(dataset) or int(clusters.max()) >= config.num_clusters or int(clusters.min()) < 0:
            raise ValueError(f"clusters must give each of the {len(dataset)} images a cluster in "
                             f"0..{config.num_clusters - 1}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        if config.use_text and text_encoder is None:
            raise ValueError("a router with use_text=True needs a text encoder")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_router(config)
        super().__init__(model, config, seed=seed, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, grad_clip=grad_clip, device=device,
                         compile_model=compile_model)
        self.dataset, self.clusters, self.heldout = dataset, clusters.long(), heldout
        if config.use_text:
            text_encoder = caption_encoder(text_encoder, dataset, heldout[0] if heldout else None)
        self.text_encoder, self.caption_sampler = text_encoder, caption_sampler
        self.time_sampling = time_sampling

    def _text(self, index: torch.Tensor, generator: torch.Generator) -> TextBatch | None:
        if not self.config.use_text:
            return None
        captions = batch_captions(self.dataset, index, generator, self.caption_sampler)
        return self.text_encoder.encode(captions).to(self.device)

    def _loss(self, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(self.dataset), (self.batch_size,), generator=generator)
        x0 = self.dataset.images_at(index)
        text = self._text(index, generator)
        noise = torch.randn(x0.shape, generator=generator)
        t = _sample_times(torch.rand(self.batch_size, generator=generator), self.time_sampling)
        logits = self.trained(Router.training_example(x0, noise, t).to(self.device), t.to(self.device), text)
        return F.cross_entropy(logits.float(), self.clusters[index].to(self.device))

    @torch.no_grad()
    def evaluate(self, num_bins: int = 5, repeats: int = 2, batch_size: int = 512) -> RouterEvaluation:
        """EMA router accuracy on the held-out images (the training set if none), each image seen
        `repeats` times at stratified t, overall and in `num_bins` equal bins of t."""
        data, clusters = self.heldout if self.heldout is not None else (self.dataset, self.clusters)
        generator = self._generator(2**31 - 2)
        n = len(data) * repeats
        index = torch.arange(n) % len(data)
        t = (torch.arange(n) + torch.rand(n, generator=generator)) / n
        t = t[torch.randperm(n, generator=generator)]
        noise = torch.randn((n, *data.image_shape), generator=generator)
        captions = batch_captions(data, index, generator, self.caption_sampler)
        correct = torch.zeros(n, dtype=torch.bool)
        for start in range(0, n, batch_size):
            part = slice(start, min(n, start + batch_size))
            text = (self.text_encoder.encode(captions[part]).to(self.device) if self.config.use_text else None)
            x_t = Router.training_example(data.images_at(index[part]), noise[part], t[part]).to(self.device)
            logits = self.ema(x_t, t[part].to(self.device), text)
            correct[part] = logits.argmax(1).cpu() == clusters[index[part]]
        edges = torch.linspace(0, 1, num_bins + 1)
        bins = []
        for low, high in zip(edges[:-1].tolist(), edges[1:].tolist()):
            inside = (t >= low) & (t < high) if high < 1 else (t >= low)
            bins.append((low, high, float(correct[inside].float().mean())))
        return RouterEvaluation(float(correct.float().mean()), tuple(bins))

    def export(self, path: str | Path, *, accuracy: float | None = None, with_training_state: bool = True
               ) -> Path | None:
        """Write the publishable router checkpoint with its held-out accuracy (measured if not given)."""
        metric = self.evaluate().accuracy if accuracy is None else accuracy
        return self._write(Path(path), self._metadata(metric, -1, "accuracy"), with_training_state)

