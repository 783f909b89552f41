"""Node overhead: images/s of a `ddm-swarm node` training inside a swarm vs. the bare training loop.

    python benchmarks/node_overhead.py [--steps 300] [--repeats 3] [--threads 1] [--swarm local]

Each repeat builds a fresh swarm on 127.0.0.1 (a manifest of its own name, so no earlier repeat's
checkpoint is resumed): a `ddm-swarm bootstrap` peer and a mirror peer (`ddm-swarm node --max-steps 0`:
it trains nothing and keeps and serves the latest checkpoint of every other job, so it fetches each
new checkpoint of the measured node from it). Then, in alternating order within the repeat:

  swarm  `ddm-swarm node --job expert/0 --max-steps N --exit-when-done`: joins, claims, trains N
         steps and every `checkpoint_every_steps` writes its state, measures its held-out loss,
         exports, stores, announces and serves the checkpoint (on a thread of its own, from a
         frozen copy of the trainer: `checkpoint_share` is what the training thread itself spent
         on checkpoints, `checkpoint_work_share` the checkpoints' whole work). Its exit summary gives images/s by
         the wall clock over the whole training, checkpoints included (not the best slice);
  bare   `ExpertTrainer` alone in a fresh process: the same data, model, batch, seed and threads,
         N steps, nothing else.

The bootstrap and mirror peers stay up during the bare run too, so both runs share the machine
with the same neighbours. This machine is shared and noisy: every repeat gives one swarm/bare
ratio, and the figure is their median. Target (issue 4): ratio >= 0.97. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.swarm_harness import BootstrapProcess, LineProcess, NodeProcess, child_env  # noqa: E402

JOB, CLUSTER = "expert/0", 0
STEP_LINE = re.compile(r"step (\d+)")


# ---- the bare loop, in a process of its own ---------------------------------------------------------------
def bare_worker(manifest_path: str, cache: str, steps: int, threads: int, seed: int) -> None:
    """What `SwarmNode` builds for JOB, trained for `steps` steps with nothing around it."""
    import torch

    from ddm_models.text import build_text_encoder
    from ddm_models.training import ExpertTrainer
    from node.checkpoints.specs import expert_config, training_options
    from node.data.swarm_data import prepare_swarm_data
    from node.swarm.manifest_files import load_manifest

    torch.set_num_threads(threads)
    manifest = load_manifest(manifest_path)
    spec = manifest.expert_for_cluster(CLUSTER)
    train, heldout = prepare_swarm_data(manifest, Path(cache)).expert_data(CLUSTER)
    trainer = ExpertTrainer(expert_config(spec, manifest), train, build_text_encoder(manifest.text_encoder),
                            seed=seed + CLUSTER, cluster=CLUSTER, heldout=heldout, **training_options(spec))
    start = time.perf_counter()
    while trainer.step < steps:
        trainer.train_steps(min(20, steps - trainer.step))
        print(json.dumps({"step": trainer.step}), flush=True)
    seconds = time.perf_counter() - start
    images = steps * trainer.batch_size
    print(json.dumps({"bare": {"steps": steps, "images": images, "seconds": round(seconds, 3),
                               "images_per_s": round(images / seconds, 3)}}), flush=True)


# ---- one repeat ----------------------------------------------------------------------------------------------
class Swarm:
    """A bootstrap peer and a mirror peer of a fresh swarm derived from `base`."""

    def __init__(self, base: str, root: Path, name: str, cache: Path):
        from bootstrap.create import create_swarm

        self.root, self.cache = root, cache
        root.mkdir(parents=True)
        self.manifest_path = root / f"{name}.yaml"
        create_swarm(base, self.manifest_path, name=name)
        self.boot = BootstrapProcess(self.manifest_path, root / "boot.key")
        mirror_dir = self.data_dir("mirror")
        self.mirror = NodeProcess(self.manifest_path, mirror_dir, self.boot.maddrs, "--job", "expert/1",
                                  "--max-steps", "0", "--threads", "1")
        self.mirror.wait_for(lambda line: "still serving" in line, timeout=180)

    def data_dir(self, name: str) -> Path:
        """A fresh node folder holding a copy of the cluster split (so no node re-clusters the data)."""
        path = self.root / name
        shutil.copytree(self.cache, path / "cache")
        return path

    def mirrored(self) -> int:
        """Checkpoints of JOB the mirror peer fetched, checked and now serves."""
        return sum(1 for line in self.mirror.output if f"mirroring {JOB} step" in line)

    def stop(self) -> None:
        for process in (self.mirror, self.boot):
            process.stop()


def run_swarm_node(swarm: Swarm, steps: int, threads: int, seed: int, on_step) -> dict:
    node = NodeProcess(swarm.manifest_path, swarm.data_dir("node"), swarm.boot.maddrs, "--job", JOB,
                       "--max-steps", str(steps), "--exit-when-done", "--threads", str(threads),
                       "--seed", str(seed))
    try:
        def summary_or_step(line: str) -> bool:
            found = STEP_LINE.search(line)
            if found and "[training]" in line:
                on_step(int(found.group(1)))
            return line.startswith('{"node_summary"')
        line = node.wait_for(summary_or_step, timeout=120 + 5 * steps)
    finally:
        node.stop(timeout=60)
    return json.loads(line)["node_summary"]


def run_bare(swarm: Swarm, steps: int, threads: int, seed: int, on_step) -> dict:
    worker = LineProcess([sys.executable, __file__, "--bare-worker", "--manifest", str(swarm.manifest_path),
                          "--cache", str(swarm.cache), "--steps", str(steps), "--threads", str(threads),
                          "--seed", str(seed)], env=child_env())
    try:
        def result_or_step(line: str) -> bool:
            if line.startswith('{"step"'):
                on_step(json.loads(line)["step"])
            return line.startswith('{"bare"')
        line = worker.wait_for(result_or_step, timeout=120 + 5 * steps)
    finally:
        worker.stop()
    return json.loads(line)["bare"]


def prepare_cache(base: str, cache: Path) -> None:
    from node.data.swarm_data import prepare_swarm_data
    from node.swarm.manifest_files import load_manifest

    prepare_swarm_data(load_manifest(base), cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both the node and the bare loop")
    parser.add_argument("--swarm", default="local", help="bundled swarm or manifest the benchmark swarms derive from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_worker:
        bare_worker(args.manifest, args.cache, args.steps, args.threads, args.seed)
        return

    console = Console(stderr=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()
    runs = {"swarm": [], "bare": []}
    mirrored = []
    with tempfile.TemporaryDirectory(prefix="ddm-node-overhead-") as tmp, \
            Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                     TimeElapsedColumn(), console=console) as progress:
        root, cache = Path(tmp), Path(tmp) / "cache"
        setup = progress.add_task("preparing the data split", total=None)
        prepare_cache(args.swarm, cache)
        progress.remove_task(setup)
        for repeat in range(args.repeats):
            starting = progress.add_task(f"repeat {repeat + 1}: starting bootstrap and mirror peers", total=None)
            swarm = Swarm(args.swarm, root / f"r{repeat}", f"overhead-r{repeat}-{os.getpid()}", cache)
            progress.remove_task(starting)
            try:
                order = ("swarm", "bare") if repeat % 2 == 0 else ("bare", "swarm")
                for kind in order:
                    task = progress.add_task(f"repeat {repeat + 1}: {kind}", total=args.steps)
                    run = run_swarm_node if kind == "swarm" else run_bare
                    result = run(swarm, args.steps, args.threads, args.seed,
                                 lambda step, task=task: progress.update(task, completed=step))
                    progress.update(task, completed=args.steps)
                    runs[kind].append(result)
                mirrored.append(swarm.mirrored())
            finally:
                swarm.stop()
    load_after = os.getloadavg()

    ratios = [s["images_per_s"] / b["images_per_s"] for s, b in zip(runs["swarm"], runs["bare"])]
    median = {kind: statistics.median(r["images_per_s"] for r in results) for kind, results in runs.items()}
    checkpoint_share = statistics.median(s["checkpoint_seconds"] / s["seconds"] for s in runs["swarm"])
    # the checkpoints' own work (evaluation, writes, announcement), mostly off the training thread
    work_share = statistics.median(s.get("checkpoint_work_seconds", 0.0) / s["seconds"] for s in runs["swarm"])
    table = Table(title=f"node in a swarm vs. bare ExpertTrainer: {args.steps} steps, {args.threads} thread(s), "
                        f"load {load_before[0]:.2f} -> {load_after[0]:.2f}")
    for column in ("repeat", "swarm img/s", "bare img/s", "ratio", "checkpoints", "ckpt s", "mirrored"):
        table.add_column(column, justify="right")
    for i, (s, b) in enumerate(zip(runs["swarm"], runs["bare"])):
        table.add_row(str(i + 1), f"{s['images_per_s']:.1f}", f"{b['images_per_s']:.1f}", f"{ratios[i]:.3f}",
                      str(s["checkpoints"]), f"{s['checkpoint_seconds']:.2f}", str(mirrored[i]))
    Console().print(table)
    print(json.dumps({"benchmark": "node_overhead", "swarm": args.swarm, "steps": args.steps,
                      "threads": args.threads, "repeats": args.repeats,
                      "batch": runs["swarm"][0]["images"] // max(1, runs["swarm"][0]["steps"]),
                      "images_per_s": {k: round(v, 2) for k, v in median.items()},
                      "ratio": round(statistics.median(ratios), 4), "ratios": [round(r, 4) for r in ratios],
                      "checkpoint_share": round(checkpoint_share, 4), "checkpoint_work_share": round(work_share, 4),
                      "checkpoints_per_run": runs["swarm"][0]["checkpoints"], "mirrored_per_run": mirrored,
                      "load_avg": [round(load_before[0], 2), round(load_after[0], 2)], "target": 0.97}))


if __name__ == "__main__":
    main()
