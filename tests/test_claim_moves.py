"""A node that gives its job back and claims another at once (a job move) keeps one claim entry in
the DHT, where the latest expiration wins: the new claim must outlive the tombstone of the released
lease (an expiry of the last renewal + 1 s), or the DHT keeps the tombstone, the claim cannot be
confirmed and the node stops (seen in the churn soak: two nodes exited on a move)."""

import sys

import pytest

from tests.swarm_harness import ROOT, LineProcess

pytestmark = pytest.mark.timeout(120)


def test_a_node_moving_to_another_job_right_after_a_renewal_confirms_its_new_claim():
    node = LineProcess([sys.executable, "-m", "tests.peers.claim_mover", str(ROOT / "tests" / "manifests" / "tiny.yaml")])
    try:
        node.wait_for(lambda line: line.startswith("done"), timeout=100)
    finally:
        node.kill()
    output = "".join(node.output)
    assert "refused" not in output and "claims: [('expert/1', 'training')]" in output, output
