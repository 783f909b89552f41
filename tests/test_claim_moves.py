"""A node that gives its job back and claims another at once (a job move) keeps one claim entry in
the DHT, where the latest expiration wins: the new claim must outlive the tombstone of the released
lease (an expiry of the last renewal + 1 s), or the DHT keeps the tombstone, the claim cannot be
confirmed and the node stops (seen in the churn soak: two nodes exited on a move)."""

import sys

import pytest

from tests.swarm_harness import ROOT, LineProcess

pytestmark = pytest.mark.timeout(120)

MOVE = """
import sys
from node.claims import claim_job
from node.errors import PublishFailed
from node.membership import SwarmMembership
from node.swarm_files import read_manifest_file
from protocol.identity import Identity

membership = SwarmMembership(read_manifest_file(sys.argv[1]), Identity.generate(), host="127.0.0.1")
jobs, model = ["expert/0", "expert/1", "router"], lambda job: "tiny-fm"
try:
    first = claim_job(membership, jobs, model, forced="expert/0")
    first.renew(10)  # the announcer renewed the lease just before the move
    first.release(10)
    try:
        claim_job(membership, jobs, model, forced="expert/1", after=first.last_expiry)
    except PublishFailed as error:
        print("refused:", error, flush=True)
    mine = [c for c in membership.claims() if c.signer == membership.identity.signer_id]
    print("claims:", [(c.job, c.state) for c in mine], flush=True)
finally:
    membership.shutdown()
print("done", flush=True)
"""


def test_a_node_moving_to_another_job_right_after_a_renewal_confirms_its_new_claim():
    node = LineProcess([sys.executable, "-c", MOVE, str(ROOT / "tests" / "manifests" / "tiny.yaml")])
    try:
        node.wait_for(lambda line: line.startswith("done"), timeout=100)
    finally:
        node.kill()
    output = "".join(node.output)
    assert "refused" not in output and "claims: [('expert/1', 'training')]" in output, output
