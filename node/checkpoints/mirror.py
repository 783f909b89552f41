"""Mirroring: a node also keeps and serves the latest checkpoint of every other job (both blobs: the
training state and the inference export), so the swarm's checkpoints survive their trainers leaving
(and an orphaned job can be resumed by a newcomer). A mirror is where both blobs of one record meet,
so it is where the export is checked to hold the state's very EMA weights."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

from node.blobs.service import BlobService
from node.errors import NodeError
from ddm_models.checkpoint import check_same_weights
from node.checkpoints.acceptance import (Record, Search, Verified, check_header, check_loadable, find_acceptable,
                                         trusted_order)
from node.checkpoints.audits import Evidence, read_evidence
from node.swarm.announcer import Announcer
from node.swarm.membership import SwarmMembership
from protocol.errors import ProtocolError
from protocol.jobs import Job

logger = logging.getLogger("ddm_swarm.mirror")


class Mirror:
    def __init__(self, membership: SwarmMembership, blobs: BlobService, announcer: Announcer, jobs: List[Job],
                 period_s: float):
        self.membership, self.blobs, self.announcer = membership, blobs, announcer
        self.jobs, self.period_s = jobs, period_s
        self.own_job: Optional[Job] = None
        self.mirrored: Dict[Job, str] = {}  # job -> the state blob's sha256 we hold for it
        self.exports: Dict[Job, str] = {}  # job -> the inference blob's sha256 we hold for it
        self._export_of: Dict[str, str] = {}  # state sha256 -> inference sha256, of the records checked
        self.refused: Set[str] = set()  # blobs that failed the checks: never tried again
        self.fetching: List[str] = []  # held too: the node's gc runs in another thread
        # blobs the node needs for itself: a refused record of another signer may name one of them
        self.protected: Callable[[], Set[str]] = set
        # what this node checked itself (shared with the node's resume): a mirror never switches to a
        # record whose step is beyond what its job can have reached since (see trusted_order)
        self.verified = Verified()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddm-mirror", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for job in self.jobs:
                if self._stop.is_set():
                    return
                if job != self.own_job:
                    try:
                        self.refresh(job)
                    except (NodeError, ProtocolError, TimeoutError, OSError) as error:  # retried next period
                        logger.info(f"mirror of {job} failed this round: {error}")
                    except Exception:  # a bug: shown with its traceback; the node keeps training
                        logger.exception(f"mirror of {job} failed")

    def refresh(self, job: Job) -> None:
        """Hold both blobs of the best acceptable checkpoint of `job` (the checks generation applies,
        see `node.checkpoints.acceptance`, on the training state; the inference export must hold the
        same EMA weights). A flood of unusable records is tried again next round."""
        mine = self.membership.identity.signer_id
        held = self.mirrored.get(job)
        store = self.blobs.store

        def others() -> List[Record]:
            return [r for r in self.membership.job_checkpoints(job) if r.signer != mine]

        def fetch(record: Record) -> Path:
            if record.blob.sha256 != held:  # held too: the node's gc runs in another thread
                self.fetching = [record.blob.sha256, record.inference.sha256]
            path = self.blobs.fetch(record.blob)
            self.blobs.fetch(record.inference)
            return path

        seen: Dict[str, Evidence] = {}

        def order(records: List[Record]) -> List[Record]:
            seen["evidence"] = read_evidence(self.membership, records)
            return trusted_order(records, self.verified, evidence=seen["evidence"])

        search, self._export_of = Search(), {}
        try:
            # the blobs held already passed the checks: they are not loaded again every period
            check = lambda path, record: None if record.blob.sha256 == held else self._check(path, record)  # noqa: E731
            accepted = find_acceptable(others, fetch=fetch, check=check, membership=self.membership,
                                       store=store, manifest=self.membership.manifest,
                                       skip=self.refused, rounds=1, search=search, order=order)
            refused_exports = {sha: self._export_of.get(sha) for sha, _ in search.refused}
        finally:
            self.fetching = []
        if held and "evidence" in seen and (accepted is None or accepted.record.blob.sha256 != held):
            self._drop_if_withdrawn(job, held, others(), seen["evidence"])
        for sha, reason in search.refused:
            self.refused.add(sha)
            for blob in (sha, refused_exports.get(sha)):
                if blob and store.has(blob) and blob not in self.protected() and blob not in self.held():
                    store.delete(blob)
            logger.warning(f"not mirroring {job} {sha[:12]}: {reason}")
        if accepted is None or accepted.record.blob.sha256 == held:
            return
        best = accepted.record
        self.verified.add(best)
        self.announcer.provide(best.inference, now=True)
        self.announcer.provide(best.blob, now=True)
        previous = (held, self.exports.get(job))
        self.mirrored[job], self.exports[job] = best.blob.sha256, best.inference.sha256
        logger.info(f"mirroring {job} step {best.step} ({best.blob.sha256[:12]}, export {best.inference.sha256[:12]})")
        for blob in previous:
            if blob and blob not in self.held():
                self.announcer.unprovide(blob)

    def _drop_if_withdrawn(self, job: Job, held: str, records: List[Record], evidence: Evidence) -> None:
        """Stop serving the blob held for `job` once the operator revoked it (or its signer) or its
        audits contradict it: a mirror must not keep a withdrawn contribution alive."""
        record = next((r for r in records if r.blob.sha256 == held), None)
        if record is None or not (evidence.is_revoked(record) or evidence.verdict(record).contradicted):
            return
        del self.mirrored[job]
        export = self.exports.pop(job, None)
        self.refused.add(held)
        for blob in (held, export):  # the training state and its inference export both go
            if blob and blob not in self.held():
                self.announcer.unprovide(blob)
                if blob not in self.protected():
                    self.blobs.store.delete(blob)
        logger.warning(f"stopped mirroring {job} {held[:12]}: revoked by the operator or contradicted by its audits")

    def _check(self, path: Path, record: Record) -> None:
        manifest = self.membership.manifest
        self._export_of[record.blob.sha256] = record.inference.sha256
        check_loadable(path, record, manifest)
        export = self.blobs.store.path(record.inference.sha256)
        check_header(export, record, manifest, blob="inference")
        check_same_weights(path, export)

    def held(self) -> List[str]:
        """Blobs the mirror holds or is fetching right now (the node's gc must not remove them)."""
        return [*self.mirrored.values(), *self.exports.values(), *self.fetching]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
