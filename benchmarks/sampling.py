"""Sampling cost of routing: top-1, top-2 and full ensembles vs. one expert of the same size.

The same batch of prompts, sampler, steps and guidance for every case, interleaved over several
repeats in one run (this machine is shared: compare ratios, not seconds). Experts and router are
freshly initialised tiny models: sampling time does not depend on what they learned.

    python benchmarks/sampling.py [--batch 64] [--steps 20] [--repeats 5] [--threads 2]

Targets (issue 4): top-1 <= 1.1x a single expert, top-2 <= 2.1x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from ddm_models.configs import expert_config, router_config
from ddm_models.experts import build_expert
from ddm_models.objectives import objective_for
from ddm_models.router import build_router
from ddm_models.sampling import EnsembleSampler, LoadedExpert
from ddm_models.text import TextBatch


def make_expert(cluster: int, size: str) -> LoadedExpert:
    torch.manual_seed(cluster)
    config = expert_config(size)
    return LoadedExpert(cluster, config, objective_for(config), build_expert(config).eval())


def text_batch(batch: int, dim: int = 384, length: int = 16) -> TextBatch:
    generator = torch.Generator().manual_seed(0)
    return TextBatch(torch.randn(batch, length, dim, generator=generator), torch.ones(batch, length, dtype=torch.bool),
                     torch.randn(batch, dim, generator=generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", default="tiny")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    experts = [make_expert(k, args.size) for k in range(4)]
    router = build_router(router_config("small")).eval()
    text = text_batch(args.batch)
    samplers = {"single": EnsembleSampler(experts[:1], None, "top1"),
                "top1": EnsembleSampler(experts, router, "top1"),
                "top2": EnsembleSampler(experts, router, "top2"),
                "full": EnsembleSampler(experts, router, "full")}
    times = {name: [] for name in samplers}
    samplers["single"].sample(text, num_steps=2)  # warm-up
    for _ in range(args.repeats):
        for name, sampler in samplers.items():
            start = time.perf_counter()
            sampler.sample(text, num_steps=args.steps, guidance_scale=2.0, seed=0)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    table = Table(title=f"sampling {args.batch} images, {args.steps} steps, CFG, {args.threads} threads")
    for column in ("routing", "median s", "images/s", "x single"):
        table.add_column(column, justify="right")
    for name, seconds in median.items():
        table.add_row(name, f"{seconds:.3f}", f"{args.batch / seconds:.1f}", f"{seconds / median['single']:.2f}")
    Console().print(table)
    print(json.dumps({"benchmark": "sampling", "batch": args.batch, "steps": args.steps, "threads": args.threads,
                      "seconds": {k: round(v, 4) for k, v in median.items()},
                      "ratio_vs_single": {k: round(v / median["single"], 3) for k, v in median.items()},
                      "targets": {"top1": 1.1, "top2": 2.1}}))


if __name__ == "__main__":
    main()
