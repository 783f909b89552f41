"""The swarm simulation (benchmarks/swarm_sim.py) at tiny sizes: the node's rules against a model DHT."""

import random

from benchmarks.simulation.dht import ClaimStore, SimClaim
from benchmarks.simulation.events import NetworkModel
from benchmarks.simulation.run import SimConfig, simulate
from node.swarm.leases import choose_job, job_after_lost_race, keep_previous_job, should_move
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


def _random_store(rng, jobs):
    store = ClaimStore(jobs)
    signers = [f"{i:064x}" for i in range(rng.randint(1, 40))]
    for slot, signer in enumerate(signers):
        # skewed: some jobs crowded, some empty, so the shifts of choice_view are often > 0
        job = min(len(jobs) - 1, int(rng.expovariate(0.4))) if rng.random() < 0.5 else rng.randrange(len(jobs))
        store.store(slot, signer, job, rng.choice(["training", "training", "released"]), 100.0 + rng.random() * 10, 0.0)
    return store, signers


def test_the_choice_view_leads_choose_job_and_the_lost_race_rule_to_the_job_a_full_read_leads_them_to():
    jobs, rng = swarm_jobs(5), random.Random(1)
    shifted = 0
    for trial in range(400):
        store, signers = _random_store(rng, jobs)
        now = rng.uniform(0, 105)
        full = [SimClaim(jobs[store.entry_job[s]], signers[s], store.entry_state[s], store.entry_exp[s])
                for s in store.entry_exp]
        proven_slots = {j: {s for s in range(len(signers)) if rng.random() < 0.6} for j in range(len(jobs))}
        proven = {jobs[j]: {signers[s] for s in slots} for j, slots in proven_slots.items()}
        progress = {job: rng.choice([0, 0, 200, 400]) for job in jobs}
        for slot, signer in enumerate(signers):
            view = store.choice_view(range(len(jobs)), slot, proven_slots, now)
            shifted += len(view) < len([c for c in full if c.state == "training" and c.expires_at > now])
            assert (choose_job(jobs, view, progress, signer, now, proven)
                    == choose_job(jobs, full, progress, signer, now, proven)), (trial, slot)
            lost = rng.randrange(len(jobs))
            view = store.choice_view([j for j in range(len(jobs)) if j != lost], slot, proven_slots, now)
            assert (job_after_lost_race(jobs[lost], jobs, view, progress, signer, now, proven)
                    == job_after_lost_race(jobs[lost], jobs, full, progress, signer, now, proven)), (trial, slot)
    assert shifted > 100  # the views were smaller than the full read often enough for the check to bite


def test_a_two_per_job_view_answers_keep_previous_job_as_a_full_read_does():
    jobs, rng = swarm_jobs(5), random.Random(2)
    for trial in range(400):
        store, signers = _random_store(rng, jobs)
        now = rng.uniform(0, 105)
        full = [SimClaim(jobs[store.entry_job[s]], signers[s], store.entry_state[s], store.entry_exp[s])
                for s in store.entry_exp]
        for slot, signer in enumerate(signers):
            previous = rng.randrange(len(jobs))
            view = store.compact_view(previous, now, per_job=2)
            assert (keep_previous_job(jobs[previous], jobs, view, signer, now)
                    == keep_previous_job(jobs[previous], jobs, full, signer, now)), (trial, slot)


def test_an_emptied_job_is_taken_over_by_a_mover_later_after_a_crash_than_after_a_clean_leave():
    lease_s = 5.0
    result = simulate(SimConfig(n=20, k=4, minutes=4, lease_s=lease_s, join_window_s=5.0, network=QUIET,
                                warmup_s=30, mirror=False, resume_s=1.0, probes=((60.0, "crash"), (120.0, "clean"))))
    (crash,), (clean,) = result["probe_crash_s"], result["probe_clean_s"]
    assert result["probes_unresolved"] == 0 and result["moves"] >= 2
    # a crashed trainer's claim lives up to 3T after its last renewal; the movers need two checks T apart
    assert 2 * lease_s <= crash <= 3 * lease_s + 3 * lease_s + 5.0
    assert clean < crash and clean <= 3 * lease_s + 5.0  # the tombstone frees the job at once
    assert result["churn_coverage_min"] == 1.0  # the other jobs kept a trainer throughout
