"""Resuming a job from the swarm, and announcing again what a node published before a restart.

A node resumes from its own state file when it has one; then, if the swarm holds a newer usable
checkpoint of the same job and model (another trainer went on while this one was away, or the job
was orphaned), it continues from that one instead: it fetches the record's training-state blob
(EMA, weights, AdamW moments), never the inference export.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

from hivemind.utils.timed_storage import get_dht_time

from node.swarm.announcer import Announcer
from node.swarm.leases import live_claimers
from node.checkpoints.audits import check_claim, read_evidence
from node.checkpoints.acceptance import (Search, Verified, check_expert, check_header, find_acceptable, rank,
                                         trusted_order)
from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.swarm.membership import SwarmMembership
from node.checkpoints.published import PublishedCheckpoints, Record
from protocol.jobs import Job
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord

logger = logging.getLogger("ddm_swarm.node")
RESUME_ROUNDS = 3  # reads of the swarm's checkpoint records when resuming (see resume_from_swarm)


def resume_from_swarm(job: Job, spec_hash: str, trainer, membership: SwarmMembership, blobs: BlobService,
                      store: BlobStore, manifest: SwarmManifest, announcer: Announcer,
                      verified: Optional[Verified] = None) -> Optional[Record]:
    """Initialise `trainer` from the best acceptable checkpoint of `job` in the swarm newer than its
    step; the record it came from, or None if there was none.

    The swarm's latest moves while we fetch: a live trainer keeps only its last two checkpoints, so a
    record read a few seconds ago may name a blob its provider has already dropped. When every
    candidate of a round was unreachable, records are read again (at most RESUME_ROUNDS times); a
    candidate refused for its content is never tried twice (see `node.checkpoints.acceptance`).
    Candidates go in `trusted_order` with `verified` (what this node checked itself): a step far
    ahead of the job's verified progress is never adopted. The adopted record is added to `verified`.
    """
    verified = verified if verified is not None else Verified()
    first_read = True

    def newer() -> List[Record]:
        nonlocal first_read
        records = [r for r in membership.job_checkpoints(job) if r.spec_hash == spec_hash]
        mine = [r for r in records if r.signer == membership.identity.signer_id]
        if mine and first_read:  # the DHT's record of ours from before a restart: its blob stays until a newer one is confirmed
            latest = rank(mine)[0]
            announcer.confirmed[job] = frozenset((latest.blob.sha256, latest.inference.sha256))
        first_read = False
        return [r for r in records if r.step > trainer.step]

    def adopt(path: Path, record: Record) -> None:
        check_header(path, record, manifest)  # what its record says: job, model, step
        heldout = getattr(trainer, "heldout", None)
        if isinstance(record, CheckpointRecord) and heldout is not None and len(heldout):
            # never continue from a claim this node can refute on its own held-out data
            check_claim(check_expert(path, record, manifest), record, heldout, trainer.text_encoder)
        trainer.init_from_checkpoint(path)

    search = Search()
    accepted = find_acceptable(newer, fetch=lambda record: blobs.fetch(record.blob), check=adopt,
                               membership=membership, store=store, manifest=manifest, rounds=RESUME_ROUNDS,
                               pause_s=0.0, search=search,
                               order=lambda records: trusted_order(records, verified,
                                                                   evidence=read_evidence(membership, records)))
    for sha, reason in search.refused:  # the operator sees why each newer checkpoint was not taken
        logger.warning(f"cannot resume from {sha[:12]}: {reason}")
    if accepted is None:
        return None
    verified.add(accepted.record)
    return accepted.record


def prove_claimers(jobs: List[Job], membership: SwarmMembership, blobs: BlobService, store: BlobStore,
                   manifest: SwarmManifest, verified: Verified, max_failures: int = 3) -> None:
    """Before choosing a job: for every job none of whose live claimers is proven yet, fetch the best
    checkpoint one of them announced and check its header (hash, architecture, step), so that a claimer
    counts as proven (`leases.choose_job`) only once this node verified its work. A record whose blob
    nobody provides costs no download; at most one checkpoint is fetched per job, and the blob stays
    in the store for the mirror."""
    now = get_dht_time()
    holders = live_claimers(membership.claims(), now)
    for job in jobs:
        claimers = set(holders.get(job, ())) - {membership.identity.signer_id}
        if not claimers or claimers & verified.signers(job):
            continue

        def theirs() -> List[Record]:
            return [r for r in membership.job_checkpoints(job) if r.signer in claimers]

        accepted = find_acceptable(theirs, fetch=lambda record: blobs.fetch(record.blob),
                                   check=lambda path, record: check_header(path, record, manifest),
                                   membership=membership, store=store, manifest=manifest, rounds=1,
                                   max_failures=max_failures, order=lambda records: trusted_order(records, verified))
        if accepted is not None:
            verified.add(accepted.record)
            logger.info(f"{job}: verified the checkpoint of claimer {accepted.record.signer[:12]} (step "
                        f"{accepted.record.step})")


def announce_again(job: Job, published: PublishedCheckpoints, store: BlobStore, membership: SwarmMembership,
                   announcer: Announcer, record_ttl_s: float) -> None:
    """After a restart, announce the latest checkpoint this node published (a crash may have cut its
    announcement off), but only while its blob is still in the store: a record must never point at
    bytes this node cannot serve."""
    record = published.record
    if record is None or record.swarm_id != membership.swarm_id:
        return
    missing = [ref.sha256[:12] for ref in (record.blob, record.inference) if not store.has(ref.sha256)]
    if missing:
        logger.warning(f"not announcing checkpoint step {record.step} again: its blobs {missing} are no longer in "
                       "the store")
        return
    announcer.announce_checkpoint(job, record.renewed(membership.identity, get_dht_time() + record_ttl_s))
    for sha in published.keep():
        if store.has(sha):
            announcer.provide(store.ref(sha))
