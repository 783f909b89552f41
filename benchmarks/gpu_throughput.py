"""GPU throughput: training images/s and model FLOP utilisation (MFU) of latent DiT experts, through
`ExpertTrainer` and through a bare PyTorch loop on the same model; ensemble sampling images/s.

    python benchmarks/gpu_throughput.py [--sizes DiT-B/2 DiT-XL/2] [--steps 20] [--repeats 3] [--compile]
    python benchmarks/gpu_throughput.py --device cpu --size tiny --steps 3 --repeats 1   # CPU smoke

Needs a CUDA GPU: `--device auto` (the default) takes one when present; without one (and without
`--device cpu`) it says that it skipped, prints a JSON line with "skipped": true and the reason,
and exits 0. `--compile` runs both loops' forward through torch.compile (inductor).

Training, per expert size (`ddm_models.configs.EXPERT_SIZES`, 32x32x4 latents, flow matching, bf16
autocast on CUDA), interleaved repeat by repeat:
  trainer  `ExpertTrainer.train_steps` as a node runs it: its per-step batch draw, noise from the
           seeded CPU generator (bit-exact resume), AdamW, grad clipping, EMA, loss read back;
  bare     the same model, optimiser, loss, clipping and EMA in a plain loop whose data, noise and
           text live on the GPU, with no per-step synchronisation.
Text conditioning: both read precomputed caption embeddings held on the device (a
`CachedTextEncoder` table over fixed random embeddings of the config's text width, `--text-tokens`
tokens), as a real run precomputes its text encoder's outputs; the text encoder itself is not timed.

MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s. Model FLOPs are counted
analytically from the config (2 FLOPs per multiply-add, matmuls and convolutions only; a training
step is 3x the forward: backward = 2x forward), checked against torch's FlopCounterMode on the
real module. Peaks: H100 SXM and H200 989.4, H100 NVL 835, H100 PCIe 756, A100 312 TFLOP/s (dense,
no sparsity); `--peak-tflops` for any other GPU.

Sampling: 4 experts of `--sample-size` and a latent router, `EnsembleSampler` with top-2 routing
vs. one expert, CFG 2, `--sample-steps` Euler steps, weights in bf16 on CUDA as `generate` loads
them; on CUDA also top-2 with the experts offloaded to the CPU (moved in when selected).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from ddm_models.captions import all_captions  # noqa: E402
from ddm_models.configs import ExpertConfig, expert_config, router_config  # noqa: E402
from ddm_models.data import ImageDataset  # noqa: E402
from ddm_models.devices import autocast, enable_fast_matmul, inference_dtype, resolve_device  # noqa: E402
from ddm_models.experts import build_expert, count_parameters  # noqa: E402
from ddm_models.objectives import build_objective  # noqa: E402
from ddm_models.router import build_router  # noqa: E402
from ddm_models.sampling import EnsembleSampler, LoadedExpert  # noqa: E402
from ddm_models.text import CachedTextEncoder, TextBatch, TextEncoder  # noqa: E402
from ddm_models.training import ExpertTrainer  # noqa: E402

DEFAULT_BATCH = {"DiT-S/2": 256, "DiT-B/2": 256, "DiT-L/2": 128, "DiT-XL/2": 64, "tiny": 16}
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


# ---- FLOPs ---------------------------------------------------------------------------------------------------------
def expert_forward_flops(config: ExpertConfig, text_tokens: int) -> int:
    """FLOPs of one image's forward pass (2 per multiply-add; matmuls, attention and convolutions).

    Derivation, per image, T = (sample_size / patch)^2 image tokens of width D, L text tokens,
    MLP width r D, N blocks:
      * a linear map n_in -> n_out on M tokens is M n_in n_out multiply-adds = 2 M n_in n_out FLOPs;
        a block's image-token linears hold 4 D^2 (self-attention q, k, v, out) + 2 D^2 (cross q,
        out) + 2 r D^2 (MLP) weights, so the trunk costs ~ 2 * params * T: the "2 x parameters x
        tokens" rule, which is most of the total at DiT sizes;
      * cross-attention k, v act on the L text tokens instead: 2 * 2 L D^2 per block;
      * attention itself: Q K^T and A V are T T D multiply-adds each (2 * 2 T^2 D FLOPs; for
        DiT-XL/2, T = 256, about 10 % of a block), cross-attention 2 * 2 T L D;
      * embeddings, AdaLN-Single and the output projection add a little (counted below).
    A training step is forward + backward, and the backward pass costs twice the forward (grads
    with respect to activations and to weights): 3x forward. Then
      MFU = images/s x 3 x forward FLOPs per image / peak dense bf16 FLOP/s of the GPU.
    `counted_flops` checks this against torch's FlopCounterMode on the real module."""
    d, p, size = config.width, config.patch_size, config.sample_size
    tokens, ctx, inner = (size // p) ** 2, text_tokens, int(d * config.mlp_ratio)
    patch_in = config.stem_channels or config.in_channels
    out_channels = config.head_channels or config.in_channels
    macs = 0
    if config.stem_channels:
        macs += size * size * 9 * config.in_channels * config.stem_channels
    if config.head_channels:
        macs += size * size * 9 * config.head_channels * config.in_channels
    macs += tokens * p * p * patch_in * d  # patch embedding
    macs += 256 * d + d * d + 6 * d * d  # timestep MLP, AdaLN-Single's shared modulation
    if config.pooled_text:
        macs += config.text_pooled_dim * d + d * d
    macs += ctx * (config.text_dim * d + d * d)  # caption projection
    per_block = (4 * tokens * d * d + 2 * tokens * tokens * d  # self-attention: q, k, v, out; scores, mix
                 + 2 * tokens * d * d + 2 * ctx * d * d + 2 * tokens * ctx * d  # cross-attention
                 + 2 * tokens * d * inner)  # MLP
    macs += config.depth * per_block
    macs += tokens * d * p * p * out_channels  # final projection
    return 2 * macs


def counted_flops(config: ExpertConfig, text_tokens: int, batch: int = 2) -> dict:
    """torch's FlopCounterMode over a real forward and backward of the module (on the meta device,
    so even DiT-XL/2 costs no compute), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_expert(config)
    x = torch.zeros((batch, *config.image_shape), device="meta")
    text = TextBatch(torch.zeros(batch, text_tokens, config.text_dim, device="meta"),
                     torch.ones(batch, text_tokens, dtype=torch.bool, device="meta"),
                     torch.zeros(batch, config.text_pooled_dim, device="meta"))
    with FlopCounterMode(display=False) as forward:
        out = model(x, torch.zeros(batch, device="meta"), text)
    with FlopCounterMode(display=False) as backward:
        out.float().pow(2).mean().backward()
    return {"forward": forward.get_total_flops() // batch, "backward": backward.get_total_flops() // batch,
            "parameters": count_parameters(model)}


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given by --peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for marker, value in PEAK_BF16_TFLOPS:
        if marker in name:
            return value, f"{name}: dense bf16 {value} TFLOP/s"
    return None, f"{name}: unknown peak (pass --peak-tflops)"


# ---- text and data ------------------------------------------------------------------------------------------------
class FixedTextEncoder(TextEncoder):
    """Deterministic random token states for any prompt, in the config's widths, on `device`: the
    stand-in for a precomputed text-encoder table (the encoder is not what this benchmark times)."""

    def __init__(self, dim: int, pooled_dim: int, max_length: int, device: torch.device):
        self.name, self.dim, self.pooled_dim, self.max_length, self.device = "fixed", dim, pooled_dim, max_length, device

    def encode(self, prompts: list[str]) -> TextBatch:
        batches = []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            states = torch.randn(1, self.max_length, self.dim, generator=generator)
            batches.append(TextBatch(states, torch.ones(1, self.max_length, dtype=torch.bool),
                                     torch.randn(1, self.pooled_dim, generator=generator)))
        return TextBatch.cat(batches).to(self.device)


def caption_table(config: ExpertConfig, text_tokens: int, device: torch.device) -> CachedTextEncoder:
    encoder = CachedTextEncoder(FixedTextEncoder(config.text_dim, config.text_pooled_dim, text_tokens, device))
    encoder.precompute(all_captions())
    return encoder


def latent_dataset(config: ExpertConfig, n: int = 4096) -> ImageDataset:
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand((n, *config.image_shape), generator=generator) * 2 - 1).float()
    labels = torch.randint(10, (n,), generator=generator)
    return ImageDataset(images, labels, "random-latents", [str(d) for d in range(10)])


# ---- the two training loops -----------------------------------------------------------------------------------------
def bare_loop(config: ExpertConfig, dataset: ImageDataset, text: CachedTextEncoder, batch: int,
              device: torch.device, compile_model: bool = False):
    """`run(n)`: n steps of a plain loop over the same model, AdamW, loss, clipping and EMA, with
    data, noise and text on the device and nothing read back."""
    torch.manual_seed(0)
    model = build_expert(config).to(device).train()
    ema = build_expert(config).to(device).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    objective = build_objective(config.objective)
    forward = torch.compile(model) if compile_model else model
    images = dataset.images.to(device)
    table = text._table
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def step() -> None:
        index = torch.randint(len(images), (batch,), device=device)
        rows = torch.randint(len(table), (batch,), device=device)
        caption = TextBatch(table.states[rows], table.mask[rows], table.pooled[rows])
        x0 = images[index]
        noise = torch.randn_like(x0)
        u = torch.rand(batch, device=device)
        drop = torch.rand(batch, device=device) < config.caption_dropout
        x_in, timestep, target = objective.training_example(x0, noise, u)
        with autocast(device):
            loss = F.mse_loss(forward(x_in, timestep, caption, drop_text=drop).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - 0.999)

    def run(n: int) -> None:
        for _ in range(n):
            step()

    return run


def trainer_loop(config: ExpertConfig, dataset: ImageDataset, text: CachedTextEncoder, batch: int,
                 device: torch.device, compile_model: bool = False):
    """`run(n)`: `ExpertTrainer.train_steps(n)`, exactly as a node calls it."""
    trainer = ExpertTrainer(config, dataset, text, batch_size=batch, lr=1e-4, warmup_steps=0, device=device,
                            compile_model=compile_model)
    return trainer.train_steps


def timed(run, steps: int, device: torch.device) -> float:
    """Seconds for `run(steps)`, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run(steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_training(size: str, batch: int, args, device: torch.device, peak: float | None, progress) -> dict:
    config = expert_config(size, objective="fm")
    dataset, text = latent_dataset(config), caption_table(config, args.text_tokens, device)
    flops_per_image = 3 * expert_forward_flops(config, args.text_tokens)
    loops = {"trainer": trainer_loop(config, dataset, text, batch, device, args.compile),
             "bare": bare_loop(config, dataset, text, batch, device, args.compile)}
    for run in loops.values():
        timed(run, args.warmup, device)  # kernels chosen, allocator warm
    seconds = {name: [] for name in loops}
    task = progress.add_task(f"training {size} batch {batch}", total=args.repeats * len(loops))
    for repeat in range(args.repeats):
        for name in (("trainer", "bare") if repeat % 2 == 0 else ("bare", "trainer")):
            seconds[name].append(timed(loops[name], args.steps, device))
            progress.advance(task)
    result = {"size": size, "batch": batch, "train_flops_per_image": flops_per_image, "compiled": args.compile}
    for name, values in seconds.items():
        images_per_s = args.steps * batch / statistics.median(values)
        achieved = images_per_s * flops_per_image / 1e12
        result[name] = {"images_per_s": round(images_per_s, 2), "tflops": round(achieved, 3),
                        "mfu": round(achieved / peak, 4) if peak else None}
    result["trainer_vs_bare"] = round(result["trainer"]["images_per_s"] / result["bare"]["images_per_s"], 4)
    del loops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def with_batch_fallback(size: str, args, device, peak, progress, console) -> dict:
    """Halve the batch on CUDA out-of-memory (activations of DiT-XL/2 outgrow a GPU fast)."""
    batch = args.batch or DEFAULT_BATCH.get(size, 64)
    while True:
        try:
            return measure_training(size, batch, args, device, peak, progress)
        except torch.cuda.OutOfMemoryError:
            if batch <= 4:
                raise
        # out of the except block: the failed attempt's frames (and its GPU tensors) are released
        console.print(f"[yellow]{size}: out of memory at batch {batch}, trying {batch // 2}[/]")
        batch //= 2
        gc.collect()
        torch.cuda.empty_cache()


# ---- sampling -----------------------------------------------------------------------------------------------------
def measure_sampling(size: str, args, device: torch.device, progress) -> dict:
    config = expert_config(size, objective="fm")
    dtype = inference_dtype(device)

    def ensemble() -> list[LoadedExpert]:
        experts = []
        for cluster in range(4):
            torch.manual_seed(cluster)
            experts.append(LoadedExpert(cluster, config, build_objective("fm"),
                                        build_expert(config).to(device, dtype).eval().requires_grad_(False)))
        return experts

    experts = ensemble()
    latent = config.in_channels == 4 and config.sample_size == 32
    router = build_router(router_config("latent") if latent else router_config(
        "small", in_channels=config.in_channels, sample_size=config.sample_size,
        text_pooled_dim=config.text_pooled_dim)).to(device, dtype).eval()
    table = caption_table(config, args.text_tokens, device)
    prompts = table.encode([all_captions()[i % len(all_captions())] for i in range(args.sample_batch)])
    samplers = {"single": EnsembleSampler(experts[:1], None, "top1"),
                "top2": EnsembleSampler(experts, router, "top2")}
    if device.type == "cuda":  # on a CPU offloading moves nothing
        samplers["top2_offload"] = EnsembleSampler(ensemble(), router, "top2", device=device, offload=True)
    seconds = {name: [] for name in samplers}
    task = progress.add_task(f"sampling {size}", total=args.repeats * len(samplers))
    # weights already in the inference dtype, as `generate` loads them: no autocast
    samplers["top2"].sample(prompts, num_steps=2)  # warm-up
    for repeat in range(args.repeats):
        for name, sampler in samplers.items():
            seconds[name].append(timed(lambda _: sampler.sample(prompts, num_steps=args.sample_steps,
                                                                guidance_scale=2.0, seed=repeat), 1, device))
            progress.advance(task)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"size": size, "batch": args.sample_batch, "steps": args.sample_steps,
            "images_per_s": {name: round(args.sample_batch / s, 2) for name, s in median.items()},
            "top2_time_vs_single": round(median["top2"] / median["single"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["DiT-B/2", "DiT-XL/2"])
    parser.add_argument("--size", help="one size (same as --sizes SIZE)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda[:N] or cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both training loops' forward")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: per size, halved on OOM)")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per repeat and loop")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-tokens", type=int, default=77)
    parser.add_argument("--sample-size", default=None, help="expert size for sampling (default: the first size)")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    sizes = [args.size] if args.size else args.sizes
    console = Console(stderr=True)
    if args.device != "cpu" and not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        console.print(f"[bold yellow]gpu_throughput skipped:[/] {reason}; `--device cpu --size tiny` runs a CPU smoke")
        print(json.dumps({"benchmark": "gpu_throughput", "skipped": reason}))
        return
    device = resolve_device(args.device)
    if device.type == "cuda":
        enable_fast_matmul()
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    flop_checks = {}
    for size in sizes:
        config = expert_config(size)
        analytic, counted = expert_forward_flops(config, args.text_tokens), counted_flops(config, args.text_tokens)
        flop_checks[size] = {"parameters": counted["parameters"], "analytic_forward_gflops": round(analytic / 1e9, 3),
                             "counted_forward_gflops": round(counted["forward"] / 1e9, 3),
                             "counted_backward_over_forward": round(counted["backward"] / counted["forward"], 3),
                             "analytic_over_counted": round(analytic / counted["forward"], 4)}
    with Progress(console=console) as progress:
        training = [with_batch_fallback(size, args, device, peak, progress, console) for size in sizes]
        sampling = measure_sampling(args.sample_size or sizes[0], args, device, progress)
    for row in training:
        row["parameters"] = flop_checks[row["size"]]["parameters"]

    table = Table(title=f"training on {device} ({peak_source})")
    for column in ("expert", "params", "batch", "GFLOP/img (fwd)", "trainer img/s", "bare img/s", "trainer MFU",
                   "bare MFU", "trainer/bare"):
        table.add_column(column, justify="right")
    for row in training:
        mfu = [f"{row[k]['mfu']:.1%}" if row[k]["mfu"] is not None else "-" for k in ("trainer", "bare")]
        table.add_row(row["size"], f"{row['parameters'] / 1e6:.0f}M", str(row["batch"]),
                      f"{row['train_flops_per_image'] / 3e9:.1f}", f"{row['trainer']['images_per_s']:.1f}",
                      f"{row['bare']['images_per_s']:.1f}", *mfu, f"{row['trainer_vs_bare']:.3f}")
    out = Console()
    out.print(table)
    out.print(f"FLOP count check (analytic / FlopCounterMode, forward): "
              + ", ".join(f"{s} {c['analytic_over_counted']}" for s, c in flop_checks.items()))
    out.print(f"sampling {sampling['size']}, batch {sampling['batch']}, {sampling['steps']} steps, CFG: "
              f"single {sampling['images_per_s']['single']} img/s, top-2 {sampling['images_per_s']['top2']} img/s "
              f"({sampling['top2_time_vs_single']}x the time)")
    print(json.dumps({"benchmark": "gpu_throughput", "skipped": False, "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "peak_tflops": peak, "peak_source": peak_source, "dtype": "bf16" if device.type == "cuda"
                      else "fp32", "text_tokens": args.text_tokens, "training": training,
                      "flop_check": flop_checks, "sampling": sampling, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
