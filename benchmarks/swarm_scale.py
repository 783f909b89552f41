"""Swarm scale: join time, checkpoint visibility, `status` latency, lookup cost and memory at N peers.

    python benchmarks/swarm_scale.py [--sizes 4 16 48] [--plot benchmarks/swarm_scale.png]

A `ddm-swarm bootstrap` process, then lightweight peers added on 127.0.0.1 until the swarm holds
each N of `--sizes`. A lightweight peer is what a node is minus the training: a real hivemind DHT
in its own process with its own p2pd and the swarm's validator (`SwarmMembership`), a claim on a
job (`Lease`), its presence record, one checkpoint (or router) record and the provider record of
that checkpoint's blob, all kept fresh by the node's own `Announcer` thread every lease period.
The blob itself is not served (nothing here fetches it). To keep memory in check the peers'
handles live in this one controller process; each peer's DHT process and p2pd are its own.

At each N it measures:
  join        seconds to start a peer's DHT and join through the bootstrap (every peer, by the
              swarm size it joined), and to its first claim confirmed in the DHT;
  visibility  a peer announces a new checkpoint record (through its announcer, as a node does):
              seconds until its announcer has published it (stored and read back), and until
              every peer's own lookup returns it (8 peers polled at a time, from the moment it is
              published), and the share of peers whose first lookup already did;
  status      `collect_status` from a client-mode peer: seconds (median of 5) and DHT RPCs;
  lookups     a `get` (latest=True, as the node reads) of a present and of an absent key from
              up to 16 peers: find-RPCs each sends (counted inside its DHT process; a figure the
              machine's load cannot blur) and seconds;
  idle CPU    % of a core each peer's DHT process, p2pd and controller share burn while the
              swarm only keeps its records fresh (10 s window);
  memory      RSS and PSS (shared pages split among sharers) of each peer's DHT process and of
              its p2pd, and the controller's share per peer.
Times are sensitive to the load of this shared 2-core machine (reported next to them); the RPC
counts are not. One JSON line per N as it completes, a plot of join time (and lookup RPCs) vs. N,
and last one JSON line with everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hivemind.utils.timed_storage import get_dht_time  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from node.checkpoints.publishing import new_checkpoint_record  # noqa: E402
from node.swarm.announcer import Announcer  # noqa: E402
from node.swarm.leases import Lease  # noqa: E402
from protocol.jobs import Job  # noqa: E402
from node.swarm.membership import SwarmMembership  # noqa: E402
from node.swarm.presence import Presence  # noqa: E402
from node.swarm.status import collect_status  # noqa: E402
from protocol import keys  # noqa: E402
from protocol.hashing import BlobHasher  # noqa: E402
from protocol.identity import Identity  # noqa: E402
from protocol.manifest import SwarmManifest  # noqa: E402
from protocol.records import CheckpointRecord, RouterRecord  # noqa: E402
from tests.swarm_harness import BootstrapProcess  # noqa: E402

POLL_WORKERS = 8
LOOKUP_PEERS = 16


# ---- inside each DHT process: count the find RPCs it sends ----------------------------------------------------
async def _count_finds(_dht, node) -> int:
    """Runs in a peer's DHT process: wrap `call_find` once with a counter; return the count so far."""
    protocol = node.protocol
    if not hasattr(protocol, "ddm_finds"):
        protocol.ddm_finds = 0
        original = protocol.call_find

        async def counted(*args, **kwargs):
            protocol.ddm_finds += 1
            return await original(*args, **kwargs)

        protocol.call_find = counted
    return protocol.ddm_finds


def finds(membership: SwarmMembership) -> int:
    with membership._lock:  # the handle's pipe serves one call at a time
        return membership.dht.run_coroutine(_count_finds)


# ---- memory from /proc -----------------------------------------------------------------------------------------
def memory_mb(pid: int) -> Dict[str, float]:
    """RSS and PSS of one process, MB (PSS splits pages shared after fork among the sharers)."""
    values = {}
    for name, key in (("status", "VmRSS:"), ("smaps_rollup", "Pss:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    values["rss" if key == "VmRSS:" else "pss"] = int(line.split()[1]) / 1024
                    break
        except OSError:
            pass
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> List[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def descendants(pid: int) -> List[int]:
    found = children(pid)
    return found + [grandchild for child in found for grandchild in descendants(child)]


# ---- one lightweight peer ----------------------------------------------------------------------------------------
@dataclass
class LightPeer:
    membership: SwarmMembership
    announcer: Announcer
    job: Job
    joined_at_size: int
    join_s: float
    ready_s: float
    load_at_join: float
    step: int = 0

    def announce_new_checkpoint(self) -> str:
        """Queue a new checkpoint record (a fresh blob) with the announcer, as a training node does."""
        self.step += 1000
        record = light_record(self.membership, self.job, self.step)
        self.announcer.announce_checkpoint(self.job, record)
        return record.blob.sha256

    def sees(self, job: Job, blob_sha256: str) -> bool:
        """Does this peer's lookup of `job`'s checkpoint records return the blob's record?"""
        records = self.membership.job_checkpoints(job)
        return any(r.blob.sha256 == blob_sha256 for r in records)

    def memory(self) -> Dict[str, float]:
        pid = self.membership.dht.pid
        dht = memory_mb(pid)
        p2pd = [memory_mb(child) for child in children(pid)]
        return {"dht_rss": dht.get("rss", 0.0), "dht_pss": dht.get("pss", 0.0),
                "p2pd_rss": sum(m.get("rss", 0.0) for m in p2pd), "p2pd_pss": sum(m.get("pss", 0.0) for m in p2pd)}

    def pids(self) -> Dict[str, List[int]]:
        return {"dht": [self.membership.dht.pid], "p2pd": children(self.membership.dht.pid)}

    def stop(self) -> None:
        self.announcer.stop(release=False)
        self.membership.shutdown()


def light_record(membership: SwarmMembership, job: Job, step: int):
    blob, inference = BlobHasher(), BlobHasher()
    blob.update(os.urandom(4096))
    inference.update(os.urandom(512))
    manifest = membership.manifest
    common = dict(step=step, samples_seen=64 * step, blob=blob.finish(), inference=inference.finish(), parent="")
    if job.is_router:
        return new_checkpoint_record(membership, RouterRecord, model=manifest.router.name,
                                     spec_hash=manifest.router.spec_hash, num_clusters=manifest.num_clusters,
                                     heldout_accuracy=0.5, **common)
    spec = manifest.expert_for_cluster(job.cluster)
    return new_checkpoint_record(membership, CheckpointRecord, cluster=job.cluster, model=spec.name,
                                 objective=spec.objective, spec_hash=spec.spec_hash, heldout_loss=0.5, **common)


def start_peer(manifest: SwarmManifest, initial_peers: List[str], job: Job, size_before: int) -> LightPeer:
    start = time.perf_counter()
    membership = SwarmMembership(manifest, Identity.generate(), initial_peers=initial_peers, host="127.0.0.1")
    join_s = time.perf_counter() - start
    presence = Presence(membership, role="trainer")
    presence.announce("joining")
    model = manifest.model_for(job).name
    lease = Lease(membership, job, model)
    lease.renew(0)  # published and confirmed, as `claim_job` does
    ready_s = time.perf_counter() - start
    peer = LightPeer(membership, None, job, size_before, join_s, ready_s, os.getloadavg()[0])  # type: ignore[arg-type]
    peer.announcer = Announcer(membership, presence, lambda: peer.step)
    peer.announcer.hold(lease)
    peer.announce_new_checkpoint()
    peer.announcer.start()
    return peer


# ---- measurements at one N -----------------------------------------------------------------------------------------
def checkpoint_visibility(peers: List[LightPeer], publisher: LightPeer, timeout: float = 60.0) -> dict:
    """Seconds from a node queueing a new checkpoint record to its announcer having published it
    (confirmed), and to every peer's lookup returning it."""
    start = time.perf_counter()
    sha = publisher.announce_new_checkpoint()
    published = f" step {publisher.step} at "
    while published not in publisher.announcer.last_announcement and time.perf_counter() - start < timeout:
        time.sleep(0.005)
    publish_s = time.perf_counter() - start
    seen: Dict[int, float] = {}
    first_try: Dict[int, bool] = {}

    def poll(index: int) -> None:
        tries = 0
        while time.perf_counter() - start < timeout:
            tries += 1
            if peers[index].sees(publisher.job, sha):
                seen[index] = time.perf_counter() - start
                first_try[index] = tries == 1
                return
            time.sleep(0.05)

    with ThreadPoolExecutor(POLL_WORKERS) as pool:
        list(pool.map(poll, range(len(peers))))
    times = sorted(seen.values())
    return {"publish_s": round(publish_s, 3),
            "visible_all_s": round(times[-1], 3) if len(times) == len(peers) else None,
            "visible_median_s": round(statistics.median(times), 3) if times else None,
            "seen_by": len(times), "first_lookup_share": round(sum(first_try.values()) / len(peers), 3)}


def lookup_cost(peers: List[LightPeer], present_key: str) -> dict:
    rpcs = {"present": [], "absent": []}
    seconds = {"present": [], "absent": []}
    for peer in peers[:LOOKUP_PEERS]:
        for kind, key in (("present", present_key), ("absent", f"absent/{os.urandom(8).hex()}")):
            before = finds(peer.membership)
            start = time.perf_counter()
            peer.membership._get(key)
            seconds[kind].append(time.perf_counter() - start)
            rpcs[kind].append(finds(peer.membership) - before)
    return {f"{kind}_rpcs": round(statistics.mean(values), 2) for kind, values in rpcs.items()} | \
        {f"{kind}_s": round(statistics.median(values), 4) for kind, values in seconds.items()}


def status_latency(client: SwarmMembership, repeats: int = 5) -> dict:
    times, snapshot = [], None
    before = finds(client)
    for _ in range(repeats):
        start = time.perf_counter()
        snapshot = collect_status(client)
        times.append(time.perf_counter() - start)
    return {"status_s": round(statistics.median(times), 4), "status_rpcs": round((finds(client) - before) / repeats, 1),
            "status_online_peers": snapshot["online_peers"] if snapshot else None}


def idle_cpu(peers: List[LightPeer], bootstrap_pid: int, window_s: float) -> dict:
    """CPU the swarm burns while nobody asks it anything (announcers renewing every lease period,
    hivemind's own upkeep, p2pd), in % of one core per peer, over `window_s` seconds."""
    groups: Dict[str, List[int]] = {"dht": [], "p2pd": []}
    for peer in peers:
        for group, pids in peer.pids().items():
            groups[group] += pids
    groups["controller"], groups["bootstrap"] = [os.getpid()], [bootstrap_pid, *descendants(bootstrap_pid)]
    before = {group: sum(cpu_seconds(pid) for pid in pids) for group, pids in groups.items()}
    time.sleep(window_s)
    used = {group: sum(cpu_seconds(pid) for pid in pids) - before[group] for group, pids in groups.items()}
    per_peer = {f"idle_cpu_{group}_pct_per_peer": round(100 * used[group] / window_s / len(peers), 2)
                for group in ("dht", "p2pd", "controller")}
    return {"idle_cpu_swarm_pct": round(100 * sum(used.values()) / window_s, 1), **per_peer}


def memory(peers: List[LightPeer]) -> dict:
    rows = [peer.memory() for peer in peers]
    controller = memory_mb(os.getpid())
    summary = {f"{key}_mb": round(statistics.median(r[key] for r in rows), 1) for key in rows[0]}
    summary["controller_rss_mb"] = round(controller.get("rss", 0.0), 1)
    summary["controller_rss_per_peer_mb"] = round(controller.get("rss", 0.0) / len(peers), 1)
    summary["total_pss_mb"] = round(sum(r["dht_pss"] + r["p2pd_pss"] for r in rows) + controller.get("pss", 0.0), 1)
    return summary


# ---- the run --------------------------------------------------------------------------------------------------------
def plot(results: Dict[int, dict], peers: List[LightPeer], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    dots = left.scatter([p.joined_at_size for p in peers], [p.join_s for p in peers], c=[p.load_at_join for p in peers],
                        cmap="viridis", s=14, label="each peer (colour: load average)")
    fig.colorbar(dots, ax=left, label="1-min load average at join (2 cores)")
    left.plot(sizes, [results[n]["join_median_s"] for n in sizes], "o-", color="C1", label="median of the joins up to N")
    left.set_xlabel("peers in the swarm when joining")
    left.set_ylabel("seconds to join (DHT + p2pd up, bootstrapped)")
    left.set_title("join latency vs. swarm size")
    left.legend()
    right.plot(sizes, [results[n]["present_rpcs"] for n in sizes], "o-", label="get, key present")
    right.plot(sizes, [results[n]["absent_rpcs"] for n in sizes], "s-", label="get, key absent")
    base = results[sizes[0]]["absent_rpcs"]
    right.plot(sizes, [base * math.log2(n) / math.log2(sizes[0]) for n in sizes], "k--", lw=1,
               label=f"log2 N (scaled at N={sizes[0]})")
    right.axhline(20, color="grey", lw=0.8, ls=":", label="hivemind beam = bucket size k = 20")
    right.set_xlabel("peers N")
    right.set_ylabel("find RPCs per lookup")
    right.set_title("lookup cost vs. N (latest=True)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 48])
    parser.add_argument("--swarm", default="local", help="bundled swarm or manifest the benchmark swarm derives from")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "swarm_scale.png")
    parser.add_argument("--idle-window", type=float, default=10.0, help="seconds of idle CPU measurement per N")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    console = Console(stderr=True)
    load_before = os.getloadavg()

    from bootstrap.create import create_swarm

    peers: List[LightPeer] = []
    results: Dict[int, dict] = {}
    client: Optional[SwarmMembership] = None
    boot = None
    with tempfile.TemporaryDirectory(prefix="ddm-swarm-scale-") as tmp, \
            Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                     TimeElapsedColumn(), console=console) as progress:
        try:
            manifest = create_swarm(args.swarm, Path(tmp) / "scale.yaml", name=f"scale-{os.getpid()}")
            boot = BootstrapProcess(Path(tmp) / "scale.yaml", Path(tmp) / "boot.key")
            jobs = manifest.jobs
            joining = progress.add_task("peers joined", total=sizes[-1])
            for n in sizes:
                while len(peers) < n:
                    peers.append(start_peer(manifest, boot.maddrs, jobs[len(peers) % len(jobs)], len(peers)))
                    progress.update(joining, completed=len(peers))
                if client is None:
                    client = SwarmMembership(manifest, Identity.generate(), initial_peers=boot.maddrs,
                                             host="127.0.0.1", client_mode=True)
                measuring = progress.add_task(f"measuring at N={n}", total=None)
                time.sleep(2.0)  # let the newest peers' first announcements land
                idle = idle_cpu(peers, boot.proc.pid, args.idle_window)
                publisher = peers[n // 2]
                key = (keys.router_key(manifest.swarm_id) if publisher.job.is_router
                       else keys.checkpoint_key(manifest.swarm_id, publisher.job.cluster))
                joined = [p for p in peers if p.joined_at_size < n]
                row = {"n": n, "load_avg": round(os.getloadavg()[0], 2),
                       "join_median_s": round(statistics.median(p.join_s for p in joined), 3),
                       "join_p90_s": round(sorted(p.join_s for p in joined)[math.ceil(0.9 * len(joined)) - 1], 3),
                       "ready_median_s": round(statistics.median(p.ready_s for p in joined), 3),
                       **idle, **checkpoint_visibility(peers, publisher), **status_latency(client),
                       **lookup_cost(peers, key), **memory(peers),
                       "announce_failures": sum(p.announcer.failures for p in peers)}
                results[n] = row
                progress.remove_task(measuring)
                print(json.dumps({"swarm_scale_n": row}), flush=True)
        finally:
            stopping = progress.add_task("stopping peers", total=len(peers))
            with ThreadPoolExecutor(8) as pool:
                for _ in pool.map(LightPeer.stop, peers):
                    progress.advance(stopping)
            if client is not None:
                client.shutdown()
            if boot is not None:
                boot.stop()

    plot(results, peers, args.plot)
    first, last = sizes[0], sizes[-1]
    growth = {"n_ratio": round(last / first, 2), "log_n_ratio": round(math.log2(last) / math.log2(first), 3),
              "absent_rpcs_ratio": round(results[last]["absent_rpcs"] / max(results[first]["absent_rpcs"], 1e-9), 3),
              "present_rpcs_ratio": round(results[last]["present_rpcs"] / max(results[first]["present_rpcs"], 1e-9), 3),
              "absent_s_ratio": round(results[last]["absent_s"] / results[first]["absent_s"], 3)}
    table = Table(title=f"swarm scale on 127.0.0.1 (load {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f})")
    table.add_column("N")
    for n in sizes:
        table.add_column(str(n), justify="right")
    for name in results[sizes[0]]:
        if name != "n":
            table.add_row(name, *[str(results[n][name]) for n in sizes])
    Console().print(table)
    console.print(f"plot: {args.plot}")
    print(json.dumps({"benchmark": "swarm_scale", "swarm": args.swarm, "sizes": sizes,
                      "per_n": {str(n): results[n] for n in sizes}, "lookup_growth": growth,
                      "plot": str(args.plot), "load_avg": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}))


if __name__ == "__main__":
    main()
