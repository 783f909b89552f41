"""Giving a lease back is one step (`Announcer.give_back`: detach and release under one lock), and a
released lease is never renewed: an announcer tick racing a hand-over, a move or the end of the
budget cannot bring the node's claim back to life (a claim that lives on keeps the job from the
peers that would take it over, for 3T)."""

import sys

import pytest

from tests.swarm_harness import ROOT, LineProcess

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def race_output():
    peer = LineProcess([sys.executable, "-m", "tests.peers.lease_racer", str(ROOT / "tests" / "manifests" / "tiny.yaml")])
    try:
        peer.wait_for(lambda line: line.startswith("done"), timeout=120)
    finally:
        peer.kill()
    return "".join(peer.output)


def test_a_tick_after_the_job_was_given_back_leaves_the_claim_released(race_output):
    assert "tick-after-give-back: released" in race_output, race_output


def test_a_renewal_of_a_lease_read_just_before_the_give_back_is_refused(race_output):
    assert "stale-renew: released refused" in race_output, race_output


def test_ticks_running_while_the_job_is_given_back_leave_the_claim_released(race_output):
    assert "concurrent: released" in race_output, race_output
