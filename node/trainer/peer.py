"""A training node of the swarm: join, claim a job, train, checkpoint, announce, serve.

States (`NodeState`): JOINING (DHT, identity, blob server) -> CLAIMING (pick a job, take its lease)
-> RESUMING (local state, or the swarm's latest checkpoint of an orphaned job; with nothing to
resume, `--init-from`'s pretrained start, `node.trainer.initialisation`) -> TRAINING
(checkpoints every N steps, each written locally, added to the blob store, then announced) ->
MOVING (its job has other trainers while some job has none: checkpoint, give the job back, back to
CLAIMING) | SERVING (budget spent: the job is given back, blobs are still served) | HANDING_OVER
(stopped: the job is given back; the last checkpoint is served until another peer holds it, see
`node.trainer.handover`) -> LEAVING -> OFFLINE (tombstones published). Every transition is shown
and announced. Each service is registered for teardown as it starts (an `ExitStack`), so a start-up
that fails half-way stops exactly what it started. The job is given back only through
`Announcer.give_back` (detach + release under one lock).
A node killed at any moment restarts from its last local checkpoint: state files and blobs are
written atomically before they are announced, and the blob of every record it may have in the DHT
stays in its store (see `node.checkpoints.published`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import threading
import time
from pathlib import Path
from contextlib import ExitStack
from typing import Callable, List, Optional, Set

import torch
from hivemind.utils.timed_storage import get_dht_time

from ddm_models.devices import resolve_device
from node.swarm.announcer import Announcer
from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.trainer.pipeline import CheckpointPipeline
from node.checkpoints.acceptance import Verified
from node.checkpoints.publishing import CHECKPOINT_PAUSE_S, publish_checkpoint
from node.swarm.leases import Lease, MoveWatch, claim_job, keep_previous_job
from node.errors import DiskFull
from node.files import hold_exclusive_lock
from node.trainer.handover import hand_over_checkpoint, needs_hand_over
from node.checkpoints.specs import check_model_specs
from node.data.shards import fetch_shard
from node.data.swarm_data import job_data
from node.identity_files import identities_for_join
from node.swarm.membership import SwarmMembership
from node.swarm.peer_cache import PeerCache, join_with_cache
from node.checkpoints.audits import Auditor
from node.checkpoints.mirror import Mirror
from node.network import NetworkLoop
from node.trainer.ranks import RankGroup, SingleRank
from node.trainer.state import JobFile, NodeOptions, NodeState, NodeStatus, TrainingSummary
from node.swarm.presence import Presence
from node.swarm.reachability import DialBackService, probe_reachability
from node.checkpoints.published import PublishedCheckpoints, Record
from node.trainer.building import build_trainer, load_own_state
from node.trainer.initialisation import PretrainedStart
from node.trainer.resume import announce_again, prove_claimers, resume_from_swarm
from protocol.hashing import BlobRef
from protocol.jobs import Job
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.node")


class SwarmNode:
    def __init__(self, manifest: SwarmManifest, options: NodeOptions,
                 on_status: Optional[Callable[[NodeStatus], None]] = None, ranks: Optional[RankGroup] = None):
        self.manifest, self.options, self.on_status = manifest, options, on_status or (lambda status: None)
        self.status = NodeStatus()
        self.data_dir = Path(options.data_dir)
        self.job_file = JobFile(self.data_dir / "node.json")  # the job this data dir trains, for restarts
        self.jobs: List[Job] = manifest.jobs
        self.stop_event = threading.Event()
        self.ranks = ranks or SingleRank()  # the other training processes of this node (`node.trainer.ranks`)
        self.ranks.on_stop = self.stop_event.set  # a follower told to stop stops the node
        self.leave_now = threading.Event()
        self._teardown = ExitStack()  # services stop in reverse order of their start
        # the node's collaborators, set while JOINING (None before)
        self.membership: Optional[SwarmMembership] = None
        self.loop: Optional[NetworkLoop] = None
        self.store: Optional[BlobStore] = None
        self.blobs: Optional[BlobService] = None
        self.presence: Optional[Presence] = None
        self.announcer: Optional[Announcer] = None
        self.mirror: Optional[Mirror] = None
        self.verified = Verified()  # checkpoints this node checked itself: step bounds, proven claimers
        self.auditor: Optional[Auditor] = None
        self.pretrained: Optional[PretrainedStart] = None  # --init-from
        # the job's, set while CLAIMING and RESUMING
        self.lease: Optional[Lease] = None
        self.data = None
        self.trainer = None
        self.published: Optional[PublishedCheckpoints] = None
        self.parent_blob: Optional[str] = None
        self._last_ckpt_step = -1
        self._peers_checked = 0.0
        self._checkpoints, self._checkpoint_seconds = 0, 0.0
        # on a CPU, checkpoints are evaluated and written while training goes on; on a GPU a frozen
        # copy would double the memory of weights and moments, and its evaluation is cheap there
        self.checkpoints = CheckpointPipeline(background=resolve_device(options.device).type == "cpu")
        self._moving = False
        self.moves: Optional[MoveWatch] = None  # set while JOINING
        self._left_behind: Set[str] = set()  # checkpoints of jobs this node moved away from: still served
        self._budget_started: Optional[float] = None
        self.summary: Optional[TrainingSummary] = None  # set when the training phase ends

    # --- lifecycle -------------------------------------------------------------------------------
    def run(self) -> None:
        torch.set_num_threads(self.options.threads)
        check_model_specs(self.manifest)  # a model the swarm names but cannot build: say so before joining
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        with self._teardown:  # stops every service that started, in reverse order
            self._teardown.callback(self.ranks.release)  # last: after the final checkpoint
            try:
                self._run()
            finally:
                self._set(state=NodeState.OFFLINE)

    def _run(self) -> None:
        self._join()
        self._claim_and_resume()
        self._train()
        while self._moving and not self.stop_event.is_set():  # a job had no trainer: take it over
            self._set(state=NodeState.MOVING)
            self._leave_job()
            self._claim_and_resume()
            self._train()
        self.ranks.release()  # training is over: the other ranks leave
        if not self.options.exit_when_done and not self.stop_event.is_set():
            self._serve()
        else:
            self._hand_over()
        self._set(state=NodeState.LEAVING)

    def _give_back_job(self) -> None:
        """The one way this node gives its job back (on a move, at the end of the budget, when stopped)."""
        self.announcer.give_back(self.trainer.step if self.trainer else 0)

    def _leave_job(self) -> None:
        """Give the current job back to move to another; keep serving its checkpoints, since our
        records of it name them."""
        left = self.lease.job
        self._left_behind |= set(self.published.keep())
        if left in self.announcer.confirmed:
            self._left_behind |= self.announcer.confirmed[left]
        self._give_back_job()

    def _on_signal(self, *_) -> None:
        if self.stop_event.is_set():
            self.leave_now.set()  # a second Ctrl-C: leave without waiting for the hand-over
        self.stop_event.set()

    def _join(self) -> None:
        stop = self._teardown.callback
        # nothing is written to the data folder until the node has joined
        network = self.options.network
        self.reachability = asyncio.run(probe_reachability(self.options.initial_peers, self.options.host,
                                                           self.options.port, network))
        logger.info(f"reachability: {self.reachability.describe()}")
        reachable = self.reachability.reachable
        self.peer_cache = PeerCache(self.data_dir / "peers.json")
        with identities_for_join(self.data_dir / "identity.pem", self.data_dir / "p2p.key") as (identity, p2p_key):
            self.membership = join_with_cache(lambda peers: SwarmMembership(  # an unreachable node is a DHT client
                self.manifest, identity, initial_peers=peers, host=self.options.host, port=self.options.port,
                p2p_identity_path=p2p_key, network=network, reachable=reachable, client_mode=not reachable),
                self.options.initial_peers, self.peer_cache)
            stop(self.membership.shutdown)  # before the identity files are written: that can fail too
        self._data_dir_lock = hold_exclusive_lock(self.data_dir / "node.lock", f"data dir {self.data_dir}")
        for problem in self.membership.beacon_problems():
            logger.warning(problem)
        self.membership.announce_beacon()
        self.loop = NetworkLoop()
        stop(self.loop.stop)
        self.store = BlobStore.open_checked(self.data_dir / "blobs")  # we hold the data dir's lock
        direct_host = None if network.direct_port is None or not reachable else self.options.host
        self.blobs = BlobService(self.membership, self.store, self.loop, direct_host=direct_host,
                                 direct_port=network.direct_port or 0)
        stop(self.blobs.stop)
        self.dial_back = DialBackService()  # others ask this node whether they can be dialed
        self.loop.run(self.dial_back.start(self.blobs.p2p), timeout=60)
        stop(lambda: self.loop.run(self.dial_back.stop(), timeout=10))
        self.presence = Presence(self.membership, role="trainer")
        self.announcer = Announcer(self.membership, self.presence, lambda: self.trainer.step if self.trainer else 0)
        stop(self.announcer.stop, release=True)  # gives the job back, then the OFFLINE tombstone
        self._set(state=NodeState.JOINING)
        self.moves = MoveWatch(self.membership, self.manifest.timing.lease_s)
        self.mirror = Mirror(self.membership, self.blobs, self.announcer, self.jobs,
                             period_s=self.manifest.timing.lease_s)
        self.mirror.protected = self._own_blobs
        self.mirror.verified = self.verified
        stop(self.mirror.stop)
        self.auditor = Auditor(self.membership, self.blobs, self.manifest, self.jobs,
                               lambda cluster: self.data.heldout_data(cluster) if self.data is not None else None,
                               period_s=self.manifest.timing.lease_s)
        stop(self.auditor.stop)
        if self.options.init_from is not None:
            self.pretrained = PretrainedStart(self.options.init_from, self.manifest, self.membership, self.blobs,
                                              self.store, self.announcer)
        stop(self.checkpoints.close)  # a checkpoint in flight is finished before its announcer stops
        logger.info(f"joined swarm '{self.manifest.name}' as {self.membership.peer_id} "
                    f"(signer {identity.signer_id[:12]}…)")

    # --- claiming and resuming -------------------------------------------------------------------
    def _claim_and_resume(self) -> None:
        self._set(state=NodeState.CLAIMING)
        forced = self.options.job or self.job_file.read(self.jobs, self.manifest.name)
        if forced and not self.options.job and not keep_previous_job(
                forced, self.jobs, self.membership.claims(), self.membership.identity.signer_id, get_dht_time()):
            logger.info(f"{forced}, this node's previous job, has other trainers while a job has none: moving")
            forced = None
        model_for = lambda job: self.manifest.model_for(job, self.options.model).name  # noqa: E731
        if not forced:  # who is proven on which job: only what this node verified counts
            prove_claimers(self.jobs, self.membership, self.blobs, self.store, self.manifest, self.verified)
        self.lease = claim_job(self.membership, self.jobs, model_for, forced=forced,
                               after=self.lease.last_expiry if self.lease else 0.0, verified=self.verified)
        job = self.lease.job
        self.job_file.write(job, self.lease.model)
        self.announcer.hold(self.lease)
        self.mirror.own_job = job
        self._set(state=NodeState.RESUMING, job=job, model=self.lease.model)
        self.data = job_data(self.manifest, self.data_dir / "cache", fetch=self._fetch_shard)
        self.data.prefetch(job)  # a node's other training processes read the shards from its store
        self.ranks.start_job(job, self.lease.model)
        self.trainer = build_trainer(self.manifest, job, self.lease.model, self.data, seed=self.options.seed,
                                     device=self.options.device)
        self._resume(job)
        self.ranks.share_state(self.trainer)
        if not self._moving:  # the first job; a node that moves keeps its announcer and mirror
            self.announcer.start()
            if self.options.mirror:
                self.mirror.start()
                if self.options.audit:
                    self.auditor.start()
        self._moving = False
        self.moves.reset()

    def _state_dir(self, job: Job) -> Path:
        return self.data_dir / "jobs" / job.slug / self.lease.model

    def _resume(self, job: Job) -> None:
        state = self._state_dir(job)
        for leftover in state.glob(".*.tmp"):  # a state file or published.json a crash cut off (we hold the lock)
            leftover.unlink(missing_ok=True)
        self.published = PublishedCheckpoints(state)
        self.parent_blob = self.published.blob
        resumed = None  # what this job resumed from, if anything: a pretrained start never replaces it
        if load_own_state(self.trainer, state, self.published):
            self._set(resumed_from=f"local step {self.trainer.step}")
            logger.info(f"resumed {job} from this node's own state at step {self.trainer.step}")
            resumed = f"this node's own state at step {self.trainer.step}"
        record = self._resume_from_swarm(job)
        resumed = f"the swarm's checkpoint at step {record.step}" if record is not None else resumed
        if self.pretrained is not None and not job.is_router:  # --init-from
            started = self.pretrained.start(job, self.lease.model, self.trainer, state,
                                            seed=self.options.seed + job.cluster, resumed=resumed)
            if started is not None:
                self.parent_blob = started.parent_blob or self.parent_blob
                self._set(resumed_from=f"--init-from {started.description}"[:80])
        announce_again(job, self.published, self.store, self.membership, self.announcer,
                       self.manifest.timing.record_ttl_s)
        self._last_ckpt_step = self.trainer.step
        self._set(step=self.trainer.step)

    def _resume_from_swarm(self, job: Job) -> Optional[Record]:
        spec_hash = self.manifest.model_for(job, self.lease.model).spec_hash
        if self.published.record is not None and self.published.record.swarm_id == self.membership.swarm_id:
            self.verified.add(self.published.record)  # our own work, made at its created_at
        record = resume_from_swarm(job, spec_hash, self.trainer, self.membership, self.blobs, self.store, self.manifest,
                                   self.announcer, self.verified)
        if record is None:
            return None
        self.parent_blob = record.blob.sha256
        self.announcer.provide(record.blob)
        self._set(resumed_from=f"swarm step {record.step} by {record.signer[:12]}")
        logger.info(f"resumed orphaned {job} from the swarm's checkpoint at step {record.step} "
                    f"(signer {record.signer[:12]}…)")
        return record

    def _fetch_shard(self, ref: BlobRef) -> Path:
        """A data shard of this node's job (see `node.data.shards`), then served on."""
        path = fetch_shard(ref, self.blobs, self.manifest.dataset.shard_urls, f"{self.lease.job}")
        self.announcer.provide(ref, now=True)
        return path

    def _own_blobs(self) -> Set[str]:
        """Blobs this node must keep: its published checkpoints, the one the DHT last confirmed for
        it, the checkpoint it resumed from, and those of jobs it moved away from."""
        own = set(self.published.keep()) if self.published else set()
        own |= self._left_behind
        own |= self.data.held if self.data is not None else set()  # the data shards of this node's jobs
        if self.lease is not None and self.lease.job in self.announcer.confirmed:
            own |= self.announcer.confirmed[self.lease.job]
        if self.parent_blob:
            own.add(self.parent_blob)
        return own

    # --- training --------------------------------------------------------------------------------
    def _budget_left(self, started: float, start_step: int) -> bool:
        if self.options.max_minutes is not None and time.monotonic() - started >= 60 * self.options.max_minutes:
            return False
        return self.options.max_steps is None or self.trainer.step < self.options.max_steps

    def _train(self) -> None:
        self._set(state=NodeState.TRAINING)
        every = self.manifest.timing.checkpoint_every_steps
        self._budget_started = self._budget_started or time.monotonic()  # --max-minutes spans every job
        started, start_step = self._budget_started, self.trainer.step
        wall_start, checkpoints_before = time.perf_counter(), self._checkpoint_seconds
        work_before = self.checkpoints.busy_seconds
        while not self.stop_event.is_set() and self._budget_left(started, start_step):
            steps = every - (self.trainer.step % every)
            if self.options.max_steps is not None:
                steps = min(steps, self.options.max_steps - self.trainer.step)
            minutes_left = None if self.options.max_minutes is None else \
                60 * self.options.max_minutes - (time.monotonic() - started)
            stats = self.ranks.train_for(self.trainer, min(self.options.slice_s, minutes_left or self.options.slice_s),
                                         max_steps=steps)
            self._set(step=stats.step, loss=stats.loss, images_per_s=stats.images_per_s)
            self.checkpoints.check()  # a checkpoint that failed (a full disk) stops the node here
            if self.trainer.step % every == 0 and self.trainer.step != self._last_ckpt_step:
                self.checkpoint()
            if self._job_needs_me_elsewhere():
                self._moving = True
                logger.info(f"a job has had no trainer for a while and {self.lease.job} has others: moving")
                break
        if self.trainer.step != self._last_ckpt_step:
            self.checkpoint()  # nothing trained is lost on a clean stop or at the end of the budget
        self.checkpoints.wait()
        steps = self.trainer.step - start_step
        self.summary = TrainingSummary(self.lease.job, steps, steps * self.trainer.batch_size * self.trainer.world_size,
                                       time.perf_counter() - wall_start, self._checkpoints,
                                       self._checkpoint_seconds - checkpoints_before,
                                       self.checkpoints.busy_seconds - work_before)

    def _job_needs_me_elsewhere(self) -> bool:
        if self.options.job is not None or self.options.max_steps is not None:
            return False  # a job or a step budget chosen by the user stays
        return self.moves.move_now(self.lease.job, self.jobs)

    def checkpoint(self) -> None:
        """Freeze this step's weights; then (on the checkpoint thread, while training goes on) write
        the local state, put the publishable checkpoint in the blob store and announce it."""
        started = time.perf_counter()
        try:
            frozen = self.trainer.frozen_copy() if self.checkpoints.background else self.trainer
            self.checkpoints.submit(lambda: self._checkpoint(frozen))
            self._last_ckpt_step = frozen.step
        finally:
            self._checkpoints += 1
            self._checkpoint_seconds += time.perf_counter() - started

    def _checkpoint(self, trainer) -> None:
        job = self.lease.job
        try:
            record, metric = publish_checkpoint(trainer, job, self.lease.model, self._state_dir(job), self.store,
                                              self.published, self.membership, self.manifest, self.parent_blob or "")
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DiskFull(f"the disk under {self.data_dir} is full: writing the checkpoint of step "
                           f"{trainer.step} failed ({error.strerror}). Free some space and restart the node; "
                           f"nothing written before is lost (last published checkpoint: step "
                           f"{self.published.step})") from None
        if CHECKPOINT_PAUSE_S:
            time.sleep(CHECKPOINT_PAUSE_S)  # published.json written, announcement not yet queued
        self.announcer.announce_checkpoint(job, record)
        self.verified.add(record)
        self.peer_cache.remember(self.membership)  # the peers met so far: a way back in if the bootstraps go
        removed = self.store.gc(keep={*self._own_blobs(), *self.mirror.held(), *self.auditor.held()})
        for sha in removed.blobs:  # stop announcing what we no longer hold
            self.announcer.unprovide(sha)
        self.parent_blob = record.blob.sha256
        # shown at the training thread's next status update
        self.status.last_checkpoint = f"step {trainer.step} ({'acc' if job.is_router else 'loss'} {metric:.4f})"

    def _hand_over(self) -> None:
        """Give the job back, then serve the last checkpoint until another peer holds it (bounded)."""
        self._give_back_job()
        record = self.published.record if self.published else None
        if record is None or not needs_hand_over(self.membership):
            return
        self._set(state=NodeState.HANDING_OVER)
        hand_over_checkpoint(self.membership, record, self.manifest.timing.lease_s, self.leave_now, self.blobs.holds)

    def _serve(self) -> None:
        """The budget is spent: give the job back, keep serving blobs until stopped."""
        self._give_back_job()
        self._set(state=NodeState.SERVING)
        logger.info("training budget spent: job released, still serving checkpoints (Ctrl-C to leave)")
        while not self.stop_event.wait(1.0):
            self._set()

    def _set(self, **changes) -> None:
        state = changes.get("state")
        for name, value in changes.items():
            setattr(self.status, name, value)
        if state is not None and self.presence is not None and state is not NodeState.OFFLINE:
            try:  # every transition is announced (OFFLINE is the announcer's tombstone)
                self.presence.announce(state.value)
            except Exception as error:  # only a display figure for others: the next tick retries
                logger.info(f"could not announce state {state}: {error}")
        if self.announcer is not None:
            self.status.last_announcement = self.announcer.last_announcement
        if self.membership is not None and time.monotonic() - self._peers_checked > 10:
            self._peers_checked = time.monotonic()
            try:
                self.status.peers = self.membership.num_peers()
            except Exception:  # only a display figure
                pass
        self.on_status(self.status)
