"""A peer that drives the interleavings of giving a lease back against the announcer's renewal tick,
then prints its claim as the DHT holds it after each: `python -m tests.peers.lease_racer MANIFEST`.

1. "tick-after-give-back": the job is given back, then a tick runs (the old `_serve` released the
   lease first and detached it from the announcer second, so a tick in between renewed it).
2. "stale-renew": a tick read the lease just before it was given back and renews it just after.
3. "concurrent": ticks run in a tight loop on another thread while the job is given back.
"""

import sys
import threading

from node.swarm.announcer import Announcer
from node.swarm.leases import claim_job
from node.swarm.manifest_files import read_manifest_file
from node.swarm.membership import SwarmMembership
from node.swarm.presence import Presence
from protocol.identity import Identity
from protocol.jobs import Job

membership = SwarmMembership(read_manifest_file(sys.argv[1]), Identity.generate(), host="127.0.0.1")
jobs = [Job.expert(0), Job.expert(1), Job.router()]


def claim_state(job: Job) -> str:
    mine = [c for c in membership.claims() if c.signer == membership.identity.signer_id and c.job == job]
    return mine[0].state if mine else "none"


def held(job: Job, after: float) -> tuple:
    announcer = Announcer(membership, Presence(membership, role="trainer"), lambda: 7)
    lease = claim_job(membership, jobs, lambda _: "tiny-fm", forced=job, after=after)
    announcer.hold(lease)
    return announcer, lease


try:
    after = 0.0
    announcer, lease = held(Job.expert(0), after)
    announcer.give_back(7)
    announcer._tick()
    print("tick-after-give-back:", claim_state(Job.expert(0)), flush=True)

    announcer, lease = held(Job.expert(1), lease.last_expiry)
    stale = announcer.lease  # what a tick read just before the give-back
    announcer.give_back(7)
    renewed = stale.renew(7)
    print("stale-renew:", claim_state(Job.expert(1)), "renewed" if renewed else "refused", flush=True)

    announcer, lease = held(Job.router(), lease.last_expiry)
    stop = threading.Event()

    def ticks() -> None:
        while not stop.is_set():
            announcer._tick()

    ticker = threading.Thread(target=ticks)
    ticker.start()
    announcer.give_back(7)
    stop.set()
    ticker.join()
    announcer._tick()
    print("concurrent:", claim_state(Job.router()), flush=True)
finally:
    membership.shutdown()
print("done", flush=True)
