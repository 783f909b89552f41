"""One simulated run: a swarm of N peers over K clusters, its churn, and the figures measured.

Churn is one of:
- `half_life_s`: every peer's lifetime is exponential with that half-life, and a peer arrives for
  each one that leaves (so N stays about constant: arrivals and departures at N ln2 / half-life per
  second); an arrival is a restart of a departed identity with probability `restart_share`;
- `up_s`/`down_s` (as `benchmarks/churn.py`): peer 0 stays; every other peer is up for a uniform
  span, away for a uniform span, and comes back (a newcomer with probability `fresh_share`);
- `all_leave_at`: every peer crashes at that moment (the test's case).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from benchmarks.simulation.events import NetworkModel
from benchmarks.simulation.swarm import Peer, Swarm
from protocol.manifest import SwarmManifest


@dataclass
class SimConfig:
    n: int = 1000
    k: int = 8
    minutes: float = 60.0
    lease_s: float = 20.0  # the manifest's Timing.lease_s (T)
    checkpoint_every_steps: int = 200
    checkpoint_s: float = 300.0  # simulated seconds between a trainer's checkpoints
    join_window_s: float = 60.0  # the first N peers arrive uniformly over this span
    half_life_s: Optional[float] = None
    crash_share: float = 0.3  # departures without a release (a crash, a lost connection)
    restart_share: float = 0.5
    up_s: Optional[Tuple[float, float]] = None
    down_s: Tuple[float, float] = (10.0, 60.0)
    fresh_share: float = 0.3
    all_leave_at: Optional[float] = None
    mirror: bool = True
    resume_s: float = 15.0
    fetch_s: float = 5.0
    join_s: float = 1.0
    network: Optional[NetworkModel] = None
    loss: float = 0.01
    sample_s: float = 10.0
    warmup_s: float = 600.0  # figures "in steady state" are taken after this
    seed: int = 0
    # orphan probes: (simulated s, "crash" | "clean"): every trainer of one covered expert job leaves then
    probes: Tuple[Tuple[float, str], ...] = ()


def _probe(swarm: Swarm, rng: np.random.Generator, crash: bool, depart) -> None:
    held = [j for j in range(swarm.J - 1) if swarm.claims.holders[j] and j not in swarm.probed]
    if held:
        swarm.empty_job(int(rng.choice(held)), crash, lambda peer, crash: depart(peer, None, crash))


def sim_manifest(k: int, lease_s: float, checkpoint_every_steps: int) -> SwarmManifest:
    return SwarmManifest.from_dict({
        "name": f"sim-{k}", "dataset": {"kind": "small-digits", "image_size": 8, "channels": 1},
        "clustering": {"num_clusters": k, "fine_clusters": max(64, k)},
        "experts": [{"name": "m", "objective": "fm", "architecture": {"width": 64, "depth": 2}}],
        "router": {"name": "router", "objective": "router", "architecture": {"width": 32}},
        "timing": {"lease_s": lease_s, "checkpoint_every_steps": checkpoint_every_steps},
    })


def _percentiles(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"n": 0, "median": None, "p90": None, "max": None}
    a = np.asarray(values)
    return {"n": len(values), "median": round(float(np.median(a)), 2), "p90": round(float(np.percentile(a, 90)), 2),
            "max": round(float(a.max()), 2)}


def _churn(swarm: Swarm, config: SimConfig, rng: np.random.Generator) -> Callable[[Peer], None]:
    """Schedules departures (and the arrivals that follow them) for each peer that arrives."""
    q, departed = swarm.q, []

    def depart(peer: Peer, then_return: Optional[float], crash: Optional[bool] = None) -> None:
        """`crash` given: an orphan probe's departure, replaced by a newcomer, and its identity never
        restarts (else a restart of the very trainer that left, continuing its job by
        `keep_previous_job`, would count as the takeover)."""
        if not peer.alive:
            return
        swarm.leave(peer, crash=rng.random() < config.crash_share if crash is None else crash)
        if crash is not None:
            if config.half_life_s:
                born(swarm.arrive(None))
            return
        departed.append(peer.slot)
        if then_return is not None:
            fresh = rng.random() < config.fresh_share
            q.call_at(q.now + then_return, lambda: born(swarm.arrive(None if fresh else peer.slot)))
        elif config.half_life_s:
            slot = departed.pop(int(rng.integers(len(departed)))) if rng.random() < config.restart_share else None
            born(swarm.arrive(slot))

    def born(peer: Peer) -> None:
        if config.half_life_s:
            life = rng.exponential(config.half_life_s / math.log(2))
            q.call_at(q.now + life, lambda: depart(peer, None))
        elif config.up_s and peer.slot != 0:
            q.call_at(q.now + rng.uniform(*config.up_s), lambda: depart(peer, rng.uniform(*config.down_s)))

    return born, depart


def simulate(config: SimConfig, progress: Optional[Callable[[float], None]] = None) -> dict:
    """Run one configuration; the figures as a dict (times in seconds, costs per alive peer per minute)."""
    rng = np.random.default_rng(config.seed)
    manifest = sim_manifest(config.k, config.lease_s, config.checkpoint_every_steps)
    network = config.network or NetworkModel.internet(config.n, config.loss)
    swarm = Swarm(manifest, network, rng, checkpoint_s=config.checkpoint_s, resume_s=config.resume_s,
                  fetch_s=config.fetch_s, join_s=config.join_s, mirror=config.mirror,
                  capacity=int(config.n * 1.2) + 8)
    q, (born, depart) = swarm.q, _churn(swarm, config, rng)
    for when, how in config.probes:
        q.call_at(when, lambda how=how: _probe(swarm, rng, how == "crash", depart))
    for i in range(config.n):
        q.call_at(config.join_window_s * i / config.n, lambda: born(swarm.arrive()))
    if config.all_leave_at is not None:
        q.call_at(config.all_leave_at, lambda: [swarm.leave(p, crash=True) for p in swarm.peers if p.alive])
    end, samples = config.minutes * 60.0, []
    cost_end = min([end] + [when for when, _ in config.probes])
    steady: Dict[str, float] = {}
    t = 0.0
    while t < end:
        t = min(end, t + config.sample_s)
        q.run_until(t)
        swarm.claims.advance(t)
        alive = [p for p in swarm.peers if p.alive]
        covered = swarm.J - swarm.claims.uncovered
        probed = sum(1 for j in swarm.probed if swarm.claims.holders[j])  # the probes' jobs apart: churn alone
        samples.append((t, covered / swarm.J, len(alive), (covered - probed) / (swarm.J - len(swarm.probed))))
        if int(t) % 60 == 0 and alive:
            _mirror_figures(swarm, alive, samples)
        if not steady and t >= config.warmup_s:
            steady = {**swarm.counters.totals(), "t": t, "peer_s": 0.0,
                      "purposes": {k: list(v) for k, v in swarm.counters.by_purpose.items()}}
        if steady and "until" not in steady:
            steady["peer_s"] += len(alive) * config.sample_s
            if t >= cost_end:  # the probes' mass moves are not the swarm's steady cost
                steady["until"] = swarm.counters.totals()
                steady["purposes_until"] = {k: list(v) for k, v in swarm.counters.by_purpose.items()}
        if progress:
            progress(t / end)
    return _figures(swarm, config, network, samples, steady)


def _mirror_figures(swarm: Swarm, alive: List[Peer], samples: list) -> None:
    """Providers per blob (for the byte counts), and whether each job's best checkpoint can be fetched."""
    swarm.refresh_best()
    rows = np.fromiter((p.row for p in alive), dtype=np.int64)
    has_best = swarm.best_step >= 0
    held = swarm.held[rows] == swarm.best_step  # (alive peers, jobs)
    trainers = {p.slot for p in alive}
    trainer_has = np.array([s in trainers for s in swarm.best_slot])
    holders = held.sum(axis=0) + trainer_has
    swarm.providers_per_blob = max(1.0, float(holders[has_best].mean()) if has_best.any() else 1.0)
    obtainable = (holders > 0) & has_best
    samples[-1] = (*samples[-1][:4], float(obtainable.mean()), float(held[:, has_best].mean()) if has_best.any()
                   else 0.0)


def _figures(swarm: Swarm, config: SimConfig, network: NetworkModel, samples: list, steady: dict) -> dict:
    times = np.array([s[0] for s in samples])
    coverage = np.array([s[1] for s in samples])
    after = times >= config.warmup_s
    churn_coverage = np.array([s[3] for s in samples])
    mirror_samples = [s for s in samples if len(s) == 6 and s[0] >= config.warmup_s]
    totals, purposes = steady.get("until") or swarm.counters.totals(), {}
    peer_min = steady.get("peer_s", 0.0) / 60.0
    per_min = {key: (totals[key] - steady[key]) / peer_min if peer_min else None
               for key in ("gets", "stores", "bytes_in", "bytes_out")} if steady else {}
    # by purpose, per alive peer per minute over the same steady window as the totals
    rows_until = steady.get("purposes_until") or {k: list(v) for k, v in swarm.counters.by_purpose.items()}
    for purpose, row in rows_until.items():
        start = steady.get("purposes", {}).get(purpose, [0, 0, 0.0, 0.0])
        if peer_min:
            purposes[purpose] = {"ops": round((row[0] + row[1] - start[0] - start[1]) / peer_min, 2),
                                 "bytes": round((row[2] + row[3] - start[2] - start[3]) / peer_min)}
    ops = (per_min["gets"] + per_min["stores"]) if per_min else None
    return {
        "n": config.n, "k": config.k, "jobs": swarm.J, "minutes": config.minutes, "lease_s": swarm.T,
        "half_life_min": config.half_life_s / 60 if config.half_life_s else None, "mirror": config.mirror,
        "hops": network.hops, "loss": network.loss,
        "full_coverage_s": round(swarm.full_at, 1) if swarm.full_at is not None else None,
        "coverage_mean": round(float(coverage[after].mean()), 4) if after.any() else None,
        "coverage_min": round(float(coverage[after].min()), 4) if after.any() else None,
        "churn_coverage_mean": round(float(churn_coverage[after].mean()), 4) if after.any() else None,
        "churn_coverage_min": round(float(churn_coverage[after].min()), 4) if after.any() else None,
        "probe_crash_s": [round(v, 1) for v in swarm.events["probe_crash"]],
        "probe_clean_s": [round(v, 1) for v in swarm.events["probe_clean"]],
        "probes_unresolved": len(swarm.probes),
        "takeover_crash_s": _percentiles(swarm.events["takeover_crash"]),
        "takeover_clean_s": _percentiles(swarm.events["takeover_clean"]),
        "gap_s": _percentiles(swarm.events["gap"]),
        "claim_s": _percentiles(swarm.events["claim_s"]),
        "moves": len(swarm.events["moves"]), "lost_races": len(swarm.events["lost_races"]),
        "arrivals": len(swarm.peers),
        "ops_per_peer_min": round(ops, 1) if ops is not None else None,
        "rpcs_per_peer_min": round(ops * network.rpcs_per_lookup(config.n), 1) if ops is not None else None,
        "kbytes_per_peer_min": round((per_min["bytes_in"] + per_min["bytes_out"]) / 1e3, 1) if per_min else None,
        "by_purpose": purposes,
        "obtainable_best_share": round(float(np.mean([s[4] for s in mirror_samples])), 4) if mirror_samples else None,
        "mirror_fresh_share": round(float(np.mean([s[5] for s in mirror_samples])), 4) if mirror_samples else None,
        "sizes": vars(swarm.sizes),
        "events_handled": swarm.q.handled,
        "series": {"t": times[:: max(1, len(times) // 200)].round(1).tolist(),
                   "coverage": coverage[:: max(1, len(times) // 200)].round(4).tolist(),
                   "churn_coverage": churn_coverage[:: max(1, len(times) // 200)].round(4).tolist()},
    }
