"""Churn soak: 8 real nodes join and leave a swarm at random for 15 minutes; nothing may be lost.

    python benchmarks/churn.py [--minutes 15] [--nodes 8] [--seed 0] [--kill-share 0.3] [--lease-s 5]

A bootstrap peer, an observer (tests/peers/dht_peer.py) and `--nodes` `ddm-swarm node` processes
run on 127.0.0.1 on the tiny test swarm (tests/manifests/tiny.yaml: two 8x8 experts and a router,
checkpoints every 40 steps) with leases of `--lease-s` (claims expire after 3x that). Node 0 lives
throughout; every other node stays up for a random `--up-s` span, then leaves by SIGTERM (or, with
probability `--kill-share`, by SIGKILL of its process group, as a crash), stays away a random
`--down-s` span and comes back: with its old data folder (a restart) or, with probability
`--fresh-share`, as a newcomer with a new identity. Measured while the churn lasts (after a warm-up
in which every job gets a trainer and a checkpoint):
- coverage: the fraction of samples (every `--sample-s` s) in which each job has a live claim in
  the DHT, as an observer reads it (target >= 0.9), and each job's longest uncovered span;
- no checkpoint lost: each job's best announced step (max over its records) never goes backwards
  and, every `--fetch-every-s` s and at the end, the blob of that best record is downloaded from
  the swarm's providers and verified (sha256), into an empty store each time;
- memory: RSS of node 0's process (and of its process tree: DHT process, p2pd) every 10 s; the
  slope over the second half of the run must not show growth without bound (verdict: the node
  process grew by < 10% of its mean RSS over that half).
Shows progress while it runs; prints, last, one JSON line with the figures. Not part of CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.table import Table  # noqa: E402

from node.swarm.leases import live_claimers  # noqa: E402
from node.swarm.manifest_files import write_manifest_file  # noqa: E402
from protocol.manifest import SwarmManifest  # noqa: E402
from protocol.records import decode_record  # noqa: E402
from tests.swarm_harness import BootstrapProcess, DhtPeer, NodeProcess  # noqa: E402

COVERAGE_TARGET = 0.9


class ChurnSlot:
    """One node's seat in the swarm: up, leave (SIGTERM or SIGKILL), away, back (restart or newcomer)."""

    def __init__(self, index: int, args: argparse.Namespace, manifest: Path, peers: list, workdir: Path):
        self.index, self.args, self.manifest, self.peers, self.workdir = index, args, manifest, peers, workdir
        self.rng = random.Random(args.seed * 1000 + index)
        self.identity, self.node = 0, None
        self.counts = {"joins": 0, "sigterm": 0, "sigkill": 0, "newcomers": 0, "unexpected_exits": 0,
                       "moves": 0, "handed_over": 0, "left_unhanded": 0}
        self.exits: list = []  # (slot, return code, last lines) of nodes that ended on their own
        self.state = "down"

    @property
    def data_dir(self) -> Path:
        return self.workdir / f"node{self.index}-id{self.identity}"

    def tally(self) -> None:
        """Count what the node that just ended said: job moves, hand-overs on leaving."""
        output = "".join(self.node.output)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        (logs / f"node{self.index}-join{self.counts['joins']}.log").write_text(output)
        text = " ".join(output.split())
        for key, phrase in (("moves", "has others: moving"), ("handed_over", "now: leaving"),
                            ("left_unhanded", "leaving while no other peer holds")):
            self.counts[key] += text.count(phrase)

    def start(self) -> None:
        self.node = NodeProcess(self.manifest, self.data_dir, self.peers, "--seed", str(self.index))
        self.counts["joins"] += 1
        self.state = "up"

    def churn(self, until: float, stop: threading.Event) -> None:
        """Leave and come back at random until `until` (monotonic) or `stop`."""
        while not stop.is_set() and time.monotonic() < until:
            if self._sleep_while_up(self.rng.uniform(*self.args.up_s), stop):
                return
            if self.rng.random() < self.args.kill_share:
                self.state = "killed"
                self.node.kill()
                self.counts["sigkill"] += 1
                self.tally()
            else:
                self.state = "leaving"
                self.node.stop(timeout=60)
                self.counts["sigterm"] += 1
                self.tally()
            self.state = "down"
            if stop.wait(self.rng.uniform(*self.args.down_s)) or time.monotonic() >= until:
                return
            if self.rng.random() < self.args.fresh_share:
                self.identity += 1
                self.counts["newcomers"] += 1
            self.start()

    def _sleep_while_up(self, seconds: float, stop: threading.Event) -> bool:
        """Wait `seconds`; a node that ends by itself meanwhile is counted and restarted. True: stop."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if stop.wait(1.0):
                return True
            if not self.node.alive():
                self.counts["unexpected_exits"] += 1
                self.exits.append((self.index, self.node.proc.returncode, "".join(self.node.output)[-600:]))
                self.tally()
                self.start()
        return False


class SwarmWatch:
    """What the observer sees of every job: live claims, the best announced checkpoint."""

    def __init__(self, observer: DhtPeer, manifest: SwarmManifest, store: Path):
        self.observer, self.store = observer, store
        self.jobs = manifest.jobs
        self.samples = 0
        self.covered = {job: 0 for job in self.jobs}
        self.claimers = {job: 0 for job in self.jobs}
        self.gap_since = {job: None for job in self.jobs}
        self.longest_gap_s = {job: 0.0 for job in self.jobs}
        self.best = {job: None for job in self.jobs}  # the best record seen now
        self.max_step = {job: -1 for job in self.jobs}
        self.regressions: list = []  # (job, seconds into the churn, best step now, best ever)
        self.unseen = {job: 0 for job in self.jobs}  # samples in which a job that had checkpoints showed none
        self.read_errors = 0
        self.fetches, self.fetch_failures, self.fetch_seconds = 0, [], []

    def _records(self, family: str, **extra) -> list:
        reply = self.observer.call("read", family=family, timeout=120, **extra)
        return [decode_record(bytes.fromhex(h)) for h in reply["records"]]

    def read(self) -> tuple:
        """(live claimers per job, best record per job), or None after a failed read."""
        try:
            holders = live_claimers(self._records("claims"), time.time())
            best = {}
            for job in self.jobs:
                records = (self._records("router") if job.is_router
                           else self._records("checkpoints", cluster=job.cluster))
                best[job] = max(records, key=lambda r: (r.step, -r.created_at), default=None)
        except Exception:  # noqa: BLE001 - a timed-out read is counted, not fatal
            self.read_errors += 1
            return None
        return holders, best

    def sample(self, since: float) -> None:
        """One sample of the churn phase (`since`: its start, monotonic)."""
        seen = self.read()
        if seen is None:
            return
        holders, best = seen
        self.samples += 1
        now = time.monotonic()
        for job in self.jobs:
            self.claimers[job] = len(holders.get(job, []))
            if self.claimers[job]:
                self.covered[job] += 1
                if self.gap_since[job] is not None:
                    self.longest_gap_s[job] = max(self.longest_gap_s[job], now - self.gap_since[job])
                    self.gap_since[job] = None
            elif self.gap_since[job] is None:
                self.gap_since[job] = now
            record = best[job]
            if record is None:
                self.unseen[job] += self.max_step[job] >= 0
                continue
            if record.step < self.max_step[job]:
                self.regressions.append((job, round(now - since, 1), record.step, self.max_step[job]))
            self.max_step[job] = max(self.max_step[job], record.step)
            self.best[job] = record

    def observe(self) -> None:
        """Read claims and checkpoints without counting (warm-up)."""
        seen = self.read()
        if seen is not None:
            holders, best = seen
            self.claimers = {job: len(holders.get(job, [])) for job in self.jobs}
            self.best = best
            for job, record in best.items():
                if record is not None:
                    self.max_step[job] = max(self.max_step[job], record.step)

    def close_gaps(self) -> None:
        now = time.monotonic()
        for job, since in self.gap_since.items():
            if since is not None:
                self.longest_gap_s[job] = max(self.longest_gap_s[job], now - since)

    def check_fetch(self) -> None:
        """Download the blob of each job's best record from the swarm and verify it."""
        for job, record in self.best.items():
            if record is None:
                continue
            self.fetches += 1
            reply = self.observer.call("fetch", timeout=150, store=str(self.store), sha256=record.blob.sha256,
                                       size=record.blob.size, chunks_sha256=record.blob.chunks_sha256, timeout_s=90)
            if reply.get("ok"):
                self.fetch_seconds.append(reply["seconds"])
            else:
                self.fetch_failures.append({"job": job, "step": record.step, "error": reply.get("error")})


def tree_rss_mib(pid: int) -> tuple:
    """(RSS of `pid`, RSS of `pid` and all its descendants), MiB, from /proc."""
    children: dict = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))

    def rss(one: int) -> float:
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    total, todo = 0.0, [pid]
    while todo:
        one = todo.pop()
        total += rss(one)
        todo += children.get(one, [])
    return rss(pid), total


def slope_mib_per_min(points: list) -> float:
    """Least-squares slope of [(seconds, MiB)] in MiB per minute."""
    if len(points) < 3:
        return 0.0
    t, y = np.array(points, dtype=float).T
    return float(np.polyfit(t / 60.0, y, 1)[0])


def churn_manifest(out: Path, lease_s: float) -> Path:
    data = yaml.safe_load((REPO / "tests" / "manifests" / "tiny.yaml").read_text())
    data["name"] = "tiny-churn"
    data["timing"]["lease_s"] = lease_s
    write_manifest_file(SwarmManifest.from_dict(data), out)
    return out


def progress_table(watch: SwarmWatch, slots: list, elapsed: float, total: float, rss: float) -> Table:
    table = Table(title=f"churn {elapsed / 60:4.1f}/{total / 60:g} min — nodes up "
                        f"{sum(s.state == 'up' for s in slots)}/{len(slots)} — node 0 RSS {rss:.0f} MiB")
    for column in ("job", "live claims", "coverage", "longest gap s", "best step", "regressions"):
        table.add_column(column, justify="left" if column == "job" else "right")
    for job in watch.jobs:
        share = watch.covered[job] / watch.samples if watch.samples else float("nan")
        table.add_row(job, str(watch.claimers[job]), f"{share:.3f}", f"{watch.longest_gap_s[job]:.0f}",
                      str(watch.max_step[job]), str(sum(r[0] == job for r in watch.regressions)))
    table.caption = " ".join(f"{s.index}:{s.state}" for s in slots)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=15.0, help="how long the churn lasts (after warm-up)")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-share", type=float, default=0.3, help="share of departures by SIGKILL")
    parser.add_argument("--fresh-share", type=float, default=0.3, help="share of returns as a new identity")
    parser.add_argument("--up-s", type=float, nargs=2, default=(60.0, 180.0))
    parser.add_argument("--down-s", type=float, nargs=2, default=(10.0, 60.0))
    parser.add_argument("--lease-s", type=float, default=5.0)
    parser.add_argument("--sample-s", type=float, default=3.0)
    parser.add_argument("--fetch-every-s", type=float, default=120.0)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()

    console = Console(stderr=True)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="ddm-churn-"))
    workdir.mkdir(parents=True, exist_ok=True)
    manifest_path = churn_manifest(workdir / "tiny-churn.yaml", args.lease_s)
    manifest = SwarmManifest.from_dict(yaml.safe_load(manifest_path.read_text()))
    boot = BootstrapProcess(manifest_path, workdir / "boot.key")
    observer = DhtPeer(manifest_path, boot.maddrs)
    slots = [ChurnSlot(i, args, manifest_path, boot.maddrs, workdir) for i in range(args.nodes)]
    watch = SwarmWatch(observer, manifest, workdir / "fetch-store")
    stop, threads, rss_points = threading.Event(), [], []
    warmup_started = time.monotonic()
    try:
        for slot in slots:  # staggered: 8 start-ups at once would starve the machine
            slot.start()
            time.sleep(5.0)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            watch.observe()
            if all(watch.claimers[j] and watch.best[j] is not None for j in watch.jobs):
                break
            time.sleep(args.sample_s)
        warmup_s = time.monotonic() - warmup_started
        console.print(f"warm-up done in {warmup_s:.0f} s: every job has a trainer and a checkpoint; churn begins")

        since = time.monotonic()
        total = 60 * args.minutes
        until = since + total
        threads = [threading.Thread(target=s.churn, args=(until, stop), daemon=True) for s in slots[1:]]
        for thread in threads:
            thread.start()
        next_fetch, next_rss, rss_now = since + args.fetch_every_s, since, 0.0
        live = Live(console=console, auto_refresh=False) if console.is_terminal else None
        last_line = since
        with live or contextlib.nullcontext():
            while time.monotonic() < until:
                watch.sample(since)
                now = time.monotonic()
                if now >= next_rss:
                    own, tree = tree_rss_mib(slots[0].node.proc.pid)
                    rss_points.append((now - since, own, tree))
                    rss_now, next_rss = own, now + 10.0
                if now >= next_fetch:
                    watch.check_fetch()
                    next_fetch = time.monotonic() + args.fetch_every_s
                table = progress_table(watch, slots, now - since, total, rss_now)
                if live is not None:
                    live.update(table, refresh=True)
                elif now - last_line >= 30:
                    console.print(table)
                    last_line = now
                time.sleep(max(0.0, args.sample_s - (time.monotonic() - now)))
        watch.close_gaps()
        stop.set()
        for thread in threads:
            thread.join(90)
        watch.observe()
        final_steps = {job: (watch.best[job].step if watch.best[job] else None) for job in watch.jobs}
        watch.check_fetch()  # the best checkpoints are still fetchable after the churn
        node0_alive = slots[0].node.alive()
        console.print(progress_table(watch, slots, time.monotonic() - since, total, rss_now))
    finally:
        stop.set()
        for slot in slots:
            if slot.node is not None:
                slot.node.kill()
                if slot.state == "up":  # the nodes that were still up at the end
                    slot.tally()
        observer.kill()
        boot.kill()

    print(json.dumps(figures(args, watch, slots, rss_points, final_steps, warmup_s, node0_alive)))


def figures(args, watch: SwarmWatch, slots: list, rss_points: list, final_steps: dict, warmup_s: float,
            node0_alive: bool) -> dict:
    counts = {key: sum(s.counts[key] for s in slots) for key in slots[0].counts}
    coverage = {job: round(watch.covered[job] / max(watch.samples, 1), 4) for job in watch.jobs}
    half = [p for p in rss_points if p[0] >= rss_points[-1][0] / 2] if rss_points else []
    own = [p[1] for p in rss_points]
    grew = (half[-1][1] - half[0][1]) if len(half) >= 2 else 0.0
    lost = [job for job in watch.jobs if final_steps[job] is not None and final_steps[job] < watch.max_step[job]]
    result = {
        "minutes": args.minutes, "nodes": args.nodes, "lease_s": args.lease_s, "seed": args.seed,
        "warmup_s": round(warmup_s, 1), **counts, "node0_alive": node0_alive,
        "samples": watch.samples, "read_errors": watch.read_errors,
        "coverage": coverage, "min_coverage": min(coverage.values()), "coverage_target": COVERAGE_TARGET,
        "longest_gap_s": {job: round(s, 1) for job, s in watch.longest_gap_s.items()},
        "best_step_final": final_steps, "best_step_max": watch.max_step,
        "regressions": watch.regressions, "unseen_samples": watch.unseen, "jobs_lost_at_end": lost,
        "fetch_checks": watch.fetches, "fetch_failures": watch.fetch_failures,
        "fetch_s_median": round(float(np.median(watch.fetch_seconds)), 2) if watch.fetch_seconds else None,
        "rss_node0_mib": {"first": round(own[0], 1), "last": round(own[-1], 1), "max": round(max(own), 1),
                          "mean": round(float(np.mean(own)), 1)} if own else None,
        "rss_tree0_mib_last": round(rss_points[-1][2], 1) if rss_points else None,
        "rss_slope_mib_per_min": {"all": round(slope_mib_per_min([(p[0], p[1]) for p in rss_points]), 2),
                                  "second_half": round(slope_mib_per_min([(p[0], p[1]) for p in half]), 2)},
        "rss_growth_second_half_mib": round(grew, 1),
        "unexpected_exit_tails": [{"slot": i, "rc": rc, "tail": tail} for i, rc, tail in
                                  (e for s in slots for e in s.exits)][:5],
    }
    result["rss_bounded"] = bool(own) and grew < 0.1 * result["rss_node0_mib"]["mean"]
    result["no_checkpoint_lost"] = not watch.regressions and not lost and not watch.fetch_failures
    result["ok"] = (node0_alive and result["min_coverage"] >= COVERAGE_TARGET and result["no_checkpoint_lost"]
                    and result["rss_bounded"])
    return result


if __name__ == "__main__":
    main()
