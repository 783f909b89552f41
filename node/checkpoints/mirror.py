"""Mirroring: a node also keeps and serves the latest checkpoint of every other job, so the swarm's
checkpoints survive their trainers leaving (and an orphaned job can be resumed by a newcomer)."""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, List, Optional, Set

from node.announcer import Announcer
from ddm_models.checkpoint import InvalidCheckpoint
from node.assembly import check_expert, check_router, rank
from node.blob_service import BlobService
from node.candidates import MAX_FAILURES, obtainable
from node.claims import ROUTER_JOB
from node.errors import NodeError
from node.membership import SwarmMembership
from protocol.errors import ProtocolError

logger = logging.getLogger("ddm_swarm.mirror")


class Mirror:
    def __init__(self, membership: SwarmMembership, blobs: BlobService, announcer: Announcer, jobs: List[str],
                 period_s: float):
        self.membership, self.blobs, self.announcer = membership, blobs, announcer
        self.jobs, self.period_s = jobs, period_s
        self.own_job: Optional[str] = None
        self.mirrored: Dict[str, str] = {}  # job -> blob sha256 we hold for it
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
                    except Exception as error:  # a failed mirror round is retried next period
                        logger.info(f"mirror of {job} failed this round: {error}")

    def refresh(self, job: str) -> None:
        """Hold the best acceptable checkpoint of `job` (the same checks as generation applies)."""
        records = (self.membership.routers() if job == ROUTER_JOB
                   else self.membership.checkpoints(int(job.split("/")[1])))
        mine = self.membership.identity.signer_id
        others = [r for r in rank(records) if r.signer != mine and r.blob.sha256 not in self.refused]
        failures = 0
        for best in obtainable(others, self.membership, self.blobs.store, self.membership.manifest):
            if self.mirrored.get(job) == best.blob.sha256:
                return
            if failures >= MAX_FAILURES:  # a flood of unusable records: try again next round
                self.fetching = None
                return
            failures += 1
            self.fetching = best.blob.sha256
            try:
                path = self.blobs.fetch(best.blob)
                if job == ROUTER_JOB:
                    check_router(path, best, self.membership.manifest)
                else:
                    check_expert(path, best, self.membership.manifest)
            except (InvalidCheckpoint, ProtocolError) as error:
                self.refused.add(best.blob.sha256)
                if self.blobs.store.has(best.blob.sha256) and best.blob.sha256 not in self.protected():
                    self.blobs.store.delete(best.blob.sha256)
                logger.warning(f"not mirroring {job} {best.blob.sha256[:12]} by {best.signer[:12]}: {error}")
                continue
            except NodeError as error:  # unreachable now; maybe later
                logger.info(f"cannot mirror {job} {best.blob.sha256[:12]} yet: {error}")
                continue
            break
        else:
            self.fetching = None
            return
        self.announcer.provide(best.blob.sha256, now=True)
        previous = self.mirrored.get(job)
        self.mirrored[job] = best.blob.sha256
        self.fetching = None
        logger.info(f"mirroring {job} step {best.step} ({best.blob.sha256[:12]})")
        if previous and previous not in self.mirrored.values():
            self.announcer.unprovide(previous)

    def held(self) -> List[str]:
        """Blobs the mirror holds or is fetching right now (the node's gc must not remove them)."""
        return [*self.mirrored.values(), *([self.fetching] if self.fetching else [])]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
