"""Peers of a simulated swarm, doing what `node.trainer.peer.SwarmNode` does, in simulated time.

Each peer is a few processes on the event queue, in the node's order:
1. join the DHT; `claim_job`: read every job's checkpoint records one key after another
   (`progress_by_job`), read the claims, `choose_job`, publish the claim and read it back
   (`SwarmMembership.publish` confirms), then up to 5 rounds of: wait 1 s, read the claims,
   `should_move` -> release and take `job_after_lost_race`. A restarting peer first asks
   `keep_previous_job` whether it continues its previous job;
2. resume (a fetch, `resume_s`), then the announcer ticks every T: renew the lease (`claim_expiry`),
   presence, provider records when `provider_due`, its checkpoint record when `record_due`;
3. once a lease period, the coverage check: read the claims, `should_move`, `next_move_streak` ->
   give the job back and claim again;
4. a checkpoint every `checkpoint_s`: a provider record and a checkpoint record, both confirmed;
5. the mirror, T after each round: read every other job's records, hold each job's best by
   `rank` (fetching what changed), provide what it holds.
A peer leaves by crashing (nothing published: its claim lives until it expires, 3T) or cleanly
(the release tombstone at once). The rules are imported; only this sequencing is written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from benchmarks.simulation.dht import CheckpointStore, ClaimStore, Counters, RecordSizes
from benchmarks.simulation.events import Draws, EventQueue, NetworkModel
from node.checkpoints.acceptance import rank
from node.swarm.announcer import provider_due, provider_ttl_s, record_due
from node.swarm.leases import (choose_job, claim_expiry, job_after_lost_race, keep_previous_job, next_move_streak,
                               should_move)
from protocol.hashing import BlobRef
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord

CLAIM_ROUNDS, SETTLE_S, PUBLISH_ATTEMPTS = 5, 1.0, 5  # claim_job's and SwarmMembership.publish's defaults
LOOKUP_BATCH = 64  # acceptance.LOOKUP_BATCH: provider look-ups per traversal


@dataclass
class Peer:
    slot: int  # the identity: a restart keeps it (and its previous job)
    signer: str
    row: int  # its row in the mirror's table
    alive: bool = True
    job: Optional[int] = None
    released: bool = True
    last_expiry: float = 0.0
    step: int = 0
    streak: int = 0
    record_expires: float = 0.0
    provider_expires: float = 0.0
    mirrored: int = 0


class Swarm:
    """The simulated swarm: its DHT, its peers, and the counters every measurement reads."""

    def __init__(self, manifest: SwarmManifest, network: NetworkModel, rng: np.random.Generator, *,
                 checkpoint_s: float = 300.0, resume_s: float = 15.0, fetch_s: float = 5.0, join_s: float = 1.0,
                 mirror: bool = True, capacity: int = 1024):
        self.manifest, self.network, self.rng = manifest, network, rng
        self.jobs = manifest.jobs
        self.J = len(self.jobs)
        self.T, self.expiry_s = manifest.timing.lease_s, manifest.timing.lease_expiry_s
        self.ttl = manifest.timing.record_ttl_s
        self.checkpoint_s, self.resume_s, self.fetch_s, self.join_s = checkpoint_s, resume_s, fetch_s, join_s
        self.mirror_on = mirror
        self.q, self.draws = EventQueue(), Draws(network, rng)
        self.sizes = RecordSizes.measure(manifest)
        self.claims, self.counters = ClaimStore(self.jobs, self._note_coverage), Counters()
        self.signers: List[str] = []
        self.checkpoints = CheckpointStore(self.jobs, rank, self.signers)
        self.peers: List[Peer] = []
        self.previous_job: Dict[int, int] = {}  # slot -> the job it trained last (its node.json)
        self.free_rows: List[int] = []
        self.held = np.full((capacity, self.J), -1, dtype=np.int64)  # row -> step of each job it holds
        self.best_step = np.full(self.J, -1, dtype=np.int64)
        self.best_slot = np.full(self.J, -1, dtype=np.int64)
        self._best_until = np.zeros(self.J)
        self._dirty = np.ones(self.J, dtype=bool)
        self.providers_per_blob = 1.0  # refreshed by the sampler
        self.events: Dict[str, list] = {"takeover_crash": [], "takeover_clean": [], "gap": [], "moves": [],
                                        "lost_races": [], "claim_s": [],
                                        "probe_crash": [], "probe_clean": []}
        self.orphaned_at: Dict[int, tuple] = {}  # job -> (when its last holder left, how)
        self.probes: Dict[int, tuple] = {}  # job -> (when all its trainers were made to leave, how), until retaken
        self.probed: set = set()  # every job a probe ever emptied (left out of the churn-only coverage)
        self.uncovered_since: Dict[int, float] = {}  # job -> since when (a job never covered is not in it)
        self.full_at: Optional[float] = None  # the first moment every job had a live claim
        self._blob = BlobRef.of(1 << 20, "0" * 64)

    # --- identities and rows -----------------------------------------------------------------------
    def new_identity(self) -> int:
        self.signers.append(self.rng.bytes(32).hex())  # an ed25519 signer id is 64 hex digits
        return len(self.signers) - 1

    def _row(self) -> int:
        if self.free_rows:
            return self.free_rows.pop()
        row = len(self.peers)
        if row >= len(self.held):
            self.held = np.concatenate([self.held, np.full_like(self.held, -1)])
        return row

    def arrive(self, slot: Optional[int] = None) -> Peer:
        """A peer starts now: a newcomer (a new identity) or, given `slot`, a restart of that identity."""
        slot = self.new_identity() if slot is None else slot
        peer = Peer(slot, self.signers[slot], self._row())
        self.held[peer.row] = -1
        self.peers.append(peer)
        self.q.start(self._lifecycle(peer))
        return peer

    def leave(self, peer: Peer, crash: bool) -> None:
        if not peer.alive:
            return
        now = self.q.now
        if peer.job is not None and not peer.released:
            self.previous_job[peer.slot] = peer.job
            holders = self.claims.holders[peer.job]
            if set(holders) <= {peer.slot}:
                self.orphaned_at[peer.job] = (now, "crash" if crash else "clean")
            if not crash:
                self.q.start(self._publish_claim(peer, peer.job, "released", "leave"))
        self.counters.store("presence", 0 if crash else self.sizes.peer)
        peer.alive = False
        self.free_rows.append(peer.row)

    def empty_job(self, job: int, crash: bool, depart) -> None:
        """An orphan probe: every live trainer of `job` leaves now (by `depart`, the churn's own
        departure, so arrivals replace them as usual); its takeover is timed to the first new claim."""
        self.probes[job] = (self.q.now, "crash" if crash else "clean")
        self.probed.add(job)
        for peer in [p for p in self.peers if p.alive and p.job == job and not p.released]:
            depart(peer, crash)

    # --- DHT operations (each one counted) ---------------------------------------------------------
    def _read_claims(self, purpose: str):
        """A read of the claims key: yields its latency, returns whether it was lost."""
        seconds, lost = self.draws.op()
        self.counters.get(purpose, self.claims.live_entries * self.sizes.claim)
        yield seconds
        return lost

    def _publish_claim(self, peer: Peer, job: int, state: str, purpose: str):
        """`Lease._publish` through `SwarmMembership.publish` (store, read back, retry)."""
        for attempt in range(PUBLISH_ATTEMPTS):
            now = self.q.now
            expires = claim_expiry(state, now, peer.last_expiry, self.expiry_s)
            seconds, lost = self.draws.op()
            self.counters.store(purpose, self.sizes.claim)
            yield seconds
            applied = not lost and self.claims.store(peer.slot, peer.signer, job, state, expires, self.q.now)
            seconds, read_lost = self.draws.op()
            self.counters.get(purpose, self.claims.live_entries * self.sizes.claim)
            yield seconds
            if applied and state == "training" and job in self.probes and peer.alive:
                left, how = self.probes.pop(job)  # the first new live claim on an emptied job: taken over
                self.events["probe_" + how].append(self.q.now - left)
                self.orphaned_at.pop(job, None)
            if applied and not read_lost:
                peer.last_expiry = expires
                return
            yield 0.2 * (attempt + 1)

    def _note_coverage(self, job: int, covered: bool, now: float) -> None:
        """Takeover and gap times: called by the claim store when `job` gets its first holder or loses
        its last one (at the store's completion, or at the very moment a claim expires)."""
        if covered and self.full_at is None and self.claims.uncovered == 0:
            self.full_at = now
        if covered and job in self.uncovered_since:
            self.events["gap"].append(now - self.uncovered_since.pop(job))
            if job in self.orphaned_at:
                left, how = self.orphaned_at.pop(job)
                self.events["takeover_" + how].append(now - left)
        elif not covered and job not in self.uncovered_since:
            self.uncovered_since[job] = now

    def _progress(self):
        """`progress_by_job`: one read per job, one after another. Also job index -> slots of the
        proven (the same signers, for `ClaimStore.choice_view`)."""
        now, progress, proven, proven_slots = self.q.now, {}, {}, {}
        summary, get = self.checkpoints.summary, self.counters.get
        for j, job in enumerate(self.jobs):
            progress[job], proven[job], proven_slots[j] = summary(j, now)
            get("join", len(proven_slots[j]) * (self.sizes.router if job.is_router else self.sizes.checkpoint))
        return progress, proven, proven_slots

    # --- the node ----------------------------------------------------------------------------------
    def _lifecycle(self, peer: Peer):
        yield self.join_s * float(np.exp(0.5 * self.rng.standard_normal()))
        if not peer.alive:
            return
        yield from self._claim(peer, forced=self.previous_job.get(peer.slot))
        if not peer.alive:
            return
        yield self.resume_s * float(np.exp(0.5 * self.rng.standard_normal()))
        if not peer.alive:
            return
        self.q.start(self._announcer(peer))
        self.q.start(self._coverage(peer), self.T * self.rng.random())
        self.q.start(self._checkpointer(peer), self.checkpoint_s * self.rng.random())
        if self.mirror_on:
            self.q.start(self._mirror(peer), self.T)

    def _claim(self, peer: Peer, forced: Optional[int] = None):
        started = self.q.now
        everything = range(self.J)
        if forced is not None:
            lost = yield from self._read_claims("join")
            view = [] if lost else self.claims.compact_view(forced, self.q.now, per_job=2)
            if not keep_previous_job(self.jobs[forced], self.jobs, view, peer.signer, self.q.now):
                forced = None
        yield self.draws.sequential(self.J)
        progress, proven, proven_slots = self._progress()
        if forced is None:
            lost = yield from self._read_claims("join")
            view = [] if lost else self.claims.choice_view(everything, peer.slot, proven_slots, self.q.now)
            job = choose_job(self.jobs, view, progress, peer.signer, self.q.now, proven).cluster
            job = self.J - 1 if job is None else job  # the router is the last job
        else:
            job = forced
        peer.job, peer.released, peer.step = job, False, progress.get(self.jobs[job], 0)
        yield from self._publish_claim(peer, job, "training", "join")
        for _ in range(0 if forced is not None else CLAIM_ROUNDS):
            yield SETTLE_S
            lost = yield from self._read_claims("join")
            now = self.q.now
            view = [] if lost else self.claims.compact_view(peer.job, now)
            if not should_move(self.jobs[peer.job], self.jobs, view, peer.signer, now):
                break
            self.events["lost_races"].append(now)
            peer.released = True
            yield from self._publish_claim(peer, peer.job, "released", "join")
            lost_job = peer.job
            view = [] if lost else self.claims.choice_view([j for j in everything if j != lost_job], peer.slot,
                                                           proven_slots, self.q.now)
            job = job_after_lost_race(self.jobs[lost_job], self.jobs, view, progress, peer.signer,
                                      self.q.now, proven).cluster
            job = self.J - 1 if job is None else job
            peer.job, peer.released = job, False
            yield from self._publish_claim(peer, job, "training", "join")
        self.events["claim_s"].append(self.q.now - started)

    def _announcer(self, peer: Peer):
        while peer.alive:
            if not peer.released:
                yield from self._publish_claim(peer, peer.job, "training", "lease")
                if not peer.alive:
                    return
            now = self.q.now
            self.counters.store("presence", self.sizes.peer)
            provided = (1 if peer.record_expires else 0) + peer.mirrored
            if provided and provider_due(peer.provider_expires, now, self.T):
                self.counters.store("providers", provided * self.sizes.provider, provided)
                self.counters.get("providers", provided * self.providers_per_blob * self.sizes.provider, provided)
                peer.provider_expires = now + provider_ttl_s(self.T)
            if peer.record_expires and record_due(peer.record_expires, now, self.T, self.ttl):
                self._store_checkpoint(peer, "refresh")
            yield self.T

    def _coverage(self, peer: Peer):
        while peer.alive:
            if peer.released:  # moving: the claim in progress decides
                yield self.T
                continue
            lost = yield from self._read_claims("coverage")
            if not peer.alive or peer.released:
                continue
            now, claims, job = self.q.now, self.claims, peer.job
            claims.advance(now)
            # should_move is a conjunction: with every job held, or nobody else on our job, it is
            # False without looking further (tests/test_swarm_sim.py checks this against the call)
            move = (not lost and claims.uncovered > 0 and len(claims.holders[job]) > 1
                    and should_move(self.jobs[job], self.jobs, claims.compact_view(job, now), peer.signer, now))
            peer.streak, moves = next_move_streak(peer.streak, move)
            if moves:
                self.events["moves"].append(now)
                peer.released, peer.streak = True, 0
                yield from self._publish_claim(peer, job, "released", "coverage")
                yield from self._claim(peer)
            yield self.T

    def _store_checkpoint(self, peer: Peer, purpose: str, record=None) -> None:
        """Store + read back a checkpoint record (new, or the held one with a new expiration)."""
        j, now = peer.job, self.q.now
        size = self.sizes.router if self.jobs[j].is_router else self.sizes.checkpoint
        expires = now + self.ttl
        self.counters.store(purpose, size, 2 if purpose == "checkpoint" else 1)  # + its provider record
        self.counters.get(purpose, self.checkpoints.count(j) * size + self.sizes.provider, 2 if record else 1)
        entry = self.checkpoints.records[j].get(peer.slot)
        record = record if record is not None else (entry[0] if entry else None)
        if record is not None:
            self.checkpoints.store(j, peer.slot, record, expires, now)
            self._dirty[j] = True
        peer.record_expires = expires

    def _checkpointer(self, peer: Peer):
        while peer.alive:
            if peer.released:
                yield self.T
                continue
            peer.step += self.manifest.timing.checkpoint_every_steps
            job, now = self.jobs[peer.job], self.q.now
            if job.is_router:
                record = RouterRecord(self.manifest.swarm_id, "router", "0" * 64, self.J - 1, peer.step, peer.step,
                                      float(self.rng.random()), self._blob, self._blob, "", now, now + self.ttl)
            else:
                record = CheckpointRecord(self.manifest.swarm_id, job.cluster, "m", "fm", "0" * 64, peer.step,
                                          peer.step, float(self.rng.random()), self._blob, self._blob, "", now, now + self.ttl)
            seconds, lost = self.draws.op()
            yield 2 * seconds  # provider record first, then the checkpoint record (each confirmed)
            if peer.alive and not peer.released and not lost:
                self._store_checkpoint(peer, "checkpoint", record)
            yield self.checkpoint_s

    def refresh_best(self) -> None:
        """Each job's best live record by `rank`, recomputed only for jobs whose records changed."""
        now = self.q.now
        for j in np.nonzero(self._dirty | (self._best_until <= now))[0]:
            best = self.checkpoints.best(int(j), now)
            self.best_step[j], self.best_slot[j] = (best[0].step, best[2]) if best else (-1, -1)
            self._best_until[j] = min((e[1] for e in self.checkpoints.live(int(j), now)), default=np.inf)
        self._dirty[:] = False

    def _mirror(self, peer: Peer):
        while peer.alive:
            own = peer.job if peer.job is not None else -1
            reads = self.J - (1 if own >= 0 else 0)
            others = self.checkpoints.total - (self.checkpoints.count(own) if own >= 0 else 0)
            self.counters.get("mirror", others * self.sizes.checkpoint, reads)
            yield self.draws.sequential(reads)
            if not peer.alive:
                return
            self.refresh_best()
            row = self.held[peer.row]
            wanted = self.best_step.copy()
            if own >= 0:
                wanted[own] = row[own]
            changed = (wanted >= 0) & (wanted != row)
            fetched = int(changed.sum())
            if fetched:
                lookups = -(-fetched // LOOKUP_BATCH)
                self.counters.get("mirror", fetched * self.providers_per_blob * self.sizes.provider, lookups)
                self.counters.store("mirror", fetched * self.sizes.provider, fetched)  # provide(now=True)
                self.counters.get("mirror", fetched * self.providers_per_blob * self.sizes.provider, fetched)
                yield self.fetch_s * fetched
                if not peer.alive:
                    return
                row[changed] = wanted[changed]
            peer.mirrored = int((row >= 0).sum()) - (1 if own >= 0 and row[own] >= 0 else 0)
            yield self.T
