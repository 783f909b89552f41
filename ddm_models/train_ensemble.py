"""Train K experts and a router on the embedded digits within a wall-time budget, then sample and
measure: `python -m ddm_models.train_ensemble --minutes 10 --out DIR`.

1. Set-up (not counted in the budget): the digits, their held-out split and K clusters, the MiniLM
   embeddings of every caption, the evaluation classifier (trained once, cached).
2. Training (the budget, measured as wall time from starting the worker processes to the last
   checkpoint written): `workers` processes of one thread each (several torch processes on 2 cores
   must not use 2 threads each) run the K expert jobs and the router job, each for its share of the
   time, and export checkpoints to DIR.
3. Sampling: the checkpoints are loaded back, "the digit d" x N for d = 0..9 is sampled with top-1,
   top-2 and full routing, the classifier gives the conditional accuracy of each, and DIR gets a PNG
   grid per strategy. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch

from ddm_models.captions import all_captions, prompt_for_digit
from ddm_models.data import ImageDataset, heldout_split, load_embedded_digits, subset
from ddm_models.recipe import EMBEDDED_RECIPE, EnsembleRecipe
from ddm_models.text import TextBatch, TextEncoder

STRATEGIES = ("top1", "top2", "full")  # spellings of `ddm_models.sampling.Routing`


class TextTable(TextEncoder):
    """A fixed table of encoded prompts (for worker processes, which then never load the encoder).
    Asking for a prompt outside the table raises `KeyError` naming it."""

    def __init__(self, encoder: TextEncoder, prompts: list[str]):
        prompts = list(dict.fromkeys(prompts))
        self.name, self.dim, self.pooled_dim, self.max_length = (encoder.name, encoder.dim, encoder.pooled_dim,
                                                                 encoder.max_length)
        self.rows = {prompt: i for i, prompt in enumerate(prompts)}
        self.table = encoder.encode(prompts)

    def encode(self, prompts: list[str]) -> TextBatch:
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise KeyError(f"prompts outside the precomputed table: {missing[:3]}")
        return self.table.select([self.rows[p] for p in prompts])


@dataclasses.dataclass
class Shared:
    """What every worker needs, sent once per task (a few MB)."""

    recipe: EnsembleRecipe
    train: ImageDataset
    heldout: ImageDataset
    train_clusters: torch.Tensor
    heldout_clusters: torch.Tensor
    text: TextTable
    out: Path


def prepare(recipe: EnsembleRecipe, out: Path) -> Shared:
    """Data, held-out split, clusters and caption embeddings."""
    from ddm_models.clustering import cluster_images
    from ddm_models.text import build_text_encoder

    data = load_embedded_digits()
    split = cluster_images(data.images, recipe.num_clusters, recipe.cluster_seed, fine=recipe.fine_clusters)
    clusters = torch.from_numpy(split.assignments.copy())
    train_idx, heldout_idx = heldout_split(len(data), recipe.heldout_fraction, recipe.split_seed)
    encoder = build_text_encoder("minilm", cached=False)
    text = TextTable(encoder, all_captions() + [prompt_for_digit(d) for d in range(10)])
    return Shared(recipe, subset(data, train_idx), subset(data, heldout_idx), clusters[train_idx],
                  clusters[heldout_idx], text, out)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _cluster_part(dataset: ImageDataset, clusters: torch.Tensor, k: int) -> ImageDataset:
    return subset(dataset, torch.nonzero(clusters == k).squeeze(1), name=f"{dataset.name}-cluster{k}")


def _train_jobs(shared: Shared, jobs: list[tuple[str, int, float]]) -> list[dict]:
    """Run ("expert", cluster, seconds) / ("router", -1, seconds) jobs one after another."""
    from ddm_models.training import ExpertTrainer
    from ddm_models.router_training import RouterTrainer

    recipe, results = shared.recipe, []
    for kind, cluster, seconds in jobs:
        start, cpu_start = time.perf_counter(), time.process_time()
        if kind == "expert":
            trainer = ExpertTrainer(recipe.expert_config(cluster), _cluster_part(shared.train, shared.train_clusters,
                                                                                   cluster),
                                    shared.text, seed=recipe.seed + cluster, cluster=cluster,
                                    heldout=_cluster_part(shared.heldout, shared.heldout_clusters, cluster),
                                    **recipe.expert_training.trainer_kwargs())
            stats = trainer.train_for(seconds - 3.0)  # leave time for the export below
            metric = {"heldout_loss": trainer.heldout_loss()}
            path = trainer.export(shared.out / f"expert-{cluster}.safetensors", heldout_loss=metric["heldout_loss"],
                                  with_training_state=False)
        else:
            trainer = RouterTrainer(recipe.router, shared.train, shared.train_clusters, shared.text,
                                    seed=recipe.seed + 1000, heldout=(shared.heldout, shared.heldout_clusters),
                                    **recipe.router_training.trainer_kwargs())
            stats = trainer.train_for(seconds - 3.0)
            evaluation = trainer.evaluate(num_bins=5)
            path = trainer.export(shared.out / "router.safetensors", accuracy=evaluation.accuracy,
                                  with_training_state=False)
            metric = {"accuracy": evaluation.accuracy,
                      "accuracy_by_t": [[lo, hi, acc] for lo, hi, acc in evaluation.bins]}
        results.append({"job": kind, "cluster": cluster, "budget_s": seconds, "steps": stats.step,
                        "train_s": stats.seconds, "images_per_s": stats.images_per_s, "final_loss": stats.loss,
                        "job_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start,
                        "checkpoint": str(path), **metric})
    return results


def plan_jobs(recipe: EnsembleRecipe, seconds: float) -> list[list[tuple[str, int, float]]]:
    """Split `workers` x `seconds` of worker time: the router gets `router_share` of it on worker 0;
    experts are dealt round-robin and share each worker's remaining time equally."""
    workers = max(1, min(recipe.workers, recipe.num_clusters))
    router_s = recipe.router_share * workers * seconds
    experts = [list(range(recipe.num_clusters))[w::workers] for w in range(workers)]
    plans = []
    for w, clusters in enumerate(experts):
        left = seconds - (router_s if w == 0 else 0.0)
        plan = [("expert", k, left / len(clusters)) for k in clusters]
        plans.append(([("router", -1, router_s)] if w == 0 else []) + plan)
    return plans


def _sample_chunk(shared: Shared, strategy: str, digits: list[int], seed: int) -> tuple[torch.Tensor, dict]:
    from ddm_models.checkpoint import load_expert, load_router
    from ddm_models.sampling import EnsembleSampler

    recipe = shared.recipe
    experts = [load_expert(shared.out / f"expert-{k}.safetensors") for k in range(recipe.num_clusters)]
    sampler = EnsembleSampler(experts, load_router(shared.out / "router.safetensors"), strategy,
                              text_encoder=shared.text)
    result = sampler.sample([prompt_for_digit(d) for d in digits], num_steps=recipe.sample_steps,
                            guidance_scale=recipe.guidance_scale, seed=seed)
    return result.images, result.evaluations


def sample_all(shared: Shared, pool, per_digit: int) -> dict:
    """Sample every strategy, split over the workers; returns images and timings per strategy."""
    digits = [d for d in range(10) for _ in range(per_digit)]
    chunks = np.array_split(np.arange(len(digits)), shared.recipe.workers)
    out = {}
    for strategy in STRATEGIES:
        start = time.perf_counter()
        futures = [pool.submit(_sample_chunk, shared, strategy, [digits[i] for i in chunk], shared.recipe.seed + c)
                   for c, chunk in enumerate(chunks) if len(chunk)]
        parts = [f.result() for f in futures]
        seconds = time.perf_counter() - start
        evaluations = {}
        for _, counts in parts:
            for k, n in counts.items():
                evaluations[k] = evaluations.get(k, 0) + n
        out[strategy] = {"images": torch.cat([p[0] for p in parts]), "labels": torch.tensor(digits),
                         "seconds": seconds, "images_per_s": len(digits) / seconds, "evaluations": evaluations}
    return out


def write_grid(images: torch.Tensor, columns: int, path: Path) -> None:
    """A PNG with one row per digit: images (10 * columns, 1, H, W) in [-1, 1]."""
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    rows = pixels.reshape(-1, columns, *pixels.shape[1:])
    grid = torch.cat([torch.cat(list(row), dim=1) for row in rows], dim=0)
    Image.fromarray(grid.numpy(), mode="L").save(path)


def run(recipe: EnsembleRecipe, minutes: float, out: Path, per_digit: int) -> dict:
    from ddm_models.metrics import conditional_accuracy, load_or_train_classifier

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.set_num_threads(recipe.threads_per_worker)
    shared = prepare(recipe, out)
    classifier = load_or_train_classifier()
    setup_s = time.perf_counter() - start

    plans = plan_jobs(recipe, minutes * 60.0)
    context = multiprocessing.get_context("spawn")
    load = os.getloadavg()
    with concurrent.futures.ProcessPoolExecutor(len(plans), mp_context=context, initializer=_init_worker,
                                                initargs=(recipe.threads_per_worker,)) as pool:
        train_start = time.perf_counter()
        jobs = [job for part in pool.map(_train_jobs, [shared] * len(plans), plans) for job in part]
        train_s = time.perf_counter() - train_start
        for job in jobs:
            print(f"{job['job']:>6} {job['cluster']:>2}: {job['steps']} steps in {job['train_s']:.0f} s "
                  f"({job['images_per_s']:.0f} img/s, {job['cpu_s']:.0f} CPU s), loss {job['final_loss']:.4f}, "
                  + (f"held-out loss {job['heldout_loss']:.4f}" if job["job"] == "expert"
                     else f"held-out accuracy {job['accuracy']:.3f} by t "
                          + " ".join(f"{acc:.2f}" for _, _, acc in job["accuracy_by_t"])), flush=True)
        sample_start = time.perf_counter()
        samples = sample_all(shared, pool, per_digit)
        sample_s = time.perf_counter() - sample_start

    accuracy = {}
    for strategy, result in samples.items():
        accuracy[strategy] = conditional_accuracy(classifier, result["images"], result["labels"])
        write_grid(result["images"], per_digit, out / f"samples-{strategy}.png")
        print(f"{strategy:>5}: conditional accuracy {accuracy[strategy]:.3f}, {result['images_per_s']:.1f} img/s, "
              f"expert evaluations {dict(sorted(result['evaluations'].items()))}", flush=True)
    cpu_s = sum(job["cpu_s"] for job in jobs)
    print(f"training: {train_s:.0f} s wall, {cpu_s:.0f} CPU s in the workers "
          f"({cpu_s / (train_s * len(plans)):.0%} of {len(plans)} cores)", flush=True)
    return {"accuracy": accuracy, "train_wall_s": train_s, "train_cpu_s": cpu_s, "budget_s": minutes * 60.0,
            "setup_s": setup_s,
            "sample_s": sample_s, "sampling_images_per_s": {s: r["images_per_s"] for s, r in samples.items()},
            "samples_per_strategy": 10 * per_digit, "jobs": jobs, "load_average_at_start": load,
            "classifier_heldout_accuracy": classifier.heldout_accuracy, "recipe": recipe.to_dict()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget for all training")
    parser.add_argument("--out", type=Path, required=True, help="folder for checkpoints, PNG grids, summary")
    parser.add_argument("--per-digit", type=int, default=20, help="samples per digit and strategy")
    parser.add_argument("--recipe", type=Path, help="JSON or YAML file overriding fields of the embedded recipe")
    args = parser.parse_args(argv)
    recipe = EMBEDDED_RECIPE
    if args.recipe:
        import yaml

        recipe = EnsembleRecipe.from_dict(yaml.safe_load(args.recipe.read_text()))
    summary = run(recipe, args.minutes, args.out, args.per_digit)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    keys = ("accuracy", "train_wall_s", "train_cpu_s", "budget_s", "setup_s", "sample_s", "sampling_images_per_s",
            "load_average_at_start")
    print(json.dumps({key: summary[key] for key in keys}))


if __name__ == "__main__":
    main()
