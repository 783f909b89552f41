"""The swarm simulation (benchmarks/swarm_sim.py) at tiny sizes: the node's rules against a model DHT."""

import random

from benchmarks.simulation.dht import ClaimStore, SimClaim
from benchmarks.simulation.events import NetworkModel
from benchmarks.simulation.run import SimConfig, simulate
from node.swarm.leases import should_move
from protocol.jobs import swarm_jobs

QUIET = NetworkModel(rtt_s=0.02, hops=1, loss=0.0)


def test_without_churn_every_job_gets_a_trainer_within_a_few_lease_periods():
    result = simulate(SimConfig(n=12, k=8, minutes=4, lease_s=5.0, join_window_s=10.0, network=QUIET,
                                warmup_s=60, mirror=False, resume_s=1.0, seed=1))
    assert result["full_coverage_s"] is not None and result["full_coverage_s"] < 10.0 + 4 * 5.0
    assert result["coverage_min"] == 1.0


def test_fewer_peers_than_jobs_leave_jobs_uncovered_however_long_it_runs():
    result = simulate(SimConfig(n=6, k=8, minutes=3, lease_s=5.0, join_window_s=5.0, network=QUIET,
                                warmup_s=60, mirror=False, resume_s=1.0))
    assert result["full_coverage_s"] is None
    assert abs(result["coverage_mean"] - 6 / 9) < 1e-3  # 9 jobs (8 experts, the router): one peer on each of 6


def test_when_every_peer_crashes_coverage_falls_to_zero_once_the_leases_expire():
    lease_s = 5.0
    result = simulate(SimConfig(n=20, k=4, minutes=2, lease_s=lease_s, join_window_s=5.0, network=QUIET,
                                warmup_s=0, all_leave_at=60.0, sample_s=1.0, mirror=False, resume_s=1.0))
    times, coverage = result["series"]["t"], result["series"]["coverage"]
    before = [c for t, c in zip(times, coverage) if 40 <= t < 60]
    still_held = [c for t, c in zip(times, coverage) if 60 <= t < 60 + 2 * lease_s]
    after = [c for t, c in zip(times, coverage) if t >= 60 + 3 * lease_s + 1]
    assert before and min(before) == 1.0
    assert still_held and min(still_held) == 1.0  # a crashed peer's claim lives on until it expires (3T)
    assert after and max(after) == 0.0


def test_a_crashed_sole_trainers_job_is_taken_over_after_its_lease_expires():
    lease_s = 5.0
    result = simulate(SimConfig(n=8, k=4, minutes=20, lease_s=lease_s, join_window_s=5.0, network=QUIET,
                                half_life_s=120.0, crash_share=1.0, restart_share=0.0, warmup_s=60,
                                mirror=False, resume_s=1.0, seed=3))
    crash = result["takeover_crash_s"]
    assert crash["n"] > 0
    # never sooner than the rest of the dead claim's lifetime allows, and well within a few periods after
    assert crash["median"] <= 3 * lease_s + 3 * lease_s


def test_skipping_should_move_when_all_jobs_are_held_or_nobody_shares_agrees_with_calling_it():
    jobs, rng = swarm_jobs(6), random.Random(0)
    for trial in range(300):
        store = ClaimStore(jobs)
        signers = [f"{i:064x}" for i in range(rng.randint(1, 14))]
        for slot, signer in enumerate(signers):
            store.store(slot, signer, rng.randrange(len(jobs)), rng.choice(["training", "released"]),
                        100.0 + rng.random() * 10, 0.0)
        now = rng.uniform(0, 105)
        full = [SimClaim(jobs[store.entry_job[s]], signers[s], store.entry_state[s], store.entry_exp[s])
                for s in store.entry_exp]
        for slot, signer in enumerate(signers):
            own = store.entry_job[slot]
            called = should_move(jobs[own], jobs, full, signer, now)
            store.advance(now)
            fast = (store.uncovered > 0 and len(store.holders[own]) > 1
                    and should_move(jobs[own], jobs, store.compact_view(own, now), signer, now))
            assert fast == called, (trial, slot)
