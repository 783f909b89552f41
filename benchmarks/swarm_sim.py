"""Internet scale, simulated: the node's claim, lease, takeover, mirror and ranking rules against a model DHT.

    python benchmarks/swarm_sim.py [--grid full|small] [--workers 2] [--out benchmarks/results]

A discrete-event simulation (`benchmarks/simulation/`): N peers over K clusters (K + 1 jobs with
the router), each doing what `SwarmNode` does, with the rules imported from the node
(`choose_job`, `should_move`, `keep_previous_job`, `job_after_lost_race`, `next_move_streak`,
`claim_expiry`, the announcer's `provider_due`/`record_due`, `rank`) and the manifest's `Timing`
(T = lease_s, claims expire after lease_expiry_s = 3T). The DHT is a model: hivemind's record
semantics, per-operation latency of `hops` lognormal round trips, 1 % of operations lost, record
sizes from real signed records. Peers churn with exponential lifetimes (half-lives 30 min to 6 h).

Measured per run: seconds until every job has a live claim (from the first arrival, the first N
arriving over 60 s); coverage over time and its mean/min in steady state; takeover of an orphaned
job (from its last trainer leaving to a new live claim; crashes and clean leaves apart); each
node's claim procedure; DHT operations, find RPCs (operations x min(N, k=20)) and bytes per peer per
minute, by purpose; the share of jobs whose best checkpoint some live peer can serve.

Also a check against the real runs this machine hosts: `benchmarks/churn.py`'s churn (8 nodes,
T = 5 s, 15 min; results/churn.json) replayed in the simulation, and the figures of
`benchmarks/swarm_scale.py` at N = 16/48 that the simulation also produces. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.simulation.events import NetworkModel  # noqa: E402
from benchmarks.simulation.run import SimConfig, simulate  # noqa: E402

HOUR = 3600.0


def scale_cell(n: int, k: int, half_life_h: float, minutes_floor: float) -> SimConfig:
    """One cell of the N x K x half-life grid, as short as its figures allow: the first N arrive over
    60 s and each spends a claim procedure (K + 1 sequential reads, `hops` round trips each) before
    its claim lands, resumes, and announces a first checkpoint (300 s); costs are measured over the 3
    minutes after that (the mirror may still be filling at large K: `mirror_fresh_share`); then two orphan probes (every
    trainer of one job crashes; of another, leaves cleanly) and time for their takeover, which takes a
    mover's claim procedure again."""
    hops = NetworkModel.internet(n).hops
    claim_s = (k + 1) * hops * 0.08 * 1.2 + 15  # lognormal(0.6) has mean 1.2x its median
    ready = 60 + claim_s + 15  # the last of the first N has claimed and resumed
    warmup = 60 * math.ceil((ready + 300 + 60) / 60)  # then every trainer has announced a checkpoint (every 300 s)
    probe = warmup + 180  # costs: the 3 minutes before the probes
    end = probe + 30 + 300  # 5 minutes for the takeovers (one that takes longer is reported as not done)
    return SimConfig(n=n, k=k, minutes=max(minutes_floor, math.ceil(end / 60)), half_life_s=half_life_h * HOUR,
                     warmup_s=warmup, probes=((probe, "crash"), (probe + 30, "clean")))


def grid(kind: str) -> Dict[str, SimConfig]:
    """name -> configuration. 'scale': N x K x half-life; 'check': the real runs' setups; 'orphans':
    about one trainer per job, where churn itself orphans jobs."""
    runs: Dict[str, SimConfig] = {}
    ks = (8, 64, 256, 1024) if kind == "full" else (8, 64)
    sizes = {10000: 0.0, 1000: 20.0} if kind == "full" else {1000: 10.0}  # N = 1,000: at least 20 simulated minutes
    for n, floor in sizes.items():  # the largest first: they run longest
        for k in sorted(ks, reverse=True):
            for half_life in (0.5, 6.0):
                runs[f"scale/n{n}/k{k}/h{half_life:g}"] = scale_cell(n, k, half_life, floor)
    runs["orphans/n72/k64/h0.5"] = SimConfig(n=72, k=64, minutes=60, half_life_s=0.5 * HOUR, warmup_s=600)
    local = NetworkModel(rtt_s=0.015, rtt_sigma=0.5, hops=1, loss=0.0)  # 127.0.0.1: swarm_scale's lookups take 5-35 ms
    runs["check/churn-py"] = SimConfig(n=8, k=2, minutes=16.0, lease_s=5.0, up_s=(60.0, 180.0), down_s=(10.0, 60.0),
                                       crash_share=0.3, fresh_share=0.3, checkpoint_every_steps=40,
                                       checkpoint_s=10.0, resume_s=3.0, join_s=8.0, join_window_s=5.0,
                                       network=local, warmup_s=60.0, sample_s=3.0)
    for n in (16, 48):
        runs[f"check/scale-n{n}"] = SimConfig(n=n, k=8, minutes=10.0, join_s=0.6 if n == 16 else 1.1,
                                              network=local, warmup_s=120.0,
                                              probes=((240.0, "crash"), (270.0, "clean")))
    return runs


def _run(name: str, config: SimConfig) -> dict:
    started = time.perf_counter()
    result = simulate(config)
    return {"name": name, **result, "wall_s": round(time.perf_counter() - started, 1)}


def _median(values: List[float]) -> Optional[float]:
    return round(statistics.median(values), 1) if values else None


def _probe(r: dict, how: str) -> Optional[float]:
    """The orphan probe's takeover (s); None if none ran or it was not taken over by the end."""
    return _median(r.get(f"probe_{how}_s") or [])


def plots(results: Dict[str, dict], out: Path) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    scale = {name: r for name, r in results.items() if name.startswith("scale/")}
    sizes = sorted({r["n"] for r in scale.values()})
    fig, axes = plt.subplots(1, max(1, len(sizes)), figsize=(6 * max(1, len(sizes)), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for name, r in sorted(scale.items(), key=lambda item: (item[1]["k"], item[1]["half_life_min"])):
            if r["n"] == n:
                ax.plot([t / 60 for t in r["series"]["t"]], r["series"].get("churn_coverage", r["series"]["coverage"]),
                        label=f"K = {r['k']}, half-life {r['half_life_min']:g} min", lw=1,
                        ls="-" if r["half_life_min"] <= 30 else "--")
        ax.set(xlabel="simulated minutes", ylabel="share of jobs with a live claim (probed jobs apart)",
               title=f"Coverage under churn, N = {n}", ylim=(0, 1.02))
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "swarm_sim_coverage.png", dpi=120)
    written.append(str(out / "swarm_sim_coverage.png"))

    figures = (("full_coverage_s", lambda r: r["full_coverage_s"], "seconds until every job has a trainer",
                "swarm_sim_full_coverage.png"),
               ("takeover", lambda r: _probe(r, "crash"), "takeover of an orphaned job after a crash (s)",
                "swarm_sim_takeover.png"),
               ("ops", lambda r: r["ops_per_peer_min"], "DHT operations per peer per minute", "swarm_sim_ops.png"),
               ("bytes", lambda r: r["kbytes_per_peer_min"], "kB per peer per minute (DHT payload)",
                "swarm_sim_bytes.png"))
    for _, value, label, filename in figures:
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in sizes:
            for half_life in sorted({r["half_life_min"] for r in scale.values()}):
                points = sorted((r["k"], value(r)) for r in scale.values()
                                if r["n"] == n and r["half_life_min"] == half_life and value(r) is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", ls="-" if half_life <= 30 else "--",
                            label=f"N = {n:,}, half-life {half_life:g} min")
        ax.set(xscale="log", yscale="log", xlabel="K (clusters)", ylabel=label, title=label + " vs. K")
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        written.append(str(out / filename))
    plt.close("all")
    return written


def _row(name: str, r: dict) -> List[str]:
    def cell(value) -> str:
        return "-" if value is None else (f"{value:,}" if isinstance(value, (int, float)) else str(value))
    crash_unresolved = len(r.get("probe_crash_s") or []) == 0 and bool(r.get("probes_unresolved"))
    return [name, cell(r["n"]), cell(r["k"]), f"{r['half_life_min']:g} min" if r["half_life_min"] else "-",
            cell(r["minutes"]), cell(r["full_coverage_s"]),
            f"{cell(r.get('churn_coverage_mean', r['coverage_mean']))} / {cell(r.get('churn_coverage_min', r['coverage_min']))}",
            f"{cell(_probe(r, 'crash')) if not crash_unresolved else 'not by the end'} / {cell(_probe(r, 'clean'))}",
            f"{cell(r['takeover_crash_s']['median'])} / {cell(r['takeover_clean_s']['median'])} "
            f"(n = {r['takeover_crash_s']['n']} / {r['takeover_clean_s']['n']})",
            cell(r["claim_s"]["median"]), cell(r["moves"]), cell(r["ops_per_peer_min"]), cell(r["kbytes_per_peer_min"]),
            cell(r.get("mirror_fresh_share")),
            cell(r["wall_s"])]


COLUMNS = ("run", "N", "K", "half-life", "sim min", "full coverage (s)", "coverage mean / min",
           "probe takeover crash / clean (s)", "churn takeovers crash / clean, median (s)", "claim procedure median (s)",
           "moves", "DHT ops / peer / min", "kB / peer / min", "mirror holds (share of best blobs)", "wall (s)")


def table(results: Dict[str, dict]) -> Table:
    t = Table(title="swarm simulation")
    for column in COLUMNS:
        t.add_column(column)
    for name, r in sorted(results.items()):
        t.add_row(*_row(name, r))
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("full", "small"), default="full")
    parser.add_argument("--only", default="", help="run only the configurations whose name starts with this")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--replot", type=Path, nargs="*", default=None,
                        help="simulate nothing: table, plots and JSON line from these swarm_sim_runs.jsonl files")
    args = parser.parse_args()
    console, runs = Console(stderr=True), {n: c for n, c in grid(args.grid).items() if n.startswith(args.only)}
    args.out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, dict] = {}
    if args.replot is not None:
        for path in args.replot:
            for line in path.read_text().splitlines():
                result = json.loads(line)
                results[result["name"]] = result
        return report(console, results, args)
    lines = args.out / "swarm_sim_runs.jsonl"
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress, \
            ProcessPoolExecutor(args.workers) as pool:
        task = progress.add_task("simulating", total=len(runs))
        futures = {pool.submit(_run, name, config): name for name, config in runs.items()}
        for future in as_completed(futures):
            result = future.result()
            results[result["name"]] = result
            with lines.open("a") as f:
                f.write(json.dumps(result) + "\n")
            progress.console.print(f"{result['name']}: full coverage {result['full_coverage_s']} s, coverage "
                                   f"{result['churn_coverage_mean']}, takeover crash/clean {result['probe_crash_s']}/"
                                   f"{result['probe_clean_s']} s, {result['ops_per_peer_min']} ops/peer/min "
                                   f"({result['wall_s']} s wall)")
            progress.advance(task)
    report(console, results, args)


def markdown(results: Dict[str, dict]) -> str:
    """The scale table for BENCHMARKS.md."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, r in sorted(results.items(), key=lambda item: (item[0].split("/")[0], item[1]["n"], item[1]["k"],
                                                             item[1]["half_life_min"] or 0)):
        lines.append("| " + " | ".join(_row(name, r)) + " |")
    return "\n".join(lines) + "\n"


def report(console: Console, results: Dict[str, dict], args: argparse.Namespace) -> None:
    console.print(table(results))
    (args.out / "swarm_sim.md").write_text(markdown(results))
    written = plots(results, args.out)
    summary = {name: {k: v for k, v in r.items() if k not in ("series",)} for name, r in results.items()}
    print(json.dumps({"benchmark": "swarm_sim", "grid": args.grid, "plots": written, "runs": summary}))


if __name__ == "__main__":
    main()
