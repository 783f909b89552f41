"""Mirroring: a node also keeps and serves the latest checkpoint of every other job, so the swarm's
checkpoints survive their trainers leaving (and an orphaned job can be resumed by a newcomer)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set

from node.blobs.service import BlobService
from node.errors import NodeError
from node.checkpoints.acceptance import Record, Search, check_loadable, find_acceptable
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
        self.mirrored: Dict[Job, str] = {}  # job -> blob sha256 we hold for it
        self.refused: Set[str] = set()  # blobs that failed the checks: never tried again
        self.fetching: Optional[str] = None  # held too: the node's gc runs in another thread
        # blobs the node needs for itself: a refused record of another signer may name one of them
        self.protected: Callable[[], Set[str]] = set
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
        """Hold the best acceptable checkpoint of `job` (the checks generation applies, see
        `node.checkpoints.acceptance`). A flood of unusable records is tried again next round."""
        mine = self.membership.identity.signer_id
        held = self.mirrored.get(job)

        def others() -> List[Record]:
            return [r for r in self.membership.job_checkpoints(job) if r.signer != mine]

        def fetch(record: Record) -> Path:
            if record.blob.sha256 != held:
                self.fetching = record.blob.sha256  # held too: the node's gc runs in another thread
            return self.blobs.fetch(record.blob)

        seen: Dict[str, Evidence] = {}

        def evidence(records: List[Record]) -> Evidence:
            seen["evidence"] = read_evidence(self.membership, records)
            return seen["evidence"]

        search = Search()
        try:
            # the blob held already passed the checks: it is not loaded again every period
            check = lambda path, record: None if record.blob.sha256 == held else self._check(path, record)  # noqa: E731
            accepted = find_acceptable(others, fetch=fetch, check=check, membership=self.membership,
                                       store=self.blobs.store, manifest=self.membership.manifest,
                                       skip=self.refused, rounds=1, search=search, evidence=evidence)
        finally:
            self.fetching = None
        if held and "evidence" in seen and (accepted is None or accepted.record.blob.sha256 != held):
            self._drop_if_withdrawn(job, held, others(), seen["evidence"])
        for sha, reason in search.refused:
            self.refused.add(sha)
            if self.blobs.store.has(sha) and sha not in self.protected() and sha not in self.mirrored.values():
                self.blobs.store.delete(sha)
            logger.warning(f"not mirroring {job} {sha[:12]}: {reason}")
        if accepted is None or accepted.record.blob.sha256 == held:
            return
        best = accepted.record
        self.announcer.provide(best.blob.sha256, now=True)
        self.mirrored[job] = best.blob.sha256
        logger.info(f"mirroring {job} step {best.step} ({best.blob.sha256[:12]})")
        if held and held not in self.mirrored.values():
            self.announcer.unprovide(held)

    def _drop_if_withdrawn(self, job: Job, held: str, records: List[Record], evidence: Evidence) -> None:
        """Stop serving the blob held for `job` once the operator revoked it (or its signer) or its
        audits contradict it: a mirror must not keep a withdrawn contribution alive."""
        record = next((r for r in records if r.blob.sha256 == held), None)
        if record is None or not (evidence.is_revoked(record) or evidence.verdict(record).contradicted):
            return
        del self.mirrored[job]
        self.refused.add(held)
        if held not in self.mirrored.values():
            self.announcer.unprovide(held)
            if held not in self.protected():
                self.blobs.store.delete(held)
        logger.warning(f"stopped mirroring {job} {held[:12]}: revoked by the operator or contradicted by its audits")

    def _check(self, path: Path, record: Record) -> None:
        check_loadable(path, record, self.membership.manifest)

    def held(self) -> List[str]:
        """Blobs the mirror holds or is fetching right now (the node's gc must not remove them)."""
        return [*self.mirrored.values(), *([self.fetching] if self.fetching else [])]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
