"""Audits: peers measure each other's expert checkpoints, and the swarm ranks by what they measured.

An auditor fetches a checkpoint (verified like any candidate), measures its loss on the cluster's
held-out data with `ddm_models.evaluation.audit_loss` (seed from the blob's sha256, float64, fixed
batches: honest auditors agree to `AGREEMENT_REL`), samples a fingerprint with fixed seeds, and
publishes a signed `AuditRecord` under `<swarm>/audits/<sha256>`. Readers (`Evidence`) then:
1. drop what the operator revoked (a `Revocation` of the checkpoint or of its signer);
2. keep the audits of *independent* auditors only: one per signer, never the checkpoint's own signer,
   on the held-out data the reader expects (when it knows it);
3. where at least `FINGERPRINT_QUORUM` of them carry a fingerprint and a strict majority agrees on
   one, ignore the auditors whose fingerprint differs (fingerprints agree bit for bit across thread
   counts, see benchmarks/audit_agreement.py; an auditor that did not sample the same model is lying);
4. take the median audited loss; a checkpoint whose median is worse than its claim by more than
   `CONTRADICTION` is refused (`contradicted`).
`node.checkpoints.acceptance.rank` orders candidates with it. The `Auditor` is the background worker
of a trainer node: a low-priority thread, at most `max_per_period` audits a period.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set

from hivemind.utils.timed_storage import get_dht_time

from ddm_models.checkpoint import InvalidCheckpoint
from ddm_models.conditioning import TrainingData
from ddm_models.evaluation import AUDIT_IMAGES, audit_loss, audit_seed
from ddm_models.fingerprints import sample_fingerprint
from ddm_models.text import build_text_encoder
from node.checkpoints.acceptance import Refused, check_expert, obtainable, rank
from node.errors import NodeError
from protocol.errors import ProtocolError
from protocol.jobs import Job
from protocol.records import AuditRecord, CheckpointRecord, Revocation, RouterRecord

logger = logging.getLogger("ddm_swarm.audits")
# Two honest audits of one checkpoint differ by float64 rounding only: measured 3e-16 relative
# between 1 and 2 torch threads (benchmarks/audit_agreement.py); this is the tolerance we state.
AGREEMENT_REL = 1e-9
# A checkpoint's audits contradict its claim past claim * factor + slack: its claim was measured with
# other noise draws and more images, so honest claims and audits differ by sampling noise.
CONTRADICTION = (1.5, 0.02)
FINGERPRINT_QUORUM = 3
AUDIT_TTL_S = 24 * 3600.0
MAX_EVIDENCE_RECORDS = 128
# The auditor thread's niceness: under a busy trainer it gets about a tenth of a core (CFS weights
# 110 against 1024); 19 would starve it (1.5%) on a shared machine.
AUDIT_NICENESS = 10


@dataclass(frozen=True)
class Verdict:
    """What the independent audits of one checkpoint say: their median loss (None: not audited)."""

    median: Optional[float]
    auditors: int
    contradicted: bool


@dataclass
class Evidence:
    """Audits and revocations read for a batch of candidate records (see the module docstring)."""

    audits: Dict[str, List[AuditRecord]] = field(default_factory=dict)  # blob sha256 -> audits
    revoked: Set[str] = field(default_factory=set)  # revoked signer ids and blob sha256s
    data_sha256: Dict[int, str] = field(default_factory=dict)  # cluster -> held-out data hash we expect

    def is_revoked(self, record) -> bool:
        return record.signer in self.revoked or record.blob.sha256 in self.revoked

    def independent(self, record: CheckpointRecord) -> List[AuditRecord]:
        by_signer: Dict[str, AuditRecord] = {}
        expected = self.data_sha256.get(record.cluster)
        for audit in self.audits.get(record.blob.sha256, []):
            if audit.signer == record.signer or audit.checkpoint_signer != record.signer or audit.signer in self.revoked:
                continue
            if audit.cluster != record.cluster or (expected and audit.data_sha256 != expected):
                continue
            if audit.signer not in by_signer or audit.created_at > by_signer[audit.signer].created_at:
                by_signer[audit.signer] = audit
        audits = list(by_signer.values())
        prints = [a.fingerprint for a in audits if a.fingerprint]
        if len(prints) >= FINGERPRINT_QUORUM:
            majority = max(set(prints), key=prints.count)
            if prints.count(majority) * 2 > len(prints):
                audits = [a for a in audits if a.fingerprint == majority]
        return audits

    def verdict(self, record) -> Verdict:
        if isinstance(record, RouterRecord):
            return Verdict(None, 0, False)
        audits = self.independent(record)
        if not audits:
            return Verdict(None, 0, False)
        median = statistics.median(a.loss for a in audits)
        factor, slack = CONTRADICTION
        return Verdict(median, len(audits), median > record.heldout_loss * factor + slack)


def read_evidence(membership, records: Iterable, data_sha256: Optional[Dict[int, str]] = None) -> Evidence:
    """The audits of `records`' blobs and the revocations of their blobs and signers, in two DHT
    traversals (batched). Of a flood, only the MAX_EVIDENCE_RECORDS best-claimed records are looked at
    (the rest rank as unaudited): what a read costs stays bounded."""
    records = list(records)
    if len(records) > MAX_EVIDENCE_RECORDS:
        records = rank(records)[:MAX_EVIDENCE_RECORDS]
    evidence = Evidence(data_sha256=dict(data_sha256 or {}))
    if not records:
        return evidence
    experts = [r.blob.sha256 for r in records if isinstance(r, CheckpointRecord)]
    evidence.audits = membership.audits_of(experts) if experts else {}
    targets = {*(r.signer for r in records), *(r.blob.sha256 for r in records),
               *(a.signer for audits in evidence.audits.values() for a in audits)}
    evidence.revoked = {rev.target for rev in membership.revocations_of(sorted(targets))}
    return evidence


def check_claim(expert, record: CheckpointRecord, data: TrainingData, text_encoder) -> float:
    """Audit `expert` here (as an auditor would) and raise `Refused` if the measurement contradicts its
    record's claimed loss; the measured loss otherwise. A node about to adopt a stranger's checkpoint
    checks it itself rather than wait for the swarm's auditors."""
    measured = audit_loss(expert, data, text_encoder, seed=audit_seed(record.blob.sha256))
    factor, slack = CONTRADICTION
    if measured > record.heldout_loss * factor + slack:
        raise Refused(f"held-out loss measured {measured:.4f} here, its record claims {record.heldout_loss:.4f}")
    return measured


class Auditor:
    """Audits other signers' expert checkpoints in the background: each period, the best-claimed
    candidates of every expert job that this node has not audited yet, at most `max_per_period` in
    all, in a thread at a low CPU priority (nice `AUDIT_NICENESS`) so training keeps its share."""

    def __init__(self, membership, blobs, manifest, jobs: List[Job], heldout: Callable[[int], Optional[TrainingData]],
                 *, period_s: float, max_per_period: int = 2, per_job: int = 3):
        self.membership, self.blobs, self.manifest = membership, blobs, manifest
        self.jobs = [job for job in jobs if not job.is_router]
        self.heldout = heldout
        self._text_encoder = None  # built on the first audit (a node that never audits never loads it)
        self.period_s, self.max_per_period, self.per_job = period_s, max_per_period, per_job
        self.done: Set[str] = set()  # blobs audited (or found unauditable) by this node
        self.fetching: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddm-auditor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def held(self) -> List[str]:
        """The blob being fetched for an audit right now (the node's gc must not remove it)."""
        return [self.fetching] if self.fetching else []

    def _run(self) -> None:
        try:  # Linux: a thread is a task with its own niceness
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), AUDIT_NICENESS)
        except (AttributeError, OSError):
            pass
        while not self._stop.wait(self.period_s):
            try:
                self.audit_round()
            except (NodeError, ProtocolError, TimeoutError, OSError) as error:  # retried next period
                logger.info(f"audit round failed: {error}")
            except Exception:  # a bug: shown with its traceback; the node keeps training
                logger.exception("audit round failed")

    def candidates(self) -> List[CheckpointRecord]:
        mine, chosen = self.membership.identity.signer_id, []
        for job in self.jobs:
            records = [r for r in self.membership.checkpoints(job.cluster)
                       if r.signer != mine and r.blob.sha256 not in self.done]
            chosen += sorted(records, key=lambda r: (-r.step, -r.created_at))[:self.per_job]
        return chosen

    def audit_round(self) -> int:
        """Audit up to `max_per_period` candidates; the number of audits published."""
        published = 0
        candidates = self.candidates()
        revoked = read_evidence(self.membership, candidates).revoked
        for record in obtainable([r for r in candidates if r.signer not in revoked and r.blob.sha256 not in revoked],
                                 self.membership, self.blobs.store, self.manifest, blob="inference"):
            if published >= self.max_per_period or self._stop.is_set():
                break
            data = self.heldout(record.cluster)
            if data is None or len(data) == 0:
                continue
            self.done.add(record.blob.sha256)
            self.fetching = record.inference.sha256  # what generators use, an eighth of the state's bytes
            try:
                path = self.blobs.fetch(record.inference)
                expert = check_expert(path, record, self.manifest, blob="inference")
            except (InvalidCheckpoint, ProtocolError, NodeError, TimeoutError) as error:
                logger.info(f"not auditing {record.blob.sha256[:12]}: {error}")  # acceptance refuses it anyway
                continue
            finally:
                self.fetching = None
            self.membership.publish(self.measure(record, expert, data), confirm=False)
            published += 1
        return published

    def measure(self, record: CheckpointRecord, expert, data: TrainingData) -> AuditRecord:
        """The signed audit of one checked expert on `data` (the cluster's held-out images)."""
        if self._text_encoder is None:
            self._text_encoder = build_text_encoder(self.manifest.text_encoder)
        seed = audit_seed(record.blob.sha256)
        loss = audit_loss(expert, data, self._text_encoder, seed=seed)
        fingerprint = sample_fingerprint(expert, self._text_encoder, seed=seed)
        now = get_dht_time()
        audit = AuditRecord(self.membership.swarm_id, record.cluster, record.blob.sha256, record.signer, record.step,
                            loss, seed, min(len(data), AUDIT_IMAGES), data.fingerprint(), fingerprint, now,
                            now + AUDIT_TTL_S)
        logger.info(f"audited {record.job} {record.blob.sha256[:12]} (step {record.step}, signer "
                    f"{record.signer[:12]}): loss {loss:.4f}, it claims {record.heldout_loss:.4f}")
        return audit.signed_by(self.membership.identity)
