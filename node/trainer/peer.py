"""A training node of the swarm: join, claim a job, train, checkpoint, announce, serve.

States (`NodeState`): JOINING (DHT, identity, blob server) -> CLAIMING (pick a job, take its lease)
-> RESUMING (local state, or the swarm's latest checkpoint of an orphaned job) -> TRAINING
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

import errno
import json
import logging
import signal
import threading
import time
from pathlib import Path
from contextlib import ExitStack
from typing import Callable, List, Optional, Set

import torch
from hivemind.utils.timed_storage import get_dht_time

from ddm_models.checkpoint import InvalidCheckpoint
from ddm_models.text import build_text_encoder
from ddm_models.training import ExpertTrainer, RouterTrainer
from node.swarm.announcer import Announcer
from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.trainer.pipeline import CheckpointPipeline
from node.checkpoints.publishing import CHECKPOINT_PAUSE_S, publish_checkpoint
from node.swarm.leases import Lease, claim_job, keep_previous_job, should_move
from node.errors import DiskFull
from node.files import atomic_write_bytes, hold_exclusive_lock
from node.trainer.handover import hand_over, handover_wait_s, needs_hand_over
from node.checkpoints.specs import check_model_specs, expert_config, router_config, training_options
from node.data.swarm_data import prepare_swarm_data
from node.identity_files import identities_for_join
from node.swarm.membership import SwarmMembership
from node.checkpoints.audits import Auditor
from node.checkpoints.mirror import Mirror
from node.network import NetworkLoop
from node.trainer.state import NodeOptions, NodeState, NodeStatus, TrainingSummary
from node.swarm.presence import Presence
from node.checkpoints.published import PublishedCheckpoints, UnreadableNodeFile
from node.trainer.resume import announce_again, resume_from_swarm
from protocol.jobs import InvalidJob, Job
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.node")


class SwarmNode:
    def __init__(self, manifest: SwarmManifest, options: NodeOptions,
                 on_status: Optional[Callable[[NodeStatus], None]] = None):
        self.manifest, self.options, self.on_status = manifest, options, on_status or (lambda status: None)
        self.status = NodeStatus()
        self.data_dir = Path(options.data_dir)
        self.jobs: List[Job] = manifest.jobs
        self.stop_event = threading.Event()
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
        self.auditor: Optional[Auditor] = None
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
        self.checkpoints = CheckpointPipeline(background=torch.device(options.device).type == "cpu")
        self._moving, self._uncovered_seen, self._coverage_checked = False, 0, 0.0
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
            self._left_behind.add(self.announcer.confirmed[left])
        self._give_back_job()

    def _on_signal(self, *_) -> None:
        if self.stop_event.is_set():
            self.leave_now.set()  # a second Ctrl-C: leave without waiting for the hand-over
        self.stop_event.set()

    def _join(self) -> None:
        stop = self._teardown.callback
        # nothing is written to the data folder until the node has joined
        with identities_for_join(self.data_dir / "identity.pem", self.data_dir / "p2p.key") as (identity, p2p_key):
            self.membership = SwarmMembership(
                self.manifest, identity, initial_peers=self.options.initial_peers, host=self.options.host,
                port=self.options.port, p2p_identity_path=p2p_key)
            stop(self.membership.shutdown)  # before the identity files are written: that can fail too
        self._data_dir_lock = hold_exclusive_lock(self.data_dir / "node.lock", f"data dir {self.data_dir}")
        for problem in self.membership.beacon_problems():
            logger.warning(problem)
        self.membership.announce_beacon()
        self.loop = NetworkLoop()
        stop(self.loop.stop)
        self.store = BlobStore(self.data_dir / "blobs")
        self.store.remove_leftovers()  # temp files of writes a crash cut off (we hold the data dir's lock)
        corrupt = self.store.verify_all()  # a crash or a bad disk must not leave us serving bad bytes
        if corrupt:
            logger.warning(f"quarantined {len(corrupt)} corrupt blob(s) found at start-up")
        self.blobs = BlobService(self.membership, self.store, self.loop)
        stop(self.blobs.stop)
        self.presence = Presence(self.membership, role="trainer")
        self.announcer = Announcer(self.membership, self.presence, lambda: self.trainer.step if self.trainer else 0)
        stop(self.announcer.stop, release=True)  # gives the job back, then the OFFLINE tombstone
        self._set(state=NodeState.JOINING)
        self.mirror = Mirror(self.membership, self.blobs, self.announcer, self.jobs,
                             period_s=self.manifest.timing.lease_s)
        self.mirror.protected = self._own_blobs
        stop(self.mirror.stop)
        self.auditor = Auditor(self.membership, self.blobs, self.manifest, self.jobs,
                               lambda cluster: self.data.expert_data(cluster)[1] if self.data is not None else None,
                               period_s=self.manifest.timing.lease_s)
        stop(self.auditor.stop)
        stop(self.checkpoints.close)  # a checkpoint in flight is finished before its announcer stops
        logger.info(f"joined swarm '{self.manifest.name}' as {self.membership.peer_id} "
                    f"(signer {identity.signer_id[:12]}…)")

    # --- claiming and resuming -------------------------------------------------------------------
    def _node_file(self) -> Path:
        return self.data_dir / "node.json"

    def _model_for(self, job: Job) -> str:
        return self.manifest.model_for(job, self.options.model).name

    def _claim_and_resume(self) -> None:
        self._set(state=NodeState.CLAIMING)
        forced = self.options.job or self._previous_job()
        if forced and not self.options.job and not keep_previous_job(
                forced, self.jobs, self.membership.claims(), self.membership.identity.signer_id, get_dht_time()):
            logger.info(f"{forced}, this node's previous job, has other trainers while a job has none: moving")
            forced = None
        self.lease = claim_job(self.membership, self.jobs, self._model_for, forced=forced,
                               after=self.lease.last_expiry if self.lease else 0.0)
        job = self.lease.job
        atomic_write_bytes(self._node_file(), json.dumps({"job": str(job), "model": self.lease.model}).encode())
        self.announcer.hold(self.lease)
        self.mirror.own_job = job
        self._set(state=NodeState.RESUMING, job=job, model=self.lease.model)
        self.data = prepare_swarm_data(self.manifest, self.data_dir / "cache")
        self.trainer = self._build_trainer(job)
        self._resume(job)
        if not self._moving:  # the first job; a node that moves keeps its announcer and mirror
            self.announcer.start()
            if self.options.mirror:
                self.mirror.start()
                self.auditor.start()
        self._moving, self._uncovered_seen = False, 0

    def _previous_job(self) -> Optional[Job]:
        """The job this data dir trained before (node.json), so a restart continues it."""
        if not self._node_file().exists():
            return None
        try:
            job = Job.parse(json.loads(self._node_file().read_text())["job"])
        except (OSError, ValueError, KeyError, TypeError, InvalidJob) as error:
            raise UnreadableNodeFile(f"{self._node_file()} is corrupt ({type(error).__name__}: {error}); delete it "
                                     "(or pass --job) and restart: the node then claims a job afresh") from None
        if job not in self.jobs:
            raise UnreadableNodeFile(f"{self._node_file()} names job {job}, which swarm '{self.manifest.name}' "
                                     f"does not have ({', '.join(map(str, self.jobs))}); delete it or pass --job")
        return job

    def _build_trainer(self, job: Job):
        text = build_text_encoder(self.manifest.text_encoder)
        if job.is_router:
            options = training_options(self.manifest.router)
            train, clusters, heldout = self.data.router_data()
            return RouterTrainer(router_config(self.manifest), train, clusters, text, seed=self.options.seed,
                                 device=self.options.device, heldout=heldout, **options)
        cluster = job.cluster
        spec = self.manifest.expert_spec(self.lease.model)
        train, heldout = self.data.expert_data(cluster)
        return ExpertTrainer(expert_config(spec, self.manifest), train, text, seed=self.options.seed + cluster,
                             device=self.options.device, cluster=cluster, heldout=heldout,
                             **training_options(spec))

    def _state_dir(self, job: Job) -> Path:
        return self.data_dir / "jobs" / job.slug / self.lease.model

    def _resume(self, job: Job) -> None:
        state = self._state_dir(job)
        for leftover in state.glob(".*.tmp"):  # a state file or published.json a crash cut off (we hold the lock)
            leftover.unlink(missing_ok=True)
        self.published = PublishedCheckpoints(state)
        self.parent_blob = self.published.blob
        if (state / "state.safetensors").exists():
            try:
                self.trainer.load_state(state)
            except InvalidCheckpoint as error:
                raise UnreadableNodeFile(
                    f"{state / 'state.safetensors'} cannot be loaded ({error}). Move it away and restart: the node "
                    f"then resumes from its last published checkpoint (step {self.published.step}) or the "
                    "swarm's latest") from None
            self._set(resumed_from=f"local step {self.trainer.step}")
            logger.info(f"resumed {job} from this node's own state at step {self.trainer.step}")
        self._resume_from_swarm(job)
        announce_again(job, self.published, self.store, self.membership, self.announcer,
                       self.manifest.timing.record_ttl_s)
        self._last_ckpt_step = self.trainer.step
        self._set(step=self.trainer.step)

    def _resume_from_swarm(self, job: Job) -> None:
        spec_hash = self.manifest.model_for(job, self.lease.model).spec_hash
        record = resume_from_swarm(job, spec_hash, self.trainer, self.membership, self.blobs, self.store, self.manifest,
                                   self.announcer)
        if record is None:
            return
        self.parent_blob = record.blob.sha256
        self.announcer.provide(record.blob.sha256)
        self._set(resumed_from=f"swarm step {record.step} by {record.signer[:12]}")
        logger.info(f"resumed orphaned {job} from the swarm's checkpoint at step {record.step} "
                    f"(signer {record.signer[:12]}…)")

    def _own_blobs(self) -> Set[str]:
        """Blobs this node must keep: its published checkpoints, the one the DHT last confirmed for
        it, the checkpoint it resumed from, and those of jobs it moved away from."""
        own = set(self.published.keep()) if self.published else set()
        own |= self._left_behind
        if self.lease is not None and self.lease.job in self.announcer.confirmed:
            own.add(self.announcer.confirmed[self.lease.job])
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
            stats = self.trainer.train_for(min(self.options.slice_s, minutes_left or self.options.slice_s),
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
        """Checked once a lease period: whether some job has had no live claim in two checks in a row
        while this node is not the one that stays on its own, shared job (`should_move`)."""
        if self.options.job is not None or self.options.max_steps is not None or \
                time.monotonic() - self._coverage_checked < self.manifest.timing.lease_s:
            return False  # a job or a step budget chosen by the user stays
        self._coverage_checked = time.monotonic()
        try:
            claims = self.membership.claims()
        except Exception:  # the DHT is slow or away: look again next period
            return False
        move = should_move(self.lease.job, self.jobs, claims, self.membership.identity.signer_id, get_dht_time())
        self._uncovered_seen = self._uncovered_seen + 1 if move else 0
        return self._uncovered_seen >= 2

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
        wait_s = handover_wait_s(self.manifest.timing.lease_s)
        self._set(state=NodeState.HANDING_OVER)
        logger.info(f"handing checkpoint step {record.step} over to the swarm before leaving (at most "
                    f"{wait_s:.0f} s; Ctrl-C again to leave now)")
        if hand_over(self.membership, record.blob.sha256, wait_s, self.leave_now):
            logger.info(f"another peer holds checkpoint step {record.step} now: leaving")
        else:
            logger.warning(f"leaving while no other peer holds checkpoint step {record.step} yet: it is back "
                           "when this node is")

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
