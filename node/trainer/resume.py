"""Resuming a job from the swarm, and announcing again what a node published before a restart.

A node resumes from its own state file when it has one; then, if the swarm holds a newer usable
checkpoint of the same job and model (another trainer went on while this one was away, or the job
was orphaned), it continues from that one instead.
"""

from __future__ import annotations

import logging
from typing import Optional, Set

from hivemind.utils.timed_storage import get_dht_time

from node.announcer import Announcer
from node.assembly import check_header, rank
from node.blob_service import BlobService
from node.blobstore import BlobStore
from node.candidates import MAX_FAILURES, obtainable
from node.claims import ROUTER_JOB
from node.errors import NodeError
from node.membership import SwarmMembership
from node.published import PublishedCheckpoints, Record, refreshed
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.node")
RESUME_ROUNDS = 3  # reads of the swarm's checkpoint records when resuming (see resume_from_swarm)


def resume_from_swarm(job: str, spec_hash: str, trainer, membership: SwarmMembership, blobs: BlobService,
                      store: BlobStore, manifest: SwarmManifest, announcer: Announcer) -> Optional[Record]:
    """Initialise `trainer` from the best usable checkpoint of `job` in the swarm newer than its step;
    the record it came from, or None if there was none.

    The swarm's latest moves while we fetch: a live trainer keeps only its last two checkpoints, so a
    record read a few seconds ago may name a blob its provider has already dropped. When every
    candidate of a round was unreachable, records are read again (at most RESUME_ROUNDS times); a
    candidate refused for its content is never tried twice.
    """
    refused: Set[str] = set()
    for round_ in range(RESUME_ROUNDS):
        records = membership.routers() if job == ROUTER_JOB else membership.checkpoints(int(job.split("/")[1]))
        records = [r for r in records if r.spec_hash == spec_hash]
        mine = [r for r in records if r.signer == membership.identity.signer_id]
        if mine and round_ == 0:  # the DHT's record of ours from before a restart: its blob stays until a newer one is confirmed
            announcer.confirmed[job] = rank(mine)[0].blob.sha256
        newer = [r for r in rank(records) if r.step > trainer.step and r.blob.sha256 not in refused]
        unreachable = 0
        for failures, record in enumerate(obtainable(newer, membership, store, manifest)):
            if failures >= MAX_FAILURES:
                logger.warning(f"no usable checkpoint of {job} among the first {failures} the swarm offers")
                return None
            try:
                path = blobs.fetch(record.blob)
                check_header(path, record, manifest)  # what its record says: job, model, step
                trainer.init_from_checkpoint(path)
            except Exception as error:  # a bad or unreachable checkpoint: try the next one
                if isinstance(error, NodeError):
                    unreachable += 1
                else:
                    refused.add(record.blob.sha256)
                logger.warning(f"cannot resume from {record.blob.sha256[:12]} (step {record.step}): {error}")
                continue
            return record
        if not unreachable:
            return None
        logger.info(f"reading {job}'s checkpoints again: {unreachable} were unreachable")
    return None


def announce_again(job: str, published: PublishedCheckpoints, store: BlobStore, membership: SwarmMembership,
                   announcer: Announcer, record_ttl_s: float) -> None:
    """After a restart, announce the latest checkpoint this node published (a crash may have cut its
    announcement off), but only while its blob is still in the store: a record must never point at
    bytes this node cannot serve."""
    record = published.record
    if record is None or record.swarm_id != membership.swarm_id:
        return
    if not store.has(record.blob.sha256):
        logger.warning(f"not announcing checkpoint step {record.step} again: its blob "
                       f"{record.blob.sha256[:12]} is no longer in the store")
        return
    announcer.announce_checkpoint(job, refreshed(record, membership.identity, get_dht_time() + record_ttl_s))
    for sha in published.keep():
        if store.has(sha):
            announcer.provide(sha)
