"""Choosing a job: fewest live claims, then least progress; simultaneous starters spread out."""

import time

from node.swarm.leases import choose_job, keep_previous_job, should_move
from protocol.identity import Identity
from protocol.jobs import Job
from protocol.records import Claim
from tests.protocol_fixtures import PEER_ID

J = Job.parse
JOBS = [J("expert/0"), J("expert/1"), J("expert/2"), J("expert/3"), J("router")]
NOW = time.time()


def _claim(job, signer, state="training", expires=NOW + 30):
    return Claim("a" * 64, job, "tiny-fm", PEER_ID, 0, state, expires).signed_by(signer)


def test_a_joining_node_takes_a_job_nobody_holds():
    others = [Identity.generate() for _ in range(4)]
    claims = [_claim(job, who) for job, who in zip(JOBS[:4], others)]
    assert choose_job(JOBS, claims, {}, Identity.generate().signer_id, NOW) == J("router")


def test_expired_and_released_claims_leave_the_job_orphaned():
    a, b = Identity.generate(), Identity.generate()
    claims = [_claim(job, a) for job in JOBS if job != J("expert/2")]
    claims += [_claim(J("expert/2"), b, expires=NOW - 1), _claim(J("expert/2"), a, state="released")]
    assert choose_job(JOBS, claims, {}, Identity.generate().signer_id, NOW) == J("expert/2")


def test_among_equally_covered_jobs_the_least_progressed_is_taken():
    holders = [Identity.generate() for _ in JOBS]
    claims = [_claim(job, who) for job, who in zip(JOBS, holders)]
    progress = {J("expert/0"): 500, J("expert/1"): 40, J("expert/2"): 900, J("expert/3"): 300, J("router"): 100}
    assert choose_job(JOBS, claims, progress, Identity.generate().signer_id, NOW) == J("expert/1")


def test_own_claim_does_not_count_against_the_job_so_a_restart_keeps_it():
    me = Identity.generate()
    others = [Identity.generate() for _ in range(4)]
    claims = [_claim(job, who) for job, who in zip(JOBS[1:], others)] + [_claim(J("expert/0"), me)]
    assert choose_job(JOBS, claims, {}, me.signer_id, NOW) == J("expert/0")


def test_simultaneous_starters_spread_over_free_jobs():
    picks = {choose_job(JOBS, [], {}, Identity.generate().signer_id, NOW) for _ in range(40)}
    assert len(picks) >= 4


def test_only_the_larger_signers_of_a_shared_job_move_while_a_job_is_uncovered():
    a, b = sorted([Identity.generate(), Identity.generate()], key=lambda i: i.signer_id)
    claims = [_claim(J("expert/0"), a), _claim(J("expert/0"), b)]
    assert should_move(J("expert/0"), JOBS, claims, b.signer_id, NOW)
    assert not should_move(J("expert/0"), JOBS, claims, a.signer_id, NOW)
    covered = claims + [_claim(job, Identity.generate()) for job in JOBS[1:]]
    assert not should_move(J("expert/0"), JOBS, covered, b.signer_id, NOW)  # redundancy once all are covered


def test_a_job_held_only_by_claimers_that_never_checkpoint_is_taken_before_a_trained_one():
    trainer, squatters = Identity.generate(), [Identity.generate() for _ in range(3)]
    claims = [_claim(J("expert/0"), trainer)] + [_claim(job, who) for job in JOBS[1:] for who in squatters]
    proven = {J("expert/0"): {trainer.signer_id}}
    choice = choose_job(JOBS, claims, {J("expert/0"): 400}, Identity.generate().signer_id, NOW, proven)
    assert choice != J("expert/0")
    # without the evidence of checkpoints, the squatters' piles of claims would push it onto expert/0
    assert choose_job(JOBS, claims, {J("expert/0"): 400}, Identity.generate().signer_id, NOW) == J("expert/0")


def test_a_free_job_still_comes_before_a_squatted_one():
    squatter = Identity.generate()
    claims = [_claim(job, squatter) for job in JOBS if job != J("router")]
    assert choose_job(JOBS, claims, {}, Identity.generate().signer_id, NOW, {}) == J("router")


def test_a_restart_continues_its_previous_job_unless_it_is_shared_while_another_has_no_trainer():
    me, other = Identity.generate(), Identity.generate()
    alone = [_claim(J("expert/0"), me)]  # its own claim from before the restart does not count
    assert keep_previous_job(J("expert/0"), JOBS, alone, me.signer_id, NOW)  # nobody else trains it
    shared = alone + [_claim(J("expert/0"), other)]
    assert not keep_previous_job(J("expert/0"), JOBS, shared, me.signer_id, NOW)  # expert/1… have no trainer
    covered = shared + [_claim(job, Identity.generate()) for job in JOBS[1:]]
    assert keep_previous_job(J("expert/0"), JOBS, covered, me.signer_id, NOW)  # every job has a trainer
