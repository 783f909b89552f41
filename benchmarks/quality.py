"""Ensemble vs. monolithic at equal training compute on the embedded digits.

    python benchmarks/quality.py [--seeds 0 1 2] [--budget-images 32000] [--out DIR] [--plot PNG]
    python benchmarks/quality.py --swarm emoji [...]   (captioned colour emoji: see quality_emoji.py)

For each seed, two arms train side by side (one process of one thread each), with the embedded
recipe's expert architecture, batch size, learning rate, warm-up and EMA:
  monolithic: one expert on all 4,500 training digits, for `budget` training images;
  ensemble:   K = 4 experts, one per cluster of the same digits, `budget / K` images each (so the
              experts together see exactly `budget` images: the compute DDM counts), plus the
              recipe's router, trained on `--router-images` images (reported separately, with its
              forward FLOPs per image relative to an expert's, so the total can be counted too).
Both are then sampled with the same sampler, steps, guidance and initial noise (the ensemble with
the recipe's top-2 routing): `--per-digit` images for each prompt "the digit d", d = 0..9, judged by
the offline digit classifier (conditional accuracy) and by FID in its feature space against the
500 held-out digits, which neither the generators nor the classifier trained on.

Loss curves: at fixed fractions of training, every model's EMA weights are scored on the held-out
digits by the FM velocity error with the same noise and times per image (`velocity_losses`): the
monolith on all of them, each expert on its own cluster's; "ensemble, own-cluster expert" scores each
held-out image by its cluster's expert (routing by the true cluster); at the end the trained
router's top-2 and full mixtures are scored too. Progress goes to stderr; the last stdout line is
one JSON object (means, sample standard deviations and per-seed values).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddm_models.captions import prompt_for_digit  # noqa: E402
from ddm_models.configs import ExpertConfig  # noqa: E402
from ddm_models.data import ImageDataset, heldout_split  # noqa: E402
from ddm_models.evaluation import velocity_losses  # noqa: E402
from ddm_models.metrics import (DEFAULT_RECIPE, classifier_fid, conditional_accuracy,  # noqa: E402
                                load_or_train_classifier)
from ddm_models.recipe import EMBEDDED_RECIPE, EnsembleRecipe  # noqa: E402
from ddm_models.sampling import EnsembleSampler, LoadedExpert  # noqa: E402
from ddm_models.train_ensemble import Shared, _cluster_part, prepare, write_grid  # noqa: E402
from ddm_models.training import ExpertTrainer  # noqa: E402
from ddm_models.router_training import RouterTrainer  # noqa: E402

CURVE_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
LOSS_SEED = 12345  # noise and times of the held-out velocity losses, shared by every model
SAMPLE_CHUNK = 250


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} pid {os.getpid()}] {message}", file=sys.stderr, flush=True)


def expert_seed(seed: int, cluster: int) -> int:
    """Seed of cluster `cluster`'s expert in run `seed` (cluster -1: the monolith); the objective does
    not enter it, so an FM and a DDPM expert of one cluster draw the same batches and noise."""
    return 100 * seed + 10 + cluster


def heldout_rows(shared: Shared, cluster: int | None) -> torch.Tensor:
    if cluster is None:
        return torch.arange(len(shared.heldout))
    return torch.nonzero(shared.heldout_clusters == cluster).squeeze(1)


def train_expert(shared: Shared, config: ExpertConfig, cluster: int | None, seed: int, steps: int,
                 path: Path, tag: str) -> tuple[LoadedExpert, list[dict], dict]:
    """Train one expert (on cluster `cluster`, or on all the data for None) for `steps` steps, scoring
    its EMA weights on its held-out rows at each of CURVE_FRACTIONS; export it to `path`.
    Returns the expert, its curve [{images, losses (per held-out row)}] and training stats."""
    recipe = shared.recipe
    data = shared.train if cluster is None else _cluster_part(shared.train, shared.train_clusters, cluster)
    rows = heldout_rows(shared, cluster)
    trainer = ExpertTrainer(config, data, shared.text, seed=expert_seed(seed, -1 if cluster is None else cluster),
                            cluster=0 if cluster is None else cluster,
                            heldout=shared.heldout if cluster is None else _cluster_part(
                                shared.heldout, shared.heldout_clusters, cluster),
                            **recipe.expert_training.trainer_kwargs())
    curve, train_s, cpu_start = [], 0.0, time.process_time()
    for fraction in CURVE_FRACTIONS:
        target = max(1, round(steps * fraction))
        if target == trainer.step:
            continue  # tiny budgets: two fractions round to one step
        stats = trainer.train_steps(target - trainer.step)
        train_s += stats.seconds
        ema = LoadedExpert(trainer.cluster, config, trainer.objective, trainer.ema.eval())
        losses = velocity_losses(ema.velocity, shared.heldout, shared.text, seed=LOSS_SEED, rows=rows)
        curve.append({"images": trainer.samples_seen, "losses": losses.tolist()})
        log(f"{tag}: {trainer.samples_seen} images, held-out velocity loss {losses.mean():.4f}, "
            f"{stats.images_per_s:.0f} img/s")
    trainer.export(path, heldout_loss=float(np.mean(curve[-1]["losses"])), with_training_state=False)
    stats = {"steps": trainer.step, "images": trainer.samples_seen, "train_s": train_s,
             "cpu_s": time.process_time() - cpu_start, "images_per_s": trainer.samples_seen / train_s}
    return LoadedExpert(trainer.cluster, config, trainer.objective, trainer.ema.eval()), curve, stats


def train_router(shared: Shared, seed: int, images: int, path: Path, use_text: bool = True):
    """The recipe's router (or its image-only variant) for `images` training images; exported to `path`."""
    recipe = shared.recipe
    config = dataclasses.replace(recipe.router, use_text=use_text)
    settings = recipe.router_training.trainer_kwargs()
    trainer = RouterTrainer(config, shared.train, shared.train_clusters, shared.text if use_text else None,
                            seed=100 * seed + 99, heldout=(shared.heldout, shared.heldout_clusters), **settings)
    stats = trainer.train_steps(max(1, images // settings["batch_size"]))
    evaluation = trainer.evaluate(num_bins=5)
    trainer.export(path, accuracy=evaluation.accuracy, with_training_state=False)
    log(f"router (text={use_text}): {trainer.samples_seen} images in {stats.seconds:.0f} s, held-out accuracy "
        f"{evaluation.accuracy:.3f}, by t " + " ".join(f"{acc:.2f}" for _, _, acc in evaluation.bins))
    return trainer.ema.eval(), {"images": trainer.samples_seen, "train_s": stats.seconds,
                                "accuracy": evaluation.accuracy,
                                "accuracy_by_t": [[lo, hi, acc] for lo, hi, acc in evaluation.bins]}


def evaluation_labels(per_digit: int) -> torch.Tensor:
    return torch.tensor([d for d in range(10) for _ in range(per_digit)])


def sample_and_score(shared: Shared, sampler: EnsembleSampler, labels: torch.Tensor, seed: int, classifier,
                     grid: Path | None = None) -> dict:
    """Sample one image per label (prompt "the digit d"), in chunks with seeds derived from `seed`
    (identical noise for every sampler given the same seed); FID against the held-out digits and
    conditional accuracy. Also the mean largest mixing weight the sampler used (after top-k
    renormalisation; 1 for a single expert), by sampling step (from t = 1), and the fraction of
    samples whose largest-weight expert changed during sampling."""
    recipe, images, top_weight, top_expert, start = shared.recipe, [], [], [], time.perf_counter()
    for c, chunk in enumerate(labels.split(SAMPLE_CHUNK)):
        result = sampler.sample([prompt_for_digit(int(d)) for d in chunk], num_steps=recipe.sample_steps,
                                guidance_scale=recipe.guidance_scale, seed=1000 * seed + c)
        images.append(result.images)
        top_weight.append(result.routing.max(dim=2).values)  # (steps, chunk)
        top_expert.append(result.routing.argmax(dim=2))
    images, top_weight, top_expert = torch.cat(images), torch.cat(top_weight, 1), torch.cat(top_expert, 1)
    if grid is not None:
        per_digit = len(labels) // 10
        write_grid(images.reshape(10, per_digit, *images.shape[1:])[:, :10].reshape(-1, *images.shape[1:]),
                   min(10, per_digit), grid)
    return {"fid": classifier_fid(classifier, shared.heldout.images, images),
            "accuracy": conditional_accuracy(classifier, images, labels),
            "sample_s": time.perf_counter() - start, "mean_top_weight_used": float(top_weight.mean()),
            "top_weight_by_step": [round(float(w), 4) for w in top_weight.mean(1)],
            "top_expert_switches": float((top_expert != top_expert[:1]).any(0).float().mean())}


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_arm(shared: Shared, arm: str, seed: int, budget: int, router_images: int, per_digit: int) -> dict:
    """Train, sample and score one arm ("monolithic" or "ensemble") of run `seed`; its result is
    kept in `arm.json` beside its checkpoints and reused by a later run with the same settings."""
    recipe, out = shared.recipe, shared.out / f"seed-{seed}" / arm
    out.mkdir(parents=True, exist_ok=True)
    settings = {"budget": budget, "router_images": router_images, "per_digit": per_digit,
                "recipe": recipe.to_dict()}
    saved = out / "arm.json"
    if saved.exists() and json.loads(saved.read_text()).get("settings") == json.loads(json.dumps(settings)):
        log(f"seed {seed} {arm}: reusing {saved}")
        return json.loads(saved.read_text())["result"]
    classifier = load_or_train_classifier()
    batch, k = recipe.expert_training.batch_size, recipe.num_clusters
    expert_steps = round(budget / (k * batch))
    labels, start = evaluation_labels(per_digit), time.perf_counter()
    if arm == "monolithic":
        expert, curve, stats = train_expert(shared, recipe.expert_config(0), None, seed, k * expert_steps,
                                            out / "monolithic.safetensors", f"seed {seed} monolithic")
        result = {"train": stats, "curve": [{"images": p["images"], "loss": float(np.mean(p["losses"]))}
                                            for p in curve]}
        sampler = EnsembleSampler([expert], None, "top1", text_encoder=shared.text)
    else:
        experts, curves, stats = [], [], []
        for cluster in range(k):
            expert, curve, stat = train_expert(shared, recipe.expert_config(cluster), cluster, seed, expert_steps,
                                               out / f"expert-{cluster}.safetensors", f"seed {seed} expert {cluster}")
            experts.append(expert), curves.append(curve), stats.append(stat)
        router, router_stats = train_router(shared, seed, router_images, out / "router.safetensors")
        own_cluster = []  # each held-out image scored by its own cluster's expert, at each fraction
        for i in range(len(curves[0])):  # fractions that rounded to one step were skipped
            losses = torch.zeros(len(shared.heldout))
            for cluster in range(k):
                losses[heldout_rows(shared, cluster)] = torch.tensor(curves[cluster][i]["losses"])
            own_cluster.append({"images": sum(c[i]["images"] for c in curves), "loss": float(losses.mean()),
                                "mean_over_experts": float(np.mean([np.mean(c[i]["losses"]) for c in curves]))})
        mixture = {}
        for strategy in ("top2", "full"):
            mixer = EnsembleSampler(experts, router, strategy, text_encoder=shared.text)
            mixture[strategy] = float(velocity_losses(lambda x, t, text: mixer.velocity(x, t, text)[0],
                                                      shared.heldout, shared.text, seed=LOSS_SEED).mean())
        log(f"seed {seed} ensemble: held-out velocity loss, own-cluster experts {own_cluster[-1]['loss']:.4f}, "
            f"router top-2 {mixture['top2']:.4f}, full {mixture['full']:.4f}")
        result = {"train": {"experts": stats, "images": sum(s["images"] for s in stats),
                            "train_s": sum(s["train_s"] for s in stats), "cpu_s": sum(s["cpu_s"] for s in stats)},
                  "router": router_stats, "curve": own_cluster, "mixture_loss": mixture,
                  "expert_curves": [[{"images": p["images"], "loss": float(np.mean(p["losses"]))} for p in c]
                                    for c in curves]}
        sampler = EnsembleSampler(experts, router, recipe.routing, text_encoder=shared.text)
    result["samples"] = sample_and_score(shared, sampler, labels, seed, classifier, out / "samples.png")
    result["wall_s"] = time.perf_counter() - start
    log(f"seed {seed} {arm}: FID {result['samples']['fid']:.2f}, accuracy {result['samples']['accuracy']:.3f} "
        f"({result['wall_s']:.0f} s)")
    saved.write_text(json.dumps({"settings": settings, "result": result}))
    return result


def flops_per_image(shared: Shared) -> dict:
    """Forward FLOPs per 28x28 image of one expert and of the router (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ddm_models.experts import build_expert
    from ddm_models.objectives import objective_for
    from ddm_models.router import build_router

    x, t = torch.randn(8, *shared.train.image_shape), torch.rand(8)
    text = shared.text.encode([prompt_for_digit(d) for d in range(8)])
    config = shared.recipe.expert_config(0)
    with FlopCounterMode(display=False) as expert:
        build_expert(config)(*objective_for(config).model_input(x, t), text)
    with FlopCounterMode(display=False) as router:
        build_router(shared.recipe.router)(x, t, text)
    return {"expert": expert.get_total_flops() / 8, "router": router.get_total_flops() / 8}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} CPU cores (shared), no GPU, torch {torch.__version__}, "
            f"load average {os.getloadavg()[0]:.1f} at the start")


def plot(results: dict, seeds: list[int], path: Path) -> None:
    """Held-out velocity loss vs. training images: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = (("monolithic", "loss", "monolithic (one expert, all data)", "C0", "-"),
             ("ensemble", "loss", "ensemble, each image by its cluster's expert", "C1", "-"),
             ("ensemble", "mean_over_experts", "ensemble, mean of experts on own cluster", "C1", ":"))
    for arm, key, label, color, style in lines:
        images = np.array([p["images"] for p in results[seeds[0]][arm]["curve"]])
        values = np.array([[p[key] for p in results[s][arm]["curve"]] for s in seeds])
        ax.plot(images, values.mean(0), style, color=color, marker="o", markersize=3, label=label)
        ax.fill_between(images, values.min(0), values.max(0), color=color, alpha=0.15)
    end = results[seeds[0]]["ensemble"]["curve"][-1]["images"]
    for strategy, marker in (("top2", "^"), ("full", "s")):
        value = np.mean([results[s]["ensemble"]["mixture_loss"][strategy] for s in seeds])
        ax.plot([end], [value], marker, color="C3" if strategy == "top2" else "C2", linestyle="none",
                label=f"ensemble with the router, {strategy} (end)")
    ax.set_xlabel("training images (ensemble: all experts together)")
    ax.set_ylabel("held-out FM velocity MSE")
    ax.set_yscale("log")
    ax.set_title(f"Ensemble vs. monolithic at equal compute, {len(seeds)} seeds (band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if "--swarm" in sys.argv[1:]:  # the emoji swarm has its own data, metrics and studies
        import quality_emoji

        quality_emoji.main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget-images", type=int, default=32_000,
                        help="training images per arm (the ensemble's experts together)")
    parser.add_argument("--router-images", type=int, help="router training images (default budget / 4)")
    parser.add_argument("--per-digit", type=int, default=50, help="evaluation samples per digit and arm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ddm-quality"),
                        help="checkpoints, sample grids, per-arm results (reused when the settings match: "
                             "add seeds to a finished run cheaply) and quality.json (routing.py --from reads it)")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "quality_loss.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe: EnsembleRecipe = EMBEDDED_RECIPE
    router_images = args.router_images or args.budget_images // 4
    started, load = time.time(), machine()

    shared = prepare(recipe, args.out)
    classifier = load_or_train_classifier()
    # The FID reference must be unseen by the classifier too: the recipe's held-out digits are the
    # first 500 of the same permutation whose first 1,000 the classifier holds out.
    _, classifier_heldout = heldout_split(5000, DEFAULT_RECIPE.heldout_fraction, DEFAULT_RECIPE.split_seed)
    _, recipe_heldout = heldout_split(5000, recipe.heldout_fraction, recipe.split_seed)
    assert set(recipe_heldout) <= set(classifier_heldout), "FID reference digits overlap the classifier's training"
    floor = torch.randperm(len(shared.train), generator=torch.Generator().manual_seed(0))[:len(shared.heldout)]
    real_vs_real = classifier_fid(classifier, shared.heldout.images, shared.train.images[floor])
    flops = flops_per_image(shared)
    log(f"{len(shared.train)} training / {len(shared.heldout)} held-out digits, clusters "
        f"{torch.bincount(shared.train_clusters).tolist()}; budget {args.budget_images} images per arm, router "
        f"{router_images}; FID of 500 real training digits {real_vs_real:.2f}; router/expert FLOPs per image "
        f"{flops['router'] / flops['expert']:.2f}")

    context = multiprocessing.get_context("spawn")
    results: dict[int, dict] = {seed: {} for seed in args.seeds}
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(run_arm, shared, arm, seed, args.budget_images, router_images, args.per_digit):
                   (seed, arm) for seed in args.seeds for arm in ("monolithic", "ensemble")}
        for future in concurrent.futures.as_completed(futures):
            seed, arm = futures[future]
            results[seed][arm] = future.result()
    plot(results, args.seeds, args.plot)

    summary = {"benchmark": "quality", "budget_images": args.budget_images, "router_images": router_images,
               "router_flops_per_image_vs_expert": flops["router"] / flops["expert"],
               "total_flops_ensemble_vs_monolithic": 1 + router_images * flops["router"]
               / (args.budget_images * flops["expert"]),
               "seeds": args.seeds, "samples_per_arm": 10 * args.per_digit, "fid_reference": "500 held-out digits",
               "fid_real_training_digits": real_vs_real,
               "sampler": {"steps": recipe.sample_steps, "guidance": recipe.guidance_scale,
                           "ensemble_routing": recipe.routing}}
    for arm in ("monolithic", "ensemble"):
        runs = [results[s][arm] for s in args.seeds]
        summary[arm] = {"fid": spread([r["samples"]["fid"] for r in runs]),
                        "accuracy": spread([r["samples"]["accuracy"] for r in runs]),
                        "heldout_velocity_loss": spread([r["curve"][-1]["loss"] for r in runs]),
                        "train_s": [r["train"]["train_s"] for r in runs]}
    ensemble = [results[s]["ensemble"] for s in args.seeds]
    summary["ensemble"].update(
        mixture_loss_top2=spread([r["mixture_loss"]["top2"] for r in ensemble]),
        mixture_loss_full=spread([r["mixture_loss"]["full"] for r in ensemble]),
        router_accuracy=spread([r["router"]["accuracy"] for r in ensemble]),
        mean_top_weight_used=spread([r["samples"]["mean_top_weight_used"] for r in ensemble]))
    summary.update(machine=load, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   wall_s=time.time() - started)
    (args.out / "quality.json").write_text(json.dumps({"summary": summary, "runs": {str(s): results[s]
                                                                                      for s in args.seeds}}))
    for arm in ("monolithic", "ensemble"):
        log(f"{arm:>10}: FID {summary[arm]['fid']['mean']:.2f} ± {summary[arm]['fid']['std']:.2f}, accuracy "
            f"{summary[arm]['accuracy']['mean']:.3f} ± {summary[arm]['accuracy']['std']:.3f}, held-out loss "
            f"{summary[arm]['heldout_velocity_loss']['mean']:.4f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
