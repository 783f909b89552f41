"""Writing one checkpoint of a node's job: the local state file, the publishable checkpoint's two
blobs in the blob store (the training state, then its inference export: EMA weights only, 16-bit),
and published.json, each atomically and in that order, so that a crash between two of
them leaves the earlier ones complete and the later ones untouched (see `node.checkpoints.published`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Tuple, Union

from hivemind.utils.timed_storage import get_dht_time

from ddm_models.checkpoint import write_inference_export
from node.blobs.store import BlobStore
from node.swarm.membership import SwarmMembership
from node.checkpoints.published import PublishedCheckpoints
from protocol.jobs import Job
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord, SignedRecord

# Test only (benchmarks/crash_loop.py): widen the gaps between a checkpoint's steps so that random
# kills land in them too. Unset, as in production, it costs one comparison per checkpoint.
CHECKPOINT_PAUSE_S = float(os.environ.get("DDM_SWARM_TEST_CHECKPOINT_PAUSE_S") or 0)
# bfloat16 keeps float32's range (no overflow of large weights), at 8 bits of mantissa
INFERENCE_DTYPE = "bfloat16"


def publish_checkpoint(trainer, job: Job, model: str, state_dir: Path, store: BlobStore,
                     published: PublishedCheckpoints, membership: SwarmMembership, manifest: SwarmManifest,
                     parent: str) -> Tuple[Union[CheckpointRecord, RouterRecord], float]:
    """Write `trainer`'s step of `job` (model `model`) and sign its record (not yet announced): the
    record and the held-out metric (accuracy for the router, loss for an expert). `parent` is the
    blob this training continued from ("" for none)."""
    trainer.save_state(state_dir)
    is_router = job.is_router
    metric = trainer.evaluate().accuracy if is_router else trainer.heldout_loss()
    fd, tmp = store.temp_file(".safetensors")
    os.close(fd)
    fd, tmp_inference = store.temp_file(".safetensors")
    os.close(fd)
    try:
        if is_router:
            trainer.export(tmp, accuracy=metric)
        else:
            trainer.export(tmp, heldout_loss=metric)
        write_inference_export(tmp, tmp_inference, INFERENCE_DTYPE)
        # both were written and fsynced inside the store; the state first, so an inference blob in the
        # store always has its state beside it
        ref = store.put_own_file(tmp)
        inference = store.put_own_file(tmp_inference)
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(tmp_inference).unlink(missing_ok=True)
    if CHECKPOINT_PAUSE_S:
        time.sleep(CHECKPOINT_PAUSE_S)  # the blob is in the store, published.json not yet written
    common = dict(model=model, step=trainer.step, samples_seen=trainer.samples_seen, blob=ref,
                  inference=inference, parent=parent if parent != ref.sha256 else "")
    if is_router:
        record = new_checkpoint_record(membership, RouterRecord, spec_hash=manifest.router.spec_hash,
                                       num_clusters=manifest.num_clusters, heldout_accuracy=metric, **common)
    else:
        spec = manifest.expert_spec(model)
        record = new_checkpoint_record(membership, CheckpointRecord, cluster=job.cluster,
                                       objective=spec.objective, spec_hash=spec.spec_hash, heldout_loss=metric,
                                       **common)
    published.add(record)
    return record, metric


def new_checkpoint_record(membership: SwarmMembership, kind: type, **fields) -> SignedRecord:
    """Sign a fresh CheckpointRecord or RouterRecord of this node, living `record_ttl_s`."""
    now = get_dht_time()
    ttl = membership.manifest.timing.record_ttl_s
    assert kind in (CheckpointRecord, RouterRecord)
    record = kind(swarm_id=membership.swarm_id, created_at=now, expires_at=now + ttl, **fields)
    return record.signed_by(membership.identity)
