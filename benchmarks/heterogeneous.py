"""A DDPM expert sampled in flow-matching time vs. natively, and vs. an FM expert of equal training.

    python benchmarks/heterogeneous.py [--cluster 3] [--steps 900] [--per-digit 30]

In one run, on one cluster of the embedded digits: a DDPM (epsilon) expert and an FM (velocity)
expert with the same architecture, seed, batches and number of steps are trained; then the
cluster's main digits are sampled, from the same initial noise, with
  (a) the FM expert, Euler in FM time (the ensemble sampler, 20 steps);
  (b) the DDPM expert through the same sampler, its epsilon converted to FM velocity (DESIGN.md);
  (c) the DDPM expert with its native DDIM sampler (diffusers, 20 "trailing" steps, no clipping).
(b) close to (c) says the conversion loses nothing; (b) close to (a) says mixed ensembles are fair.
Conditional accuracy and classifier FID against the cluster's held-out images, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

from ddm_models.captions import all_captions, prompt_for_digit  # noqa: E402
from ddm_models.checkpoint import load_expert  # noqa: E402
from ddm_models.clustering import cluster_images  # noqa: E402
from ddm_models.configs import expert_config  # noqa: E402
from ddm_models.data import heldout_split, load_embedded_digits, subset  # noqa: E402
from ddm_models.metrics import classifier_fid, conditional_accuracy, load_or_train_classifier  # noqa: E402
from ddm_models.sampling import EnsembleSampler, LoadedExpert  # noqa: E402
from ddm_models.text import TextBatch, build_text_encoder  # noqa: E402
from ddm_models.train_ensemble import write_grid  # noqa: E402
from ddm_models.training import ExpertTrainer  # noqa: E402


@torch.no_grad()
def ddim_sample(expert: LoadedExpert, text: TextBatch, steps: int, guidance: float, seed: int) -> torch.Tensor:
    """Native DDIM (eta 0) with classifier-free guidance on epsilon, from the sampler's initial noise."""
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    x = torch.randn((len(text), *expert.config.image_shape), generator=torch.Generator().manual_seed(seed))
    both, batch = TextBatch.cat([text, text]), len(text)
    drop = torch.arange(2 * batch) >= batch
    for tau in scheduler.timesteps:
        timestep = torch.full((2 * batch,), float(tau))
        cond, uncond = expert.model(torch.cat([x, x]), timestep, both, drop_text=drop).chunk(2)
        x = scheduler.step(uncond + guidance * (cond - uncond), int(tau), x).prev_sample
    return x.clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", type=int, default=3)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--per-digit", type=int, default=30)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the experts' checkpoints and PNG grids here; experts "
                                                 "already there are loaded instead of trained")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_embedded_digits()
    clusters = torch.from_numpy(cluster_images(data.images, 4, seed=0).assignments.copy())
    train_idx, heldout_idx = heldout_split(len(data), 0.1, 0)
    mine = torch.from_numpy(train_idx)[clusters[train_idx] == args.cluster]
    mine_heldout = torch.from_numpy(heldout_idx)[clusters[heldout_idx] == args.cluster]
    train, heldout = subset(data, mine), subset(data, mine_heldout)
    counts = torch.bincount(train.labels, minlength=10)
    digits = [d for d in range(10) if counts[d] > 0.15 * len(train)]
    text = build_text_encoder("minilm")
    text.precompute(all_captions())
    classifier = load_or_train_classifier()

    experts, train_s = {}, {}
    for objective in ("fm", "ddpm"):
        path = args.out / f"expert-{objective}.safetensors" if args.out else None
        if path is not None and path.exists():
            experts[objective] = load_expert(path)
            print(f"{objective}: loaded {path} (step {experts[objective].metadata.step})", flush=True)
            continue
        trainer = ExpertTrainer(expert_config("tiny", objective=objective), train, text, seed=0, cluster=args.cluster,
                                batch_size=args.batch_size, lr=args.lr, warmup_steps=100, heldout=heldout)
        stats = trainer.train_steps(args.steps)
        train_s[objective] = stats.seconds
        experts[objective] = LoadedExpert(args.cluster, trainer.config, trainer.objective, trainer.ema.eval())
        print(f"{objective}: {args.steps} steps in {stats.seconds:.0f} s, held-out loss {trainer.heldout_loss():.4f}",
              flush=True)
        if path is not None:
            trainer.export(path, with_training_state=False)

    labels = torch.tensor([d for d in digits for _ in range(args.per_digit)])
    prompts = text.encode([prompt_for_digit(int(d)) for d in labels])
    samples = {}
    for guidance in args.guidance:
        for name, objective in (("fm_euler", "fm"), ("ddpm_converted_euler", "ddpm")):
            sampler = EnsembleSampler([experts[objective]], None, "top1")
            samples[f"{name}_g{guidance:g}"] = sampler.sample(prompts, num_steps=args.sample_steps,
                                                             guidance_scale=guidance, seed=0).images
        samples[f"ddpm_native_ddim_g{guidance:g}"] = ddim_sample(experts["ddpm"], prompts, args.sample_steps, guidance,
                                                                seed=0)
    if args.out:
        for name, images in samples.items():
            write_grid(images, args.per_digit, args.out / f"{name}.png")
    results = {name: {"conditional_accuracy": conditional_accuracy(classifier, images, labels),
                      "classifier_fid": classifier_fid(classifier, heldout.images, images)}
               for name, images in samples.items()}
    for name, result in results.items():
        print(f"{name:>22}: accuracy {result['conditional_accuracy']:.3f}, FID {result['classifier_fid']:.2f}")
    print(json.dumps({"cluster": args.cluster, "digits": digits, "steps": args.steps, "batch_size": args.batch_size,
                      "lr": args.lr, "guidance": args.guidance, "sample_steps": args.sample_steps,
                      "samples": len(labels), "heldout_images": len(heldout), "train_s": train_s,
                      "load_average": list(os.getloadavg()), "finished": time.time(), **results}))


if __name__ == "__main__":
    main()
