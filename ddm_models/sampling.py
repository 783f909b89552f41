"""Generation from an ensemble of experts: v(x, t) = sum_k p_k(x, t) v_k(x, t), Euler in FM time.

At every step the router gives p(cluster | x_t, t[, text]); the routing (`Routing`) keeps the top-1, the top-k
(renormalised; top-2 is the default) or all clusters; each selected expert runs only on the samples
that selected it, with classifier-free guidance applied to its own prediction, and its output is
converted to FM velocity by its objective, so DDPM and FM experts of any size mix freely.

At scale: experts may hold bf16 weights (`load_expert(..., dtype=inference_dtype(device))`); the
ODE state stays float32 and is cast at each expert's boundary. With `offload`, experts wait on the
CPU and at most `max_resident` of them sit on the compute device at once (`ExpertPlacement`): an
expert is moved in when the router selects it, the least recently used one moved out first, so an
ensemble larger than the GPU still samples, paying a weight transfer per change of selection.
Prompts are sampled `batch_size` at a time from noise drawn for all of them at once, so the batch
size changes memory and speed, not the images. Experts in a VAE's latent space give latents,
which `codec` decodes to RGB.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
import itertools
from collections import OrderedDict
from typing import Any

import torch

from ddm_models.configs import ExpertConfig
from ddm_models.errors import ModelError
from ddm_models.experts import Expert
from ddm_models.objectives import Objective
from ddm_models.router import Router
from ddm_models.text import TextBatch, TextEncoder


class RoutingError(ModelError, ValueError):
    """A routing name or k that means nothing."""

@dataclass(frozen=True)
class Routing:
    """How many experts run at each step: the router's top `k` (renormalised), or all of them (`k`
    None, "full"). Spelled "top1", "top2", "top<k>" or "full" in manifests, on the command line and
    in results; `parse` is the one place that reads the spelling."""

    k: int | None = 2

    def __post_init__(self) -> None:
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise RoutingError(f"top-k routing needs an integer k >= 1, got {self.k!r}")

    @classmethod
    def parse(cls, name: "str | Routing") -> "Routing":
        if isinstance(name, Routing):
            return name
        if name == "full":
            return cls(None)
        if isinstance(name, str) and re.fullmatch(r"top[1-9][0-9]{0,3}", name):
            return cls(int(name[3:]))
        raise RoutingError(f"unknown routing {str(name)[:40]!r}: use top1, top2, top<k> or full")

    def experts_per_step(self, num_clusters: int) -> int:
        return num_clusters if self.k is None else min(self.k, num_clusters)

    def __str__(self) -> str:
        return "full" if self.k is None else f"top{self.k}"


ROUTINGS = tuple(Routing.parse(name) for name in ("top1", "top2", "top3", "full"))  # the ones studies compare


@dataclasses.dataclass
class LoadedExpert:
    """An expert ready to sample: its cluster id, config, objective and model (eval mode)."""

    cluster: int
    config: ExpertConfig
    objective: Objective
    model: Expert
    metadata: object | None = None  # the CheckpointMetadata it was loaded from, if any

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch, guidance_scale: float = 1.0) -> torch.Tensor:
        """FM velocity (B, C, H, W) at state x (B, C, H, W), FM time t (B,), with classifier-free
        guidance pred = uncond + g (cond - uncond) on the expert's own prediction (g = 1: no guidance)."""
        x_in, timestep = self.objective.model_input(x, t)
        x_in = x_in.to(next(self.model.parameters()).dtype)  # bf16 weights take bf16 inputs
        if guidance_scale == 1.0:
            prediction = self.model(x_in, timestep, text)
        else:
            batch = x.shape[0]
            drop = torch.arange(2 * batch, device=x.device) >= batch
            both = self.model(torch.cat([x_in, x_in]), torch.cat([timestep, timestep]), TextBatch.cat([text, text]),
                              drop_text=drop)
            cond, uncond = both.chunk(2)
            prediction = uncond + guidance_scale * (cond - uncond)
        return self.objective.to_velocity(prediction.to(x.dtype), x, t)


@dataclasses.dataclass
class SampleResult:
    """images: (B, C, H, W) in [-1, 1] (RGB decoded from latents when the sampler has a codec);
    evaluations: cluster -> number of (sample, step) pairs that cluster's expert computed; routing:
    (steps, B, K) mixing weights used at each step; latents: (B, C_z, h, w) the experts' final
    state when they work in latent space, else None; moves: experts moved onto the device."""

    images: torch.Tensor
    evaluations: dict[int, int]
    routing: torch.Tensor
    latents: torch.Tensor | None = None
    moves: int = 0


class ExpertPlacement:
    """Where the experts' weights are while sampling.

    Without `offload`, every expert is moved to `device` once. With it, experts live on the CPU and
    `acquire(cluster)` moves one onto `device`, first parking the least recently acquired one when
    `max_resident` are there already; `moves` counts the transfers onto the device. Weights never
    change while sampling, so parking copies nothing back: the expert's parameters are pointed at
    their host copy again (pinned on CUDA, so the next move in is an asynchronous DMA).
    """

    def __init__(self, experts: dict[int, LoadedExpert], device: torch.device, offload: bool = False,
                 max_resident: int = 2):
        if max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {max_resident}")
        self.experts, self.device, self.offload, self.max_resident = experts, torch.device(device), offload, max_resident
        self.resident: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.moves = 0
        self._host: dict[int, dict[str, torch.Tensor]] = {}
        pin = offload and self.device.type == "cuda"
        for cluster, expert in experts.items():
            if offload:
                expert.model.to("cpu")
                self._host[cluster] = {name: (t.data.pin_memory() if pin else t.data) for name, t in _tensors(expert)}
                self._park(cluster)
            else:
                expert.model.to(self.device)
                self.resident[cluster] = None

    def acquire(self, cluster: int) -> LoadedExpert:
        """The expert of `cluster`, its weights on the device."""
        if cluster in self.resident:
            self.resident.move_to_end(cluster)
        else:
            while len(self.resident) >= self.max_resident:
                evicted, _ = self.resident.popitem(last=False)
                self._park(evicted)
            self.experts[cluster].model.to(self.device, non_blocking=True)
            self.resident[cluster] = None
            self.moves += 1
        return self.experts[cluster]

    def _park(self, cluster: int) -> None:
        host = self._host[cluster]
        for name, tensor in _tensors(self.experts[cluster]):
            tensor.data = host[name]


def _tensors(expert: LoadedExpert):
    return itertools.chain(expert.model.named_parameters(), expert.model.named_buffers())


class EnsembleSampler:
    """Sample from `experts` (one per cluster id) mixed by `router`.

    routing: a `Routing` or its spelling ("top2", "full", ...). A router is needed unless there is one
    expert. Clusters the router knows but the ensemble lacks get weight 0. `text_encoder` turns
    prompts into a `TextBatch` when `sample` is given strings. `device` is where sampling runs
    (default: where the first expert is); `offload` keeps experts on the CPU and at most
    `max_resident` (default k) on the device; `codec` (a `latents.LatentCodec`) decodes latents.
    """

    def __init__(self, experts: list[LoadedExpert], router: Router | None = None, routing: Routing | str = "top2",
                 text_encoder: TextEncoder | None = None, *, device: torch.device | str | None = None,
                 offload: bool = False, max_resident: int | None = None, codec: Any | None = None):
        self.routing = Routing.parse(routing)
        if not experts:
            raise ValueError("an ensemble needs at least one expert")
        clusters = [e.cluster for e in experts]
        if len(set(clusters)) != len(clusters):
            raise ValueError(f"several experts for one cluster: {sorted(clusters)}; pick one per cluster")
        shapes = {e.config.image_shape for e in experts}
        if len(shapes) != 1:
            raise ValueError(f"experts disagree on the image shape: {sorted(shapes)}")
        self.num_clusters = router.config.num_clusters if router is not None else max(clusters) + 1
        if router is None and len(experts) > 1:
            raise ValueError("several experts need a router")
        if max(clusters) >= self.num_clusters:
            raise ValueError(f"expert cluster {max(clusters)} is outside the router's {self.num_clusters} clusters")
        self.experts = {e.cluster: e for e in experts}
        self.router, self.text_encoder = router, text_encoder
        self.k = self.routing.experts_per_step(self.num_clusters)
        self.image_shape = shapes.pop()
        self.codec = codec
        if codec is not None and self.image_shape[0] != codec.latent_channels:
            raise ValueError(f"experts see {self.image_shape}, VAE {codec.model_id!r} makes "
                             f"{codec.latent_channels}-channel latents")
        self.device = torch.device(device) if device is not None else next(experts[0].model.parameters()).device
        if router is not None:
            router.to(self.device)
        self.placement = ExpertPlacement(self.experts, self.device, offload,
                                         min(self.k, len(self.experts)) if max_resident is None else max_resident)

    def routing_weights(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """(B, K) mixing weights at state x, FM time t (B,): router probabilities restricted to the
        present clusters, then to the top-k, renormalised to sum to 1 per sample."""
        present = torch.zeros(self.num_clusters, dtype=torch.bool, device=x.device)
        present[list(self.experts)] = True
        if self.router is None:
            probs = present.to(x.dtype).expand(x.shape[0], -1)
        else:
            use_text = self.router.config.use_text
            x_router = x.to(next(self.router.parameters()).dtype)
            logits = self.router(x_router, t, text if use_text else None).float()
            probs = torch.softmax(logits.masked_fill(~present, float("-inf")), dim=1).to(x.dtype)
        k = min(self.k, int(present.sum()))
        top = probs.topk(k, dim=1)
        weights = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        return weights / weights.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: TextBatch, guidance_scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
        """(v, weights, evaluations) at x (B, C, H, W), t (B,): each expert runs on its rows only."""
        weights = self.routing_weights(x, t, text)
        v = torch.zeros_like(x)
        evaluations = {}
        for cluster in self.experts:
            rows = (weights[:, cluster] > 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            expert = self.placement.acquire(cluster)
            v_k = expert.velocity(x[rows], t[rows], text.select(rows), guidance_scale)
            v[rows] += weights[rows, cluster].view(-1, 1, 1, 1) * v_k
            evaluations[cluster] = rows.numel()
        return v, weights, evaluations

    @torch.no_grad()
    def sample(self, prompts: list[str] | TextBatch, num_steps: int = 20, guidance_scale: float = 2.0,
               seed: int = 0, device: torch.device | str | None = None, batch_size: int | None = None
               ) -> SampleResult:
        """One image per prompt: Euler from t = 1 (noise drawn from `seed`) to t = 0 in `num_steps`
        uniform steps, `batch_size` prompts at a time (default all). The same seed and prompts give
        the same images, whatever the batch size."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is not None and torch.device(device) != self.device:
            raise ValueError(f"this sampler runs on {self.device}; build it with device={device!r} instead")
        text = self._encode(prompts).to(self.device)
        total = len(text)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn((total, *self.image_shape), generator=generator, device=self.device)
        evaluations = {cluster: 0 for cluster in self.experts}
        moves_before = self.placement.moves
        finals, routings = [], []
        for start in range(0, total, batch_size or total):
            rows = torch.arange(start, min(total, start + (batch_size or total)), device=self.device)
            x, routing = self._integrate(noise[rows], text.select(rows), num_steps, guidance_scale, evaluations)
            finals.append(x)
            routings.append(routing)
        x = torch.cat(finals)
        latents = x if self.codec is not None else None
        images = self.codec.decode(x) if self.codec is not None else x.clamp(-1, 1)
        return SampleResult(images, evaluations, torch.cat(routings, dim=1), latents,
                            self.placement.moves - moves_before)

    def _integrate(self, x: torch.Tensor, text: TextBatch, num_steps: int, guidance_scale: float,
                   evaluations: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Euler from noise x (B, C, H, W) at t = 1 to t = 0; returns (x_0, routing (steps, B, K))."""
        batch = x.shape[0]
        times = torch.linspace(1.0, 0.0, num_steps + 1, device=x.device)
        routing = []
        for i in range(num_steps):
            t = times[i].expand(batch)
            v, weights, counts = self.velocity(x, t, text, guidance_scale)
            x = x + (times[i + 1] - times[i]) * v
            routing.append(weights)
            for cluster, count in counts.items():
                evaluations[cluster] += count
        return x, torch.stack(routing)

    def _encode(self, prompts: list[str] | TextBatch) -> TextBatch:
        if isinstance(prompts, TextBatch):
            return prompts
        if self.text_encoder is None:
            raise ValueError("give the sampler a text_encoder to sample from prompt strings, or pass a TextBatch")
        if not prompts:
            raise ValueError("no prompts to sample")
        return self.text_encoder.encode(list(prompts))
