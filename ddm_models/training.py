"""Plain PyTorch trainers for experts and routers (AdamW, EMA, bf16 autocast on CUDA, DDP).

On CUDA (`device="auto"` picks it when present) the forward and backward run under bf16 autocast
with float32 weights and optimizer, matmuls may use TF32, AdamW is the fused single-kernel one, and
attention is diffusers' `AttnProcessor2_0`, i.e. `F.scaled_dot_product_attention` (flash or
memory-efficient kernels). `compile_model` runs the forward through `torch.compile`: off by default,
since compiling costs minutes and pays only on long GPU runs.

The loop reads top to bottom: draw a batch, noise it, predict, step AdamW, update the EMA. All
randomness of step n comes from a generator seeded by (seed, n, rank), so a run that saves its
state, stops, and resumes in a new object or process replays exactly the steps an uninterrupted run
takes: same batches, same noise, same losses, same weights.

State is saved and shared in the checkpoint format of `checkpoint.py` (EMA + training weights +
AdamW moments), so local resume (`save_state`/`load_state`) and continuing another node's work
(`init_from_checkpoint`) are the same operation.

Multi-GPU: launched under torchrun (env WORLD_SIZE > 1), the model is wrapped in
DistributedDataParallel, each rank draws its own batches, and only rank 0 writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm_models.captions import sample_captions
from ddm_models.checkpoint import (CheckpointMetadata, InvalidCheckpoint, check_state_matches, check_training_state,
                                   checkpoint_tensors, optimizer_moments, read_checkpoint, state_dict_part,
                                   write_checkpoint)
from ddm_models.conditioning import CaptionSampler, TrainingData, batch_captions, caption_encoder
from ddm_models.configs import ExpertConfig
from ddm_models.devices import autocast, enable_fast_matmul, resolve_device
from ddm_models.experts import build_expert
from ddm_models.objectives import objective_for
from ddm_models.text import TextEncoder

STATE_FILE = "state.safetensors"
TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclasses.dataclass(frozen=True)
class TrainStats:
    """After a call to `train_steps`/`train_for`: the step reached, the mean loss of the steps just
    taken, their losses, and the throughput (images/s, wall clock)."""

    step: int
    loss: float
    losses: tuple[float, ...]
    images_per_s: float
    seconds: float


def _sample_times(u: torch.Tensor, density: str) -> torch.Tensor:
    """Map uniform u in [0, 1) to training times: unchanged, or logit-normal (SD3: sigmoid(N(0, 1)),
    more mid-range times, where flow matching's targets are hardest)."""
    if density == "logit_normal":
        return torch.sigmoid(torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6)))
    return u


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when torchrun launched us (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


class _Trainer:
    """What expert and router training share: optimizer, EMA, per-step randomness, state files."""

    kind: str

    def __init__(self, model: nn.Module, config, *, seed: int, batch_size: int, lr: float, ema_decay: float,
                 weight_decay: float, warmup_steps: int, grad_clip: float, device: torch.device | str,
                 compile_model: bool | str = False):
        self.config, self.seed, self.batch_size = config, seed, batch_size
        self.lr, self.ema_decay, self.warmup_steps, self.grad_clip = lr, ema_decay, warmup_steps, grad_clip
        self.rank, self.world_size = _distributed()
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            enable_fast_matmul()
        if self.world_size > 1 and self.device.type == "cuda" and ":" not in str(device):
            # torchrun starts one process per GPU: unless told a GPU index, each takes its LOCAL_RANK's.
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        # fused: one kernel for the whole update on CUDA instead of a dozen per parameter tensor
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=weight_decay,
                                           fused=self.device.type == "cuda")
        self.trained = self.model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.trained = DistributedDataParallel(self.model, device_ids=device_ids)
        if compile_model:
            # Only the training forward is compiled; states are read from the plain `self.model`, so
            # checkpoints keep their parameter names. True means the default (inductor) backend.
            backend = compile_model if isinstance(compile_model, str) else "inductor"
            self.trained = torch.compile(self.trained, backend=backend)
        self.step = 0
        self.samples_seen = 0

    # --- the loop -------------------------------------------------------------------------------
    def _loss(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _generator(self, *salt: int) -> torch.Generator:
        words = np.random.SeedSequence([self.seed, *salt]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))

    def train_step(self) -> float:
        """One optimisation step; returns its loss."""
        self.trained.train()
        generator = self._generator(self.step, self.rank)
        with autocast(self.device):
            loss = self._loss(generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (self.step + 1) / max(1, self.warmup_steps))
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        self.samples_seen += self.batch_size * self.world_size
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up of the decay (as in many DiT trainers): early on the EMA follows the weights closely.
        decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
        # one fused multi-tensor kernel instead of one launch per tensor (hundreds for DiT-XL/2)
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.model.parameters()], 1.0 - decay)

    def train_steps(self, n: int) -> TrainStats:
        """Run `n` steps."""
        start, losses = time.perf_counter(), []
        for _ in range(n):
            losses.append(self.train_step())
        return self._stats(losses, time.perf_counter() - start)

    def train_for(self, seconds: float, max_steps: int | None = None) -> TrainStats:
        """Run steps until `seconds` of wall time have passed (or `max_steps` steps)."""
        start, losses = time.perf_counter(), []
        while time.perf_counter() - start < seconds and (max_steps is None or len(losses) < max_steps):
            losses.append(self.train_step())
        return self._stats(losses, time.perf_counter() - start)

    def _stats(self, losses: list[float], seconds: float) -> TrainStats:
        images = len(losses) * self.batch_size * self.world_size
        return TrainStats(self.step, float(np.mean(losses)) if losses else float("nan"), tuple(losses),
                          images / seconds if seconds > 0 else 0.0, seconds)

    # --- state ----------------------------------------------------------------------------------
    def frozen_copy(self) -> "_Trainer":
        """This trainer as it is now, for writing and evaluating this step's checkpoint on another
        thread while training goes on: its own copies of the weights, EMA and AdamW moments (on the
        same device; about 4x the parameters' bytes) and counters; data and text encoder shared.
        It is never trained: `save_state`, `export`, `heldout_loss`/`evaluate` are what it is for."""
        twin = copy.copy(self)
        # one deepcopy of the three keeps the optimizer's state keyed by the copied parameters
        twin.model, twin.ema, twin.optimizer = copy.deepcopy((self.model, self.ema, self.optimizer))
        twin.trained = twin.model
        return twin

    def _metadata(self, heldout_metric: float | None, cluster: int, metric_name: str) -> CheckpointMetadata:
        adam_step = [s["step"] for s in self.optimizer.state.values() if "step" in s]
        return CheckpointMetadata(kind=self.kind, config=self.config, cluster=cluster, step=self.step,
                                  samples_seen=self.samples_seen, heldout_metric=heldout_metric,
                                  heldout_metric_name=metric_name,
                                  optimizer_step=int(adam_step[0]) if adam_step else None,
                                  extra={"seed": self.seed, "batch_size": self.batch_size, "lr": self.lr})

    def _write(self, path: Path, metadata: CheckpointMetadata, with_training_state: bool) -> Path | None:
        if self.rank != 0:
            return None
        names = {param: name for name, param in self.model.named_parameters()}
        moments = {names[p]: {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
                   for p, s in self.optimizer.state.items() if "exp_avg" in s} if with_training_state else None
        tensors = checkpoint_tensors(self.ema.state_dict(), self.model.state_dict() if with_training_state else None,
                                     moments)
        return write_checkpoint(path, metadata, tensors)

    def save_state(self, directory: str | Path) -> Path | None:
        """Everything needed to resume bit-for-bit, as `directory/state.safetensors` (atomic)."""
        return self._write(Path(directory) / STATE_FILE, self._metadata(None, self._cluster(), "loss"), True)

    def load_state(self, directory: str | Path) -> None:
        """Resume from `save_state(directory)`: weights, EMA, AdamW moments and step, counters."""
        metadata = self.init_from_checkpoint(Path(directory) / STATE_FILE)
        if metadata.extra.get("seed") != self.seed:
            raise InvalidCheckpoint(f"{directory} was saved by a run with seed {metadata.extra.get('seed')}, this "
                                    f"trainer has seed {self.seed}; a resumed run must use the same seed")

    def init_from_checkpoint(self, path: str | Path | bytes) -> CheckpointMetadata:
        """Continue from a checkpoint (local or another node's): training weights (else its EMA
        weights), EMA, AdamW moments if present, step and samples seen. Its config must hash to
        this trainer's."""
        metadata, tensors = read_checkpoint(path)
        where = "checkpoint" if isinstance(path, bytes) else str(path)
        if metadata.contents != "training":
            raise InvalidCheckpoint(f"{where} is an inference export (EMA weights in 16 bits): training continues "
                                    "from a record's state blob")
        if metadata.kind != self.kind or metadata.config_hash != self.config.config_hash():
            raise InvalidCheckpoint(f"{where} is a {metadata.kind} with config {metadata.config_hash[:12]}, this "
                                    f"trainer needs a {self.kind} with config {self.config.config_hash()[:12]}")
        ema = state_dict_part(tensors, "ema")
        train = state_dict_part(tensors, "train") or ema
        check_state_matches(self.model, ema, where)
        check_training_state(self.model, tensors, where)
        self.model.load_state_dict(train)
        self.ema.load_state_dict(ema)
        self._load_moments(optimizer_moments(tensors), metadata.optimizer_step)
        self.step, self.samples_seen = metadata.step, metadata.samples_seen
        return metadata

    def _load_moments(self, moments: dict[str, dict[str, torch.Tensor]], adam_step: int | None) -> None:
        self.optimizer.state.clear()
        if not moments:
            return
        fused = bool(self.optimizer.defaults.get("fused"))  # fused AdamW keeps its step on the device
        for name, param in self.model.named_parameters():
            if name in moments:
                self.optimizer.state[param] = {
                    "step": torch.tensor(float(adam_step or 0), device=param.device if fused else None),
                    "exp_avg": moments[name]["exp_avg"].to(param.device, param.dtype).clone(),
                    "exp_avg_sq": moments[name]["exp_avg_sq"].to(param.device, param.dtype).clone()}

    def _cluster(self) -> int:
        return -1

    @torch.no_grad()
    def share_state_from_rank0(self) -> None:
        """Every rank takes rank 0's weights, EMA, AdamW moments and counters (a collective: all
        ranks call it). After rank 0 alone resumed from a file, the replicas agree again, and DDP
        keeps them agreeing from there."""
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        names = {param: name for name, param in self.model.named_parameters()}
        header = [None]
        if self.rank == 0:
            moments = [names[p] for p, s in self.optimizer.state.items() if "exp_avg" in s]
            adam_step = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
            header = [(self.step, self.samples_seen, sorted(moments), adam_step[0] if adam_step else None)]
        dist.broadcast_object_list(header, src=0)
        step, samples_seen, moment_names, adam_step = header[0]
        parameters = dict(self.model.named_parameters())
        if self.rank != 0:
            self.step, self.samples_seen = step, samples_seen
            self._load_moments({name: {"exp_avg": torch.zeros_like(parameters[name]),
                                       "exp_avg_sq": torch.zeros_like(parameters[name])} for name in moment_names},
                               adam_step)
        tensors = [*self.model.state_dict().values(), *self.ema.state_dict().values()]
        for name in moment_names:
            state = self.optimizer.state[parameters[name]]
            tensors += [state["exp_avg"], state["exp_avg_sq"]]
        for tensor in tensors:  # in place: state_dict() tensors share the parameters' storage
            dist.broadcast(tensor, src=0)


class ExpertTrainer(_Trainer):
    """Trains one expert on one cluster's images, each conditioned on its caption.

    dataset: a `CaptionedDataset` (every image its own caption) or an `ImageDataset` (labels (N,),
    which `caption_sampler(labels, generator) -> list[str]` turns into captions: digits by
    default), images matching `config.image_shape`; a fraction `config.caption_dropout` of the
    samples trains the null prompt instead (classifier-free guidance). `heldout` is the cluster's
    held-out images (either kind) for `heldout_loss`; `time_sampling` is the density of FM training
    times (DDPM experts always draw their discrete step uniformly). A captioned data set's distinct
    captions are encoded once up front when a `CachedTextEncoder` can hold them all.
    """

    kind = "expert"

    def __init__(self, config: ExpertConfig, dataset: TrainingData, text_encoder: TextEncoder, *, seed: int = 0,
                 batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.999, weight_decay: float = 0.0,
                 warmup_steps: int = 50, grad_clip: float = 1.0, device: torch.device | str = "cpu",
                 cluster: int = 0, heldout: TrainingData | None = None, time_sampling: str = "uniform",
                 caption_sampler: CaptionSampler = sample_captions, compile_model: bool | str = False):
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
        if tuple(dataset.image_shape) != config.image_shape:
            raise ValueError(f"data set images are {dataset.image_shape}, the expert expects {config.image_shape}")
        if len(dataset) == 0:
            raise ValueError("cannot train an expert on an empty data set")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_expert(config)
        super().__init__(model, config, seed=seed, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, grad_clip=grad_clip, device=device,
                         compile_model=compile_model)
        self.dataset, self.heldout, self.cluster = dataset, heldout, cluster
        self.text_encoder, self.caption_sampler = caption_encoder(text_encoder, dataset, heldout), caption_sampler
        self.objective = objective_for(config)
        self.time_sampling = time_sampling

    def _cluster(self) -> int:
        return self.cluster

    def _loss(self, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(self.dataset), (self.batch_size,), generator=generator)
        x0 = self.dataset.images_at(index)
        text = self.text_encoder.encode(batch_captions(self.dataset, index, generator, self.caption_sampler))
        noise = torch.randn(x0.shape, generator=generator)
        u = torch.rand(self.batch_size, generator=generator)
        if self.objective.name == "fm":  # DDPM keeps its defining uniform draw of the discrete step
            u = _sample_times(u, self.time_sampling)
        drop = torch.rand(self.batch_size, generator=generator) < self.config.caption_dropout
        x_in, timestep, target = self.objective.training_example(x0, noise, u)
        prediction = self.trained(x_in.to(self.device), timestep.to(self.device), text.to(self.device),
                                  drop_text=drop.to(self.device))
        return self.objective.loss(prediction, target.to(self.device))

    @torch.no_grad()
    def heldout_loss(self, max_images: int = 512, batch_size: int = 256) -> float:
        """The EMA model's loss on the held-out images (the training set if none), with noise and
        times fixed by the trainer's seed and stratified over [0, 1): comparable across steps."""
        data = self.heldout if self.heldout is not None and len(self.heldout) else self.dataset
        n = min(max_images, len(data))
        generator = self._generator(2**31 - 1)
        noise = torch.randn((n, *data.image_shape), generator=generator)
        u = (torch.arange(n) + torch.rand(n, generator=generator)) / n
        captions = batch_captions(data, torch.arange(n), generator, self.caption_sampler)
        total = 0.0
        for start in range(0, n, batch_size):
            part = slice(start, min(n, start + batch_size))
            x_in, timestep, target = self.objective.training_example(data.images_at(part), noise[part], u[part])
            prediction = self.ema(x_in.to(self.device), timestep.to(self.device),
                                 self.text_encoder.encode(captions[part]).to(self.device))
            total += float(F.mse_loss(prediction.float(), target.to(self.device).float(), reduction="sum"))
        return total / noise.numel()

    def export(self, path: str | Path, *, heldout_loss: float | None = None, with_training_state: bool = True
               ) -> Path | None:
        """Write the publishable checkpoint (EMA weights, and unless told otherwise the training
        weights and AdamW moments) with the held-out loss (measured now if not given)."""
        metric = self.heldout_loss() if heldout_loss is None else heldout_loss
        return self._write(Path(path), self._metadata(metric, self.cluster, "loss"), with_training_state)
