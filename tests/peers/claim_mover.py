"""A peer that claims expert/0, renews and releases it, and claims expert/1 at once (a job move),
then prints its own claim entries: `python -m tests.peers.claim_mover MANIFEST`."""

import sys

from node.errors import PublishFailed
from node.swarm.leases import claim_job
from node.swarm.manifest_files import read_manifest_file
from node.swarm.membership import SwarmMembership
from protocol.identity import Identity
from protocol.jobs import Job

membership = SwarmMembership(read_manifest_file(sys.argv[1]), Identity.generate(), host="127.0.0.1")
jobs, model = [Job.expert(0), Job.expert(1), Job.router()], lambda job: "tiny-fm"
try:
    first = claim_job(membership, jobs, model, forced=Job.expert(0))
    first.renew(10)  # the announcer renewed the lease just before the move
    first.release(10)
    try:
        claim_job(membership, jobs, model, forced=Job.expert(1), after=first.last_expiry)
    except PublishFailed as error:
        print("refused:", error, flush=True)
    mine = [c for c in membership.claims() if c.signer == membership.identity.signer_id]
    print("claims:", [(str(c.job), c.state) for c in mine], flush=True)
finally:
    membership.shutdown()
print("done", flush=True)
