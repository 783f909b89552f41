"""Mirroring: a node also keeps and serves the latest checkpoint of every other job, so the swarm's
checkpoints survive their trainers leaving (and an orphaned job can be resumed by a newcomer)."""

from __future__ import annotations

import logging
import threading
from typing import Dict, List, Optional

from node.announcer import Announcer
from node.assembly import rank
from node.blob_service import BlobService
from node.claims import ROUTER_JOB
from node.membership import SwarmMembership

logger = logging.getLogger("ddm_swarm.mirror")


class Mirror:
    def __init__(self, membership: SwarmMembership, blobs: BlobService, announcer: Announcer, jobs: List[str],
                 period_s: float):
        self.membership, self.blobs, self.announcer = membership, blobs, announcer
        self.jobs, self.period_s = jobs, period_s
        self.own_job: Optional[str] = None
        self.mirrored: Dict[str, str] = {}  # job -> blob sha256 we hold for it
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
                    except Exception as error:  # a failed mirror round is retried next period
                        logger.info(f"mirror of {job} failed this round: {error}")

    def refresh(self, job: str) -> None:
        records = (self.membership.routers() if job == ROUTER_JOB
                   else self.membership.checkpoints(int(job.split("/")[1])))
        mine = self.membership.identity.signer_id
        candidates = [r for r in rank(records) if r.signer != mine]
        if not candidates or self.mirrored.get(job) == candidates[0].blob.sha256:
            return
        best = candidates[0]
        self.blobs.fetch(best.blob)
        self.announcer.provide(best.blob.sha256)
        previous = self.mirrored.get(job)
        self.mirrored[job] = best.blob.sha256
        logger.info(f"mirroring {job} step {best.step} ({best.blob.sha256[:12]})")
        if previous and previous not in self.mirrored.values():
            self.announcer.unprovide(previous)

    def held(self) -> List[str]:
        return list(self.mirrored.values())

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
