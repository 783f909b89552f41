"""Routing study on one trained ensemble: top-1/2/3/full, text vs. image-only router, all-FM vs. mixed.

    python benchmarks/routing.py [--from /tmp/ddm-quality] [--seed 0] [--per-digit 50] [--repeats 3]

On the ensemble that `benchmarks/quality.py --out DIR` trained for `--seed` (K = 4 FM experts and a
text-conditioned router; trained here with quality.py's code if DIR lacks it), with the same
sampler, steps, guidance and initial noise for every case:
  routing: top-1, top-2, top-3 and full mixing with the text router, and (by default top-1,
           top-2 and full) with an image-only router (sees x_t and t, as Paris's; same seed,
           batches and images as the text router), trained here;
  objectives: the all-FM ensemble vs. a heterogeneous one whose clusters 1 and 3 get DDPM (epsilon)
           experts instead, trained here with the FM experts' seeds, batches and image counts (so
           both ensembles cost the same compute; clusters 0 and 2 keep their FM experts), top-2
           and full;
  reference: the monolithic model of the same run (quality.py's other arm).
Each case: classifier FID against the 500 held-out digits and conditional accuracy for "the digit
d" x `--per-digit`, d = 0..9; the router's confidence (mean largest weight per sampling step, full
routing). Time per image: the single expert and the four strategies, interleaved over `--repeats`
rounds in this process, as ratios to the single expert. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.quality import (_init_worker, evaluation_labels, heldout_rows, log, machine, run_arm,  # noqa: E402
                                sample_and_score, train_expert, train_router)
from ddm_models.captions import prompt_for_digit  # noqa: E402
from ddm_models.checkpoint import load_expert, load_router  # noqa: E402
from ddm_models.evaluation import velocity_losses  # noqa: E402
from ddm_models.metrics import load_or_train_classifier  # noqa: E402
from ddm_models.recipe import EMBEDDED_RECIPE  # noqa: E402
from ddm_models.sampling import ROUTINGS, EnsembleSampler  # noqa: E402
from ddm_models.train_ensemble import Shared, prepare  # noqa: E402

STRATEGIES = {str(routing): routing for routing in ROUTINGS}
DDPM_CLUSTERS = (1, 3)  # the recipe's objectives ("fm", "ddpm") cycled over 4 clusters


def ensemble_files(directory: Path, router: str, ddpm: bool) -> tuple[list[Path], Path]:
    experts = [directory / (f"expert-{k}-ddpm.safetensors" if ddpm and k in DDPM_CLUSTERS else
                            f"expert-{k}.safetensors") for k in range(EMBEDDED_RECIPE.num_clusters)]
    return experts, directory / router


def sample_case(shared: Shared, name: str, experts: list[Path], router: Path | None, strategy: str,
                seed: int, per_digit: int) -> tuple[str, dict]:
    """Load the checkpoints, sample the evaluation prompts, score them (runs in a worker)."""
    loaded = [load_expert(path) for path in experts]
    sampler = EnsembleSampler(loaded, load_router(router) if router else None, STRATEGIES[strategy],
                              text_encoder=shared.text)
    result = sample_and_score(shared, sampler, evaluation_labels(per_digit), seed, load_or_train_classifier())
    log(f"{name}: FID {result['fid']:.2f}, accuracy {result['accuracy']:.3f}, mean top weight "
        f"{result['mean_top_weight_used']:.3f} ({result['sample_s']:.0f} s)")
    return name, result


def train_job(shared: Shared, job: str, seed: int, steps_or_images: int, directory: Path) -> tuple[str, dict]:
    """"router-image-only" or "ddpm-<cluster>" (runs in a worker)."""
    if job == "router-image-only":
        _, stats = train_router(shared, seed, steps_or_images, directory / "router-image-only.safetensors",
                                use_text=False)
        return job, stats
    cluster = int(job.split("-")[1])
    config = shared.recipe.expert_config(cluster).replace(objective="ddpm")
    _, curve, stats = train_expert(shared, config, cluster, seed, steps_or_images,
                                   directory / f"expert-{cluster}-ddpm.safetensors",
                                   f"seed {seed} DDPM expert {cluster}")
    return job, {**stats, "heldout_velocity_loss": sum(curve[-1]["losses"]) / len(curve[-1]["losses"])}


def time_strategies(shared: Shared, directory: Path, single: Path, repeats: int, batch: int) -> dict:
    """Seconds per image, single expert vs. each strategy, interleaved over `repeats` rounds."""
    experts, router = ensemble_files(directory, "router.safetensors", ddpm=False)
    loaded, router = [load_expert(path) for path in experts], load_router(router)
    samplers = {"single": EnsembleSampler([load_expert(single)], None, "top1", text_encoder=shared.text)}
    for name, routing in STRATEGIES.items():
        samplers[name] = EnsembleSampler(loaded, router, routing, text_encoder=shared.text)
    prompts = shared.text.encode([prompt_for_digit(i % 10) for i in range(batch)])
    samplers["single"].sample(prompts, num_steps=2)  # warm-up
    seconds = {name: [] for name in samplers}
    for round_ in range(repeats):
        for name, sampler in samplers.items():
            start = time.perf_counter()
            sampler.sample(prompts, num_steps=shared.recipe.sample_steps, guidance_scale=shared.recipe.guidance_scale,
                           seed=round_)
            seconds[name].append((time.perf_counter() - start) / batch)
        log(f"timing round {round_ + 1}/{repeats}: " + ", ".join(f"{n} {s[-1] * 1e3:.1f} ms/img"
                                                                   for n, s in seconds.items()))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"batch": batch, "repeats": repeats, "seconds_per_image": median,
            "ratio_vs_single": {name: value / median["single"] for name, value in median.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, default=Path("/tmp/ddm-quality"),
                        help="quality.py's --out folder (its ensemble is trained here if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-images", type=int, default=32_000,
                        help="used only when --from has no quality.json (then also for training the ensemble)")
    parser.add_argument("--per-digit", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--timing-batch", type=int, default=50)
    parser.add_argument("--image-router-strategies", nargs="+", choices=list(STRATEGIES),
                        default=["top1", "top2", "full"])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, load, recipe = time.time(), machine(), EMBEDDED_RECIPE
    budget, router_images = args.budget_images, args.budget_images // 4
    report = args.source / "quality.json"
    text_router = None
    if report.exists():
        quality = json.loads(report.read_text())
        budget, router_images = quality["summary"]["budget_images"], quality["summary"]["router_images"]
        text_router = quality["runs"].get(str(args.seed), {}).get("ensemble", {}).get("router")
    shared = prepare(recipe, args.source)
    load_or_train_classifier()
    directory = args.source / f"seed-{args.seed}"
    ensemble_dir, single = directory / "ensemble", directory / "monolithic" / "monolithic.safetensors"
    expert_steps = round(budget / (recipe.num_clusters * recipe.expert_training.batch_size))

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker) as pool:
        missing = [arm for arm, path in (("ensemble", ensemble_dir / "router.safetensors"), ("monolithic", single))
                   if not path.exists()]
        for future in [pool.submit(run_arm, shared, arm, args.seed, budget, router_images, args.per_digit)
                       for arm in missing]:
            future.result()
        log(f"ensemble of seed {args.seed} from {ensemble_dir}" + (f" (trained now: {missing})" if missing else ""))
        jobs = [("router-image-only", router_images)] + [(f"ddpm-{k}", expert_steps) for k in DDPM_CLUSTERS]
        trained = dict(f.result() for f in [pool.submit(train_job, shared, job, args.seed, n, ensemble_dir)
                                            for job, n in jobs])
        cases = {"monolithic": ([single], None, "top1")}
        for router_file, prefix in (("router.safetensors", "text_router"), ("router-image-only.safetensors",
                                                                            "image_router")):
            experts, router = ensemble_files(ensemble_dir, router_file, ddpm=False)
            strategies = STRATEGIES if prefix == "text_router" else args.image_router_strategies
            cases.update({f"{prefix}_{s}": (experts, router, s) for s in strategies})
        experts, router = ensemble_files(ensemble_dir, "router.safetensors", ddpm=True)
        cases.update({f"heterogeneous_{s}": (experts, router, s) for s in ("top2", "full")})
        futures = [pool.submit(sample_case, shared, name, *case, args.seed, args.per_digit)
                   for name, case in cases.items()]
        results = dict(f.result() for f in futures)
    timing = time_strategies(shared, ensemble_dir, single, args.repeats, args.timing_batch)

    fm_losses = {}
    for k in DDPM_CLUSTERS:  # the FM experts the DDPM ones replace, on the same held-out noise
        expert = load_expert(ensemble_dir / f"expert-{k}.safetensors")
        fm_losses[k] = float(velocity_losses(expert.velocity, shared.heldout, shared.text, seed=12345,
                                             rows=heldout_rows(shared, k)).mean())
    heterogeneous = {f"cluster_{k}": {"fm_heldout_velocity_loss": fm_losses[k],
                                      "ddpm_heldout_velocity_loss": trained[f"ddpm-{k}"]["heldout_velocity_loss"]}
                     for k in DDPM_CLUSTERS}
    compact = {name: {"fid": r["fid"], "accuracy": r["accuracy"], "mean_top_weight_used": r["mean_top_weight_used"],
                      "top_expert_switches": r["top_expert_switches"]} for name, r in results.items()}
    for prefix in ("text_router", "image_router")[:1 + ("full" in args.image_router_strategies)]:
        compact[f"{prefix}_full"]["router_top_weight_by_step"] = results[f"{prefix}_full"]["top_weight_by_step"]
    out = {"benchmark": "routing", "seed": args.seed, "budget_images": budget, "router_images": router_images,
           "samples_per_case": 10 * args.per_digit, "fid_reference": "500 held-out digits",
           "sampler": {"steps": recipe.sample_steps, "guidance": recipe.guidance_scale},
           "cases": compact, "timing": timing,
           "router_heldout_accuracy": {"text": text_router and text_router["accuracy"],
                                       "text_by_t": text_router and text_router["accuracy_by_t"],
                                       "image_only": trained["router-image-only"]["accuracy"],
                                       "image_only_by_t": trained["router-image-only"]["accuracy_by_t"]},
           "heterogeneous_experts": heterogeneous, "machine": load,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "wall_s": time.time() - started}
    (args.source / "routing.json").write_text(json.dumps({**out, "full_results": results, "trained": trained}))
    for name, r in compact.items():
        timed = "single" if name == "monolithic" else name.removeprefix("text_router_")
        log(f"{name:>22}: FID {r['fid']:7.2f}, accuracy {r['accuracy']:.3f}, top weight "
            f"{r['mean_top_weight_used']:.3f}, time x single {timing['ratio_vs_single'].get(timed, float('nan')):.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
