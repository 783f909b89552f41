"""DDPM -> flow-matching conversion: FM training from a converted DDPM expert vs. from scratch.

    python benchmarks/conversion.py [--pretrain-steps 400] [--steps 300] [--eval-every 25]

In one run, on the embedded digits (4,500 training images, 500 held out), with the tiny expert:
  1. a DDPM (epsilon) expert trains for --pretrain-steps steps (its cost is printed separately);
  2. it is converted (trunk kept; output layer, final modulation and text projection re-initialised;
     the FM expert sees timestep 999 t);
  3. two FM runs with identical seeds, batches and noise train for --steps steps, one from the
     converted weights, one from a fresh initialisation; every --eval-every steps the held-out FM
     loss of each (EMA weights, fixed noise and times) is measured.
Prints both loss curves, then one JSON line: the losses, the step (interpolated) at which the
converted run reaches the scratch run's final loss, the speed-up in steps at every loss level the
scratch run passed through, and their median.
Heterogeneous DDM reports about 1.2x faster convergence from a converted ImageNet DDPM checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ddm_models.captions import all_captions  # noqa: E402
from ddm_models.configs import expert_config  # noqa: E402
from ddm_models.conversion import convert_ddpm_checkpoint  # noqa: E402
from ddm_models.data import heldout_split, load_embedded_digits, subset  # noqa: E402
from ddm_models.text import build_text_encoder  # noqa: E402
from ddm_models.training import ExpertTrainer  # noqa: E402


def curve(trainer: ExpertTrainer, steps: int, every: int, heldout_images: int) -> list[tuple[int, float]]:
    points = [(0, trainer.heldout_loss(max_images=heldout_images))]
    while trainer.step < steps:
        trainer.train_steps(min(every, steps - trainer.step))
        points.append((trainer.step, trainer.heldout_loss(max_images=heldout_images)))
    return points


def steps_to_reach(points: list[tuple[int, float]], level: float) -> float | None:
    """The first step at which a loss curve reaches `level`, linearly interpolated between its
    measurements (None if it never does)."""
    for (s0, l0), (s1, l1) in zip(points, points[1:]):
        if l1 <= level:
            return float(s1) if l0 == l1 else s0 + (s1 - s0) * (l0 - level) / (l0 - l1)
    return None


def speedups(converted: list[tuple[int, float]], scratch: list[tuple[int, float]]) -> list[tuple[int, float, float]]:
    """For every measurement (step s, loss L) of the scratch run after step 0: (s, L, s / c) where c
    is the step at which the converted run reached L."""
    rows = []
    for step, loss in scratch[1:]:
        reached = steps_to_reach(converted, loss)
        if reached:
            rows.append((step, loss, step / reached))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--heldout-images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_embedded_digits()
    train_idx, heldout_idx = heldout_split(len(data), 0.1, 0)
    train, heldout = subset(data, train_idx), subset(data, heldout_idx)
    text = build_text_encoder("minilm")
    text.precompute(all_captions())
    settings = dict(batch_size=args.batch_size, lr=1e-3, ema_decay=0.995, warmup_steps=50, heldout=heldout)

    start = time.perf_counter()
    ddpm = ExpertTrainer(expert_config("tiny", objective="ddpm"), train, text, seed=1, **settings)
    ddpm.train_steps(args.pretrain_steps)
    pretrain_s = time.perf_counter() - start
    print(f"DDPM pre-training: {args.pretrain_steps} steps in {pretrain_s:.0f} s, held-out eps loss "
          f"{ddpm.heldout_loss(max_images=args.heldout_images):.4f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        source = ddpm.export(Path(tmp) / "ddpm.safetensors", heldout_loss=0.0, with_training_state=False)
        # the FM spec of a swarm has its own name: the converted checkpoint must match it exactly
        fm_config = expert_config("tiny", objective="fm", name="tiny-fm")
        converted_path = convert_ddpm_checkpoint(source, Path(tmp) / "fm.safetensors", target=fm_config)
        converted = ExpertTrainer(fm_config, train, text, seed=2, **settings)
        converted.init_from_checkpoint(converted_path)
        scratch = ExpertTrainer(fm_config, train, text, seed=2, **settings)

        start = time.perf_counter()
        from_converted = curve(converted, args.steps, args.eval_every, args.heldout_images)
        converted_s = time.perf_counter() - start
        start = time.perf_counter()
        from_scratch = curve(scratch, args.steps, args.eval_every, args.heldout_images)
        scratch_s = time.perf_counter() - start

    print(f"{'step':>6} {'converted':>10} {'scratch':>10}")
    for (step, a), (_, b) in zip(from_converted, from_scratch):
        print(f"{step:>6} {a:>10.4f} {b:>10.4f}")
    target = from_scratch[-1][1]
    reached = steps_to_reach(from_converted, target)
    ratios = speedups(from_converted, from_scratch)
    print("scratch step, its loss, steps the converted run needed for it (ratio):")
    for step, loss, ratio in ratios:
        print(f"{step:>6} {loss:>8.4f} {ratio:>6.2f}x")
    summary = {
        "pretrain_steps": args.pretrain_steps, "pretrain_s": pretrain_s, "fm_steps": args.steps,
        "batch_size": args.batch_size,
        "initial_fm_loss": {"converted": from_converted[0][1], "scratch": from_scratch[0][1]},
        "final_fm_loss": {"converted": from_converted[-1][1], "scratch": target},
        "converted_steps_to_scratch_final_loss": reached,
        "speedup_in_steps": (args.steps / reached) if reached else None,
        "speedup_at_each_scratch_loss": ratios,
        "median_speedup": sorted(r for _, _, r in ratios)[len(ratios) // 2] if ratios else None,
        "curves": {"converted": from_converted, "scratch": from_scratch},
        "fm_train_s": {"converted": converted_s, "scratch": scratch_s},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
