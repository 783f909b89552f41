"""`ddm-swarm demo`: a whole swarm on this machine, on the embedded default, in minutes on a CPU.

It starts a bootstrap peer and one node process per job (K experts and the router) on 127.0.0.1,
lets them claim jobs and train for a bounded time while a live table shows the swarm, assembles
the ensemble from the swarm like any generator would, writes a grid of the digits 0-9 to a PNG,
prints the conditional accuracy measured by the offline digit classifier, and stops every process
it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from node.cli.app import DeviceOption, app, checked_device, console, fail, setup_logging
from node.errors import NodeError
from protocol.identity import Identity
from protocol.manifest import SwarmManifest
from protocol.records import SERVING_STATES


@dataclass
class DemoResult:
    grid: Path
    accuracy: Dict[str, float]
    seconds: float
    jobs: List[dict]


class Processes:
    """Child processes in their own sessions, logged to files, all stopped on exit."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: List[subprocess.Popen] = []

    def start(self, name: str, args: List[str]) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
        log = open(self.log_dir / f"{name}.log", "w")
        child = subprocess.Popen([sys.executable, "-m", "node.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                 preexec_fn=_stop_with_parent)
        self.children.append(child)
        return child

    def stop_all(self, grace_s: float = 20.0) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def _stop_with_parent() -> None:
    """In the child, before exec: on Linux, receive SIGTERM when the demo dies, even by SIGKILL, so
    that no node outlives it. Elsewhere the demo's own signal handling has to do."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_demo's `finally`, which stops the children


def _bootstrap_maddr(log: Path, child: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise NodeError(f"the bootstrap peer exited; see {log}")
        for line in log.read_text().splitlines():
            if "--initial-peers" in line:
                return line.split()[-1]
        time.sleep(0.3)
    raise NodeError(f"the bootstrap peer did not start in {timeout:.0f} s; see {log}")


def run_demo(manifest: SwarmManifest, swarm: str, out: Path, *, minutes: float, router_share: float,
             per_digit: int, console: Console, device: str = "auto") -> DemoResult:
    from node.generator.client import assemble_ensemble
    from node.swarm.membership import SwarmMembership
    from node.swarm.status import collect_status, status_tables

    started = time.monotonic()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    processes = Processes(out / "logs")
    jobs = manifest.jobs
    watcher: Optional[SwarmMembership] = None
    try:
        shards = ["--shards", str(out / "shards")] if manifest.dataset.kind == "shards" else []
        boot = processes.start("bootstrap", ["bootstrap", "--swarm", swarm, "--host", "127.0.0.1", "--port", "0",
                                             "--identity", str(out / "bootstrap.key"), *shards])
        peer = _bootstrap_maddr(out / "logs" / "bootstrap.log", boot)
        console.print(f"bootstrap peer up: {peer}")
        for index, job in enumerate(jobs):
            budget = minutes * (router_share if job.is_router else 1.0)
            processes.start(f"node-{index}", ["node", "--swarm", swarm, "--initial-peers", peer, "--host", "127.0.0.1",
                                              "--data-dir", str(out / f"node-{index}"), "--max-minutes", f"{budget:.3f}",
                                              "--threads", "1", "--device", device, "--job", str(job)])  # its budget is its job's
            time.sleep(0.5)  # staggered starts: each node sees the claims of the ones before
        console.print(f"{len(jobs)} nodes started ({', '.join(map(str, jobs))}); logs in {out / 'logs'}")
        watcher = SwarmMembership(manifest, Identity.generate(), initial_peers=[peer], client_mode=True)
        progress = Progress(TextColumn("training"), BarColumn(), TimeRemainingColumn(), console=console)
        task = progress.add_task("train", total=60 * minutes)
        train_started = time.monotonic()
        snapshot: dict = {}
        with Live(console=console, refresh_per_second=1) as live:
            while True:
                elapsed = time.monotonic() - train_started
                snapshot = collect_status(watcher)
                progress.update(task, completed=min(elapsed, 60 * minutes))
                live.update(Group(progress, *status_tables(snapshot)[:1]))
                online = [p for p in snapshot["peers"] if p["role"] == "trainer" and p["state"] in SERVING_STATES]
                done = elapsed > 60 * minutes and all(j["latest_step"] is not None for j in snapshot["jobs"]) \
                    and not any(j["claims"] for j in snapshot["jobs"])
                if done or elapsed > 60 * minutes + 180 or (not online and elapsed > 120):
                    break
                time.sleep(3)
        watcher.shutdown()
        watcher = None
        for child, job in zip(processes.children[1:], jobs):
            if child.poll() not in (None, 0):
                console.print(f"[yellow]warning:[/] the node of {job} exited with {child.returncode}; "
                              f"see {out / 'logs'}")
        console.print("assembling the ensemble from the swarm …")
        ensemble = assemble_ensemble(manifest, initial_peers=[peer], cache_dir=out / "client-cache")
        console.print("ensemble assembled; stopping the swarm so that sampling has the cores")
        processes.stop_all()
        evaluate = _evaluate_captions if manifest.dataset.kind == "shards" else _evaluate
        grid, accuracy = evaluate(ensemble, out, per_digit, console, device)
    finally:
        if watcher is not None:  # its DHT process would keep this one from exiting
            watcher.shutdown()
        processes.stop_all()
    return DemoResult(grid, accuracy, time.monotonic() - started, snapshot.get("jobs", []))


def _evaluate(ensemble, out: Path, per_digit: int, console: Console, device: str):
    import torch

    from ddm_models.captions import prompt_for_digit
    from ddm_models.images import save_grid
    from ddm_models.metrics import conditional_accuracy, load_or_train_classifier

    prompts = [prompt_for_digit(d) for d in range(10) for _ in range(per_digit)]
    labels = torch.tensor([d for d in range(10) for _ in range(per_digit)])
    classifier = load_or_train_classifier()
    accuracy, grid = {}, out / "demo-grid.png"
    for routing in ("top2", "top1", "full"):
        images = ensemble.sample(prompts, routing=routing, seed=0, device=device).images.float().cpu()
        accuracy[routing] = conditional_accuracy(classifier, images, labels)
        if routing == "top2":
            save_grid(images, per_digit, grid, scale=3)
    (out / "demo-result.json").write_text(json.dumps({"accuracy": accuracy, "experts": ensemble.describe()}, indent=2))
    return grid, accuracy


def _evaluate_captions(ensemble, out: Path, per_prompt: int, console: Console, device: str):
    """A swarm trained on captioned images: prompts are captions of real images of every cluster;
    the figure is how often the real image nearest to a sample is the one prompted (see
    `ddm_models.metrics.prompt_agreement`), per routing. References: the data the demo's bootstrap
    seeded (its shard folder)."""
    import torch

    from ddm_models.captioned_data import ShardFile, load_captioned_shards
    from ddm_models.images import save_prompt_grid
    from ddm_models.metrics import prompt_agreement

    spec = ensemble.manifest.dataset
    files = [ShardFile(out / "shards" / f"{s.blob.sha256}.tar", sha256=s.blob.sha256, cluster=c.cluster)
             for c in spec.clusters for s in c.train]
    references = load_captioned_shards(files, spec.image_size, spec.channels, out / "client-cache" / "decoded")
    captions = references.captions_at(list(range(len(references))))
    unique = sorted(set(captions))
    generator = torch.Generator().manual_seed(0)
    picked = [unique[i] for i in torch.randperm(len(unique), generator=generator)[:8 * per_prompt].tolist()]
    images = references.images_at(slice(0, len(references)))
    figures, grid = {}, out / "demo-grid.png"
    for routing in ("top2", "top1", "full"):
        result = ensemble.sample(picked, routing=routing, seed=0, device=device)
        agreement = prompt_agreement(result.images.float().cpu(), picked, images, captions)
        figures.update({f"{routing} {name}": value for name, value in agreement.items() if not name.startswith("chance")})
        figures.setdefault("chance top1", agreement["chance_top1"])
        figures.setdefault("chance top5", agreement["chance_top5"])
        if routing == "top2":
            save_prompt_grid(result.images[:16].float().cpu(), picked[:16], grid, scale=3)
    console.print(f"{len(picked)} prompts, {len(references)} reference images")
    (out / "demo-result.json").write_text(json.dumps({"agreement": figures, "prompts": picked,
                                                      "experts": ensemble.describe()}, indent=2))
    return grid, figures


@app.command()
def demo(
    minutes: float = typer.Option(6.0, help="Training time of the expert nodes (the whole demo takes ~3 min more)."),
    out: Path = typer.Option(Path("ddm-demo"), help="Folder for the nodes' data, logs and the result grid."),
    per_digit: int = typer.Option(8, help="Samples per digit (digits), or rows of 8 prompts (emoji), to measure."),
    router_share: float = typer.Option(0.3, help="The router node trains this fraction of the time."),
    swarm: str = typer.Option("local", "--swarm", "-s", help="Bundled swarm name or manifest file."),
    device: str = DeviceOption,
) -> None:
    """Run a whole swarm on this machine on the embedded default, then generate digits from it."""
    from rich.table import Table

    from node.swarm.manifest_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        device = checked_device(device)
        if manifest.dataset.kind not in ("embedded-digits", "small-digits", "shards"):
            raise NodeError("the demo runs on the bundled swarms: 'local' (digits) or 'emoji' (captioned colour images)")
        result = run_demo(manifest, swarm, out, minutes=minutes, router_share=router_share, per_digit=per_digit,
                          console=console, device=device)
    except Exception as error:
        fail(error)
    captioned = manifest.dataset.kind == "shards"
    table = Table(title="text-image agreement (the nearest real image is the one prompted)" if captioned else
                  "conditional accuracy (the digit classifier agrees with the prompt)")
    table.add_column("routing")
    table.add_column("agreement" if captioned else "accuracy", justify="right")
    for routing, value in result.accuracy.items():
        table.add_row(routing, f"{value:.3f}")
    results = Console()
    results.print(table)
    what = "prompts and images" if captioned else "the digits 0-9"
    results.print(f"grid of {what} (top-2 routing): [bold]{result.grid}[/]")
    results.print(f"demo finished in {result.seconds / 60:.1f} minutes; every process it started is stopped")
