"""Who trains what: choosing a job and holding its lease.

Jobs (`protocol.jobs.Job`) are the swarm's clusters ("expert/<k>") and the router ("router"). A joining node takes the job
with the fewest live claims, then the least progress; several trainers per job are allowed once
every job is covered. Claims are leases renewed every T and expiring after 3T, so a node that dies
orphans its job within 3T and the next node resumes it from the swarm's latest checkpoint.

A claim costs nothing, so a peer may claim jobs it never trains, and a record costs nothing either:
a claimer is *proven* on a job once this node fetched and verified a checkpoint of that job it signed
(`node.checkpoints.acceptance.Verified`, filled by resume, the mirror and `resume.prove_claimers`);
a job whose claimers are all unproven is taken before any job with a proven trainer, so squatters
cannot keep honest nodes off a job by piling claims and blob-less records on it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Set, Tuple

from hivemind.utils.timed_storage import get_dht_time

from node.swarm.membership import SwarmMembership
from protocol.jobs import Job
from protocol.records import Claim

logger = logging.getLogger("ddm_swarm.leases")


def live_claimers(claims: Iterable[Claim], now: float) -> Dict[Job, List[str]]:
    """job -> signers that hold a live (unexpired, not released) lease on it."""
    holders: Dict[str, List[str]] = {}
    for claim in claims:
        if claim.state == "training" and claim.expires_at > now:
            holders.setdefault(claim.job, []).append(claim.signer)
    return holders


def _spread(signer: str, job: Job) -> str:
    # nodes that start at the same moment see the same claims; a per-node order spreads them out
    return hashlib.sha256(f"{signer}/{job}".encode()).hexdigest()


def choose_job(jobs: List[Job], claims: Iterable[Claim], progress: Dict[Job, int], me: str, now: float,
               proven: Optional[Dict[Job, Set[str]]] = None) -> Job:
    """The job with the fewest proven claimers other than `me`, then the fewest live claims by
    others, then the least progress. `proven`: job -> signers with a live checkpoint record of it."""
    holders, proven = live_claimers(claims, now), proven or {}

    def others(job: Job) -> List[str]:
        return [signer for signer in holders.get(job, []) if signer != me]

    return min(jobs, key=lambda job: (len([s for s in others(job) if s in proven.get(job, ())]), len(others(job)),
                                      progress.get(job, 0), _spread(me, job)))


def keep_previous_job(previous: Job, jobs: List[Job], claims: Iterable[Claim], me: str, now: float) -> bool:
    """Whether a restarting node continues `previous`, the job it trained before: yes, unless other
    peers train it while some job has no trainer at all (then the restart covers that job instead;
    the state of `previous` stays on disk for later)."""
    holders = live_claimers(claims, now)
    others = lambda job: [signer for signer in holders.get(job, []) if signer != me]  # noqa: E731
    return not (others(previous) and any(not others(job) for job in jobs if job != previous))


# a trainer moves once its coverage check (once a lease period) found a job uncovered this many times in a row
MOVE_AFTER_CHECKS = 2


def next_move_streak(streak: int, move: bool) -> Tuple[int, bool]:
    """The count of coverage checks in a row in which `should_move` said yes, after one more check
    whose answer was `move`; and whether the trainer moves now."""
    streak = streak + 1 if move else 0
    return streak, streak >= MOVE_AFTER_CHECKS


class MoveWatch:
    """Whether this trainer should move to a job that has none, looked at once a lease period: some
    job has had no live claim in `MOVE_AFTER_CHECKS` checks in a row while this node is not the one
    that stays on its shared job (`should_move`)."""

    def __init__(self, membership: SwarmMembership, period_s: float):
        self.membership, self.period_s = membership, period_s
        self.checked, self.streak = 0.0, 0

    def reset(self) -> None:
        self.streak = 0

    def move_now(self, job: Job, jobs: List[Job]) -> bool:
        if time.monotonic() - self.checked < self.period_s:
            return False
        self.checked = time.monotonic()
        try:
            claims = self.membership.claims()
        except Exception:  # the DHT is slow or away: look again next period
            return False
        move = should_move(job, jobs, claims, self.membership.identity.signer_id, get_dht_time())
        self.streak, moves = next_move_streak(self.streak, move)
        return moves


def job_after_lost_race(lost: Job, jobs: List[Job], claims: Iterable[Claim], progress: Dict[Job, int], me: str,
                        now: float, proven: Optional[Dict[Job, Set[str]]] = None) -> Job:
    """The job a node takes after losing the race for `lost`: `choose_job` among the other jobs,
    counting only the other peers' claims (its own is being released)."""
    others = [c for c in claims if c.signer != me]
    return choose_job([j for j in jobs if j != lost] or jobs, others, progress, me, now, proven)


def claim_expiry(state: str, now: float, last_expiry: float, lease_expiry_s: float) -> float:
    """Expiration of the claim record a lease publishes: a renewal ("training") lives 3T from `now`,
    a release ("released") is a tombstone that outlives the lease it replaces; either way later
    than the node's last claim record, since per subkey the latest expiration wins in hivemind."""
    if state == "released":
        return last_expiry + 1.0
    return max(now + lease_expiry_s, last_expiry + 1e-3)


def should_move(job: Job, jobs: List[Job], claims: Iterable[Claim], me: str, now: float) -> bool:
    """True if `me` lost a race for `job`: others hold it too, some job has no holder, and `me` is
    not the claimer with the smallest signer id (a rule every node applies identically)."""
    holders = live_claimers(claims, now)
    sharing = holders.get(job, [])
    uncovered = [j for j in jobs if not holders.get(j)]
    return bool(uncovered) and len(sharing) > 1 and me in sharing and me != min(sharing)


@dataclass
class Lease:
    """This node's lease on one job, renewed by `renew()` at least every T (by the announcer's thread)
    and given back once by `release()` (by the training thread). Both run under the lease's lock, and
    a released lease is never renewed: a renewal that comes after the release (a tick of the
    announcer racing a hand-over) is refused instead of bringing the claim back to life."""

    membership: SwarmMembership
    job: Job
    model: str
    last_expiry: float = 0.0
    released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _publish(self, state: str, step: int) -> None:
        expires = claim_expiry(state, get_dht_time(), self.last_expiry, self.membership.manifest.timing.lease_expiry_s)
        claim = Claim(self.membership.swarm_id, self.job, self.model, self.membership.peer_id, step, state, expires)
        self.membership.publish(claim.signed_by(self.membership.identity))
        self.last_expiry = expires

    def renew(self, step: int) -> bool:
        """Extend the lease by 3T; False (and nothing published) if it was released."""
        with self._lock:
            if self.released:
                return False
            self._publish("training", step)
            return True

    def release(self, step: int) -> None:
        """Give the job back at once (a tombstone that outlives the lease), so others need not wait 3T.
        Only the first call publishes."""
        with self._lock:
            if self.released:
                return
            self.released = True
            try:
                self._publish("released", step)
            except Exception as error:  # leaving must not fail because the swarm is gone
                logger.warning(f"could not release the claim on {self.job}: {error}")


def progress_by_job(membership: SwarmMembership, jobs: List[Job], verified=None
                    ) -> Tuple[Dict[Job, int], Dict[Job, Set[str]]]:
    """Latest announced step of every job (live records), and the signers this node verified a
    checkpoint of it from (`verified.signers(job)`; nobody without `verified`)."""
    progress: Dict[Job, int] = {}
    proven: Dict[Job, Set[str]] = {}
    for job in jobs:
        records = membership.job_checkpoints(job)
        progress[job] = max((r.step for r in records), default=0)
        proven[job] = verified.signers(job) if verified is not None else set()
    return progress, proven


def claim_job(membership: SwarmMembership, jobs: List[Job], model_for_job, *, forced: Optional[Job] = None,
              settle_s: float = 1.0, rounds: int = 5, after: float = 0.0, verified=None) -> Lease:
    """Pick a job, claim it, and move if a simultaneous starter won the same job.

    `after` is the expiration of the last claim record this node published (the tombstone of the
    lease it just released, when it moves): a node has one claim entry in the DHT, where the latest
    expiration wins, so a new claim must outlive the tombstone or the DHT keeps the tombstone.
    """
    me = membership.identity.signer_id
    progress, proven = progress_by_job(membership, jobs, verified)
    job = forced or choose_job(jobs, membership.claims(), progress, me, get_dht_time(), proven)
    lease = Lease(membership, job, model_for_job(job), last_expiry=after)
    lease.renew(progress.get(job, 0))
    for _ in range(0 if forced else rounds):
        time.sleep(settle_s)
        claims = membership.claims()
        if not should_move(lease.job, jobs, claims, me, get_dht_time()):
            break
        lease.release(0)
        job = job_after_lost_race(lease.job, jobs, claims, progress, me, get_dht_time(), proven)
        logger.info(f"{lease.job} is taken by a peer that started at the same time; moving to {job}")
        lease = Lease(membership, job, model_for_job(job), last_expiry=lease.last_expiry)
        lease.renew(progress.get(job, 0))
    return lease
