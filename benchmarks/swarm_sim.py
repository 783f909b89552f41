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
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.simulation.events import NetworkModel  # noqa: E402
from benchmarks.simulation.run import SimConfig, simulate  # noqa: E402

HOUR = 3600.0


def grid(kind: str) -> Dict[str, SimConfig]:
    """name -> configuration. 'scale': N x K at a 2 h half-life; 'churn': half-lives at one size;
    'check': the real runs' setups."""
    runs: Dict[str, SimConfig] = {}
    ks = (8, 64, 256, 1024) if kind == "full" else (8, 64)
    sizes = {10000: 12.0, 1000: 30.0} if kind == "full" else {1000: 20.0}  # the largest first: it runs longest
    for n, minutes in sizes.items():
        for k in ks:
            if n == 10000 and k != 64:
                continue  # N = 10,000 costs ~10 CPU-minutes per run here (each join reads all N claims)
            runs[f"scale/n{n}/k{k}"] = SimConfig(n=n, k=k, minutes=minutes, half_life_s=2 * HOUR,
                                                 warmup_s=480 if n == 10000 else 600)
    for half_life in (0.5, 2.0, 6.0):
        runs[f"churn/n1000/k64/h{half_life:g}"] = SimConfig(n=1000, k=64, minutes=45 if kind == "full" else 20,
                                                            half_life_s=half_life * HOUR, warmup_s=600)
    runs["orphans/n72/k64/h0.5"] = SimConfig(n=72, k=64, minutes=60, half_life_s=0.5 * HOUR, warmup_s=600)
    local = NetworkModel(rtt_s=0.015, rtt_sigma=0.5, hops=1, loss=0.0)  # 127.0.0.1: swarm_scale's lookups take 5-35 ms
    runs["check/churn-py"] = SimConfig(n=8, k=2, minutes=16.0, lease_s=5.0, up_s=(60.0, 180.0), down_s=(10.0, 60.0),
                                       crash_share=0.3, fresh_share=0.3, checkpoint_every_steps=40,
                                       checkpoint_s=10.0, resume_s=3.0, join_s=8.0, join_window_s=5.0,
                                       network=local, warmup_s=60.0, sample_s=3.0)
    for n in (16, 48):
        runs[f"check/scale-n{n}"] = SimConfig(n=n, k=8, minutes=10.0, join_s=0.6 if n == 16 else 1.1,
                                              network=local, warmup_s=120.0)
    return runs


def _run(name: str, config: SimConfig) -> dict:
    started = time.perf_counter()
    result = simulate(config)
    return {"name": name, **result, "wall_s": round(time.perf_counter() - started, 1)}


def plots(results: Dict[str, dict], out: Path) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in sorted(results.items()):
        if name.startswith(("churn/", "orphans/", "scale/n10000", "check/churn-py")):
            ax.plot([t / 60 for t in r["series"]["t"]], r["series"]["coverage"], label=name, lw=1)
    ax.set(xlabel="simulated minutes", ylabel="share of jobs with a live claim", title="Coverage under churn",
           ylim=(0, 1.02))
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "swarm_sim_coverage.png", dpi=120)
    written.append(str(out / "swarm_sim_coverage.png"))

    scale = [r for n, r in results.items() if n.startswith("scale/")]
    for key, label, filename in (("full_coverage_s", "seconds until every job has a trainer", "swarm_sim_full_coverage.png"),
                                 ("ops_per_peer_min", "DHT operations per peer per minute", "swarm_sim_ops.png"),
                                 ("kbytes_per_peer_min", "kB per peer per minute (DHT payload)", "swarm_sim_bytes.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for n in sorted({r["n"] for r in scale}):
            points = sorted((r["k"], r[key]) for r in scale if r["n"] == n and r[key] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=f"N = {n}")
        ax.set(xscale="log", yscale="log", xlabel="K (clusters)", ylabel=label, title=label + " vs. K")
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        written.append(str(out / filename))
    plt.close("all")
    return written


def table(results: Dict[str, dict]) -> Table:
    t = Table(title="swarm simulation")
    for column in ("run", "N", "K", "full cover s", "cover mean/min", "takeover crash/clean s (median)",
                   "claim s", "ops/peer/min", "kB/peer/min", "best obtainable", "wall s"):
        t.add_column(column)
    for name, r in sorted(results.items()):
        t.add_row(name, str(r["n"]), str(r["k"]), str(r["full_coverage_s"]),
                  f"{r['coverage_mean']}/{r['coverage_min']}",
                  f"{r['takeover_crash_s']['median']}/{r['takeover_clean_s']['median']}",
                  str(r["claim_s"]["median"]), str(r["ops_per_peer_min"]), str(r["kbytes_per_peer_min"]),
                  str(r["obtainable_best_share"]), str(r["wall_s"]))
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
            progress.console.print(f"{result['name']}: full coverage {result['full_coverage_s']} s, "
                                   f"coverage {result['coverage_mean']}, {result['ops_per_peer_min']} ops/peer/min "
                                   f"({result['wall_s']} s)")
            progress.advance(task)
    report(console, results, args)


def markdown(results: Dict[str, dict]) -> str:
    """The scale table for BENCHMARKS.md."""
    def cell(value) -> str:
        return "-" if value is None else str(value)
    lines = ["| run | N | K | half-life | full coverage (s) | coverage mean / min | takeover after crash / clean leave, "
             "median (s) | claim procedure, median (s) | DHT ops / peer / min | find RPCs / peer / min | "
             "kB / peer / min | best checkpoint servable |", "|" + "---|" * 12]
    for name, r in sorted(results.items()):
        lines.append("| " + " | ".join(cell(v) for v in (
            name, r["n"], r["k"], f"{r['half_life_min']:g} min" if r["half_life_min"] else "-", r["full_coverage_s"],
            f"{r['coverage_mean']} / {r['coverage_min']}",
            f"{cell(r['takeover_crash_s']['median'])} / {cell(r['takeover_clean_s']['median'])}",
            r["claim_s"]["median"], r["ops_per_peer_min"], r["rpcs_per_peer_min"], r["kbytes_per_peer_min"],
            r["obtainable_best_share"])) + " |")
    return "\n".join(lines) + "\n"


def report(console: Console, results: Dict[str, dict], args: argparse.Namespace) -> None:
    console.print(table(results))
    (args.out / "swarm_sim.md").write_text(markdown(results))
    written = plots(results, args.out)
    summary = {name: {k: v for k, v in r.items() if k not in ("series",)} for name, r in results.items()}
    print(json.dumps({"benchmark": "swarm_sim", "grid": args.grid, "plots": written, "runs": summary}))


if __name__ == "__main__":
    main()
