"""A training node of the swarm: join, claim a job, train, checkpoint, announce, serve.

States: JOINING (DHT, identity, blob server) -> CLAIMING (pick a job, take its lease) -> RESUMING
(local state, or the swarm's latest checkpoint of an orphaned job) -> TRAINING (checkpoints every
N steps, each written locally, added to the blob store, then announced) -> SERVING (budget spent:
the job is released, blobs are still served) -> OFFLINE (claim released, tombstone published).
A node killed at any moment restarts from its last local checkpoint: state files and blobs are
written atomically before they are announced.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

from ddm_models.text import build_text_encoder
from ddm_models.training import ExpertTrainer, RouterTrainer
from node.announcer import Announcer, new_checkpoint_record
from node.assembly import check_header, rank
from node.blob_service import BlobService
from node.blobstore import BlobStore
from node.candidates import MAX_FAILURES, obtainable
from node.claims import ROUTER_JOB, Lease, all_jobs, claim_job
from node.files import atomic_write_bytes
from node.jobs import SwarmData, expert_config, prepare_swarm_data, router_config, training_options
from node.keys import identities_for_join
from node.membership import SwarmMembership
from node.mirror import Mirror
from node.network import NetworkLoop
from node.presence import Presence
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord

logger = logging.getLogger("ddm_swarm.node")


@dataclass
class NodeOptions:
    data_dir: Path
    initial_peers: List[str] = field(default_factory=list)
    host: str = "0.0.0.0"
    port: int = 0
    job: Optional[str] = None  # force a job ("expert/<k>" or "router") instead of choosing one
    model: Optional[str] = None  # expert model of the manifest, instead of the cluster's default
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    exit_when_done: bool = False  # else keep serving blobs after the budget is spent
    mirror: bool = True
    threads: int = 1
    seed: int = 0
    device: str = "cpu"
    slice_s: float = 2.0  # train this long between looks at the outside world


@dataclass
class NodeStatus:
    state: str = "joining"
    job: str = "-"
    model: str = "-"
    step: int = 0
    loss: float = float("nan")
    images_per_s: float = 0.0
    peers: int = 0
    last_checkpoint: str = "-"
    last_announcement: str = "-"
    resumed_from: str = "-"


class SwarmNode:
    def __init__(self, manifest: SwarmManifest, options: NodeOptions,
                 on_status: Optional[Callable[[NodeStatus], None]] = None):
        self.manifest, self.options, self.on_status = manifest, options, on_status or (lambda status: None)
        self.status = NodeStatus()
        self.data_dir = Path(options.data_dir)
        self.stop_event = threading.Event()
        self.trainer = None
        self.last_blob: Optional[str] = None
        self.previous_blob: Optional[str] = None
        self._last_ckpt_step = -1
        self._peers_checked = 0.0

    # --- lifecycle -------------------------------------------------------------------------------
    def run(self) -> None:
        torch.set_num_threads(self.options.threads)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.stop_event.set())
        self._join()
        try:
            self._claim_and_resume()
            self._train()
            if not self.options.exit_when_done and not self.stop_event.is_set():
                self._serve()
        finally:
            self._leave()

    def _join(self) -> None:
        # nothing is written to the data folder until the node has joined
        with identities_for_join(self.data_dir / "identity.pem", self.data_dir / "p2p.key") as (identity, p2p_key):
            self.membership = SwarmMembership(
                self.manifest, identity, initial_peers=self.options.initial_peers, host=self.options.host,
                port=self.options.port, p2p_identity_path=p2p_key)
        for problem in self.membership.beacon_problems():
            logger.warning(problem)
        self.membership.announce_beacon()
        self.loop = NetworkLoop()
        self.store = BlobStore(self.data_dir / "blobs")
        corrupt = self.store.verify_all()  # a crash or a bad disk must not leave us serving bad bytes
        if corrupt:
            logger.warning(f"quarantined {len(corrupt)} corrupt blob(s) found at start-up")
        self.blobs = BlobService(self.membership, self.store, self.loop)
        self.presence = Presence(self.membership, role="trainer")
        self.presence.announce("joining")
        self.announcer = Announcer(self.membership, self.presence, lambda: self.trainer.step if self.trainer else 0)
        self.jobs = all_jobs(self.manifest)
        self.mirror = Mirror(self.membership, self.blobs, self.announcer, self.jobs,
                             period_s=self.manifest.timing.lease_s)
        logger.info(f"joined swarm '{self.manifest.name}' as {self.membership.peer_id} "
                    f"(signer {identity.signer_id[:12]}…)")

    def _leave(self) -> None:
        self._set(state="offline")
        if hasattr(self, "mirror"):
            self.mirror.stop()
        if hasattr(self, "announcer"):
            self.announcer.stop(release=True)
        if hasattr(self, "blobs"):
            self.blobs.stop()
        if hasattr(self, "loop"):
            self.loop.stop()
        if hasattr(self, "membership"):
            self.membership.shutdown()

    # --- claiming and resuming -------------------------------------------------------------------
    def _node_file(self) -> Path:
        return self.data_dir / "node.json"

    def _model_for(self, job: str) -> str:
        if job == ROUTER_JOB:
            return self.manifest.router.name
        if self.options.model:
            return self.manifest.expert_spec(self.options.model).name
        return self.manifest.expert_for_cluster(int(job.split("/")[1])).name

    def _claim_and_resume(self) -> None:
        self._set(state="claiming")
        previous = json.loads(self._node_file().read_text()) if self._node_file().exists() else {}
        forced = self.options.job or previous.get("job")
        self.lease: Lease = claim_job(self.membership, self.jobs, self._model_for, forced=forced)
        job = self.lease.job
        atomic_write_bytes(self._node_file(), json.dumps({"job": job, "model": self.lease.model}).encode())
        self.announcer.lease = self.lease
        self.mirror.own_job = job
        self._set(state="resuming", job=job, model=self.lease.model)
        self.data = prepare_swarm_data(self.manifest, self.data_dir / "cache")
        self.trainer = self._build_trainer(job)
        self._resume(job)
        self.announcer.start()
        if self.options.mirror:
            self.mirror.start()

    def _build_trainer(self, job: str):
        text = build_text_encoder(self.manifest.text_encoder)
        if job == ROUTER_JOB:
            options = training_options(self.manifest.router)
            train, clusters, heldout = self.data.router_data()
            return RouterTrainer(router_config(self.manifest), train, clusters, text, seed=self.options.seed,
                                 device=self.options.device, heldout=heldout, **options)
        cluster = int(job.split("/")[1])
        spec = self.manifest.expert_spec(self.lease.model)
        train, heldout = self.data.expert_data(cluster)
        return ExpertTrainer(expert_config(spec, self.manifest), train, text, seed=self.options.seed + cluster,
                             device=self.options.device, cluster=cluster, heldout=heldout,
                             **training_options(spec))

    def _state_dir(self, job: str) -> Path:
        return self.data_dir / "jobs" / job.replace("/", "-") / self.lease.model

    def _resume(self, job: str) -> None:
        state = self._state_dir(job)
        if (state / "state.safetensors").exists():
            self.trainer.load_state(state)
            self.last_blob = json.loads((state / "published.json").read_text()).get("blob") \
                if (state / "published.json").exists() else None
            self._set(resumed_from=f"local step {self.trainer.step}")
            logger.info(f"resumed {job} from this node's own state at step {self.trainer.step}")
        records = self.membership.routers() if job == ROUTER_JOB else \
            self.membership.checkpoints(int(job.split("/")[1]))
        spec_hash = (self.manifest.router if job == ROUTER_JOB else self.manifest.expert_spec(self.lease.model)).spec_hash
        newer = [r for r in rank(records) if r.spec_hash == spec_hash and r.step > self.trainer.step]
        for failures, record in enumerate(obtainable(newer, self.membership, self.store, self.manifest)):
            if failures >= MAX_FAILURES:
                logger.warning(f"no usable checkpoint of {job} among the first {failures} the swarm offers")
                break
            try:
                path = self.blobs.fetch(record.blob)
                check_header(path, record, self.manifest)  # what its record says: job, model, step
                self.trainer.init_from_checkpoint(path)
            except Exception as error:  # a bad or unreachable checkpoint: try the next one
                logger.warning(f"cannot resume from {record.blob.sha256[:12]} (step {record.step}): {error}")
                continue
            self.last_blob = record.blob.sha256
            self.announcer.provide(record.blob.sha256)
            self._set(resumed_from=f"swarm step {record.step} by {record.signer[:12]}")
            logger.info(f"resumed orphaned {job} from the swarm's checkpoint at step {record.step} "
                        f"(signer {record.signer[:12]}…)")
            break
        self._last_ckpt_step = self.trainer.step
        self._set(step=self.trainer.step)

    # --- training --------------------------------------------------------------------------------
    def _budget_left(self, started: float, start_step: int) -> bool:
        if self.options.max_minutes is not None and time.monotonic() - started >= 60 * self.options.max_minutes:
            return False
        return self.options.max_steps is None or self.trainer.step < self.options.max_steps

    def _train(self) -> None:
        self._set(state="training")
        every = self.manifest.timing.checkpoint_every_steps
        started, start_step = time.monotonic(), self.trainer.step
        while not self.stop_event.is_set() and self._budget_left(started, start_step):
            steps = every - (self.trainer.step % every)
            if self.options.max_steps is not None:
                steps = min(steps, self.options.max_steps - self.trainer.step)
            minutes_left = None if self.options.max_minutes is None else \
                60 * self.options.max_minutes - (time.monotonic() - started)
            stats = self.trainer.train_for(min(self.options.slice_s, minutes_left or self.options.slice_s),
                                           max_steps=steps)
            self._set(step=stats.step, loss=stats.loss, images_per_s=stats.images_per_s)
            if self.trainer.step % every == 0 and self.trainer.step != self._last_ckpt_step:
                self.checkpoint()
        if self.trainer.step != self._last_ckpt_step:
            self.checkpoint()  # nothing trained is lost on a clean stop or at the end of the budget

    def checkpoint(self) -> None:
        """Write local state, put the publishable checkpoint in the blob store, then announce it."""
        job = self.lease.job
        state = self._state_dir(job)
        self.trainer.save_state(state)
        is_router = job == ROUTER_JOB
        metric = self.trainer.evaluate().accuracy if is_router else self.trainer.heldout_loss()
        fd, tmp = self.store.temp_file(".safetensors")
        os.close(fd)
        try:
            if is_router:
                self.trainer.export(tmp, accuracy=metric)
            else:
                self.trainer.export(tmp, heldout_loss=metric)
            ref = self.store.put_file(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)
        common = dict(model=self.lease.model, step=self.trainer.step, samples_seen=self.trainer.samples_seen,
                      blob=ref, parent=(self.last_blob or "") if self.last_blob != ref.sha256 else "")
        if is_router:
            record = new_checkpoint_record(self.membership, RouterRecord, spec_hash=self.manifest.router.spec_hash,
                                           num_clusters=self.manifest.num_clusters, heldout_accuracy=metric, **common)
        else:
            spec = self.manifest.expert_spec(self.lease.model)
            record = new_checkpoint_record(self.membership, CheckpointRecord, cluster=int(job.split("/")[1]),
                                           objective=spec.objective, spec_hash=spec.spec_hash, heldout_loss=metric,
                                           **common)
        # the previous checkpoint stays available one round longer: a client may have just picked it
        older, previous, self.last_blob = self.previous_blob, self.last_blob, ref.sha256
        self.previous_blob = previous if previous != ref.sha256 else older
        atomic_write_bytes(state / "published.json", json.dumps({"blob": ref.sha256, "step": self.trainer.step}).encode())
        self.announcer.announce_checkpoint(job, record)
        if older and older not in (ref.sha256, self.previous_blob):
            self.announcer.unprovide(older)
        self._last_ckpt_step = self.trainer.step
        self.store.gc(keep={ref.sha256, *([self.previous_blob] if self.previous_blob else []), *self.mirror.held()})
        self._set(last_checkpoint=f"step {self.trainer.step} ({'acc' if is_router else 'loss'} {metric:.4f})")

    def _serve(self) -> None:
        """The budget is spent: give the job back, keep serving blobs until stopped."""
        self.lease.release(self.trainer.step)
        self.announcer.lease = None
        self._set(state="serving")
        logger.info("training budget spent: job released, still serving checkpoints (Ctrl-C to leave)")
        while not self.stop_event.wait(1.0):
            self._set()

    def _set(self, **changes) -> None:
        for name, value in changes.items():
            setattr(self.status, name, value)
        if hasattr(self, "announcer"):
            self.status.last_announcement = self.announcer.last_announcement
        if hasattr(self, "membership") and time.monotonic() - self._peers_checked > 10:
            self._peers_checked = time.monotonic()
            try:
                self.status.peers = self.membership.num_peers()
            except Exception:  # only a display figure
                pass
        self.on_status(self.status)
