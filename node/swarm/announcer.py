"""The announcer: a thread that keeps this node's records fresh in the DHT (Petals-style loop).

Every period T it renews the node's lease and presence, re-announces the blobs it provides, and
re-publishes its latest checkpoint record before that expires. New checkpoints are queued by the
training thread and published at once; training never waits on the DHT.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Dict, Optional, Union

from hivemind.utils.timed_storage import get_dht_time

from node.swarm.leases import Lease
from node.swarm.membership import SwarmMembership
from node.swarm.presence import Presence
from protocol.hashing import BlobRef
from protocol.jobs import Job
from protocol.records import CheckpointRecord, ProviderRecord, RouterRecord, SignedRecord

logger = logging.getLogger("ddm_swarm.announcer")


def provider_ttl_s(period_s: float) -> float:
    """Lifetime of a provider record: a few lease periods, but at least a minute (a dead provider
    costs a fetcher one connection timeout, a missing one costs it the blob)."""
    return max(3 * period_s, 60.0)


def provider_due(expires_at: float, now: float, period_s: float) -> bool:
    """Whether a tick at `now` re-announces a provider record that expires at `expires_at`."""
    return expires_at - now < max(2 * period_s, provider_ttl_s(period_s) / 2)


def record_due(expires_at: float, now: float, period_s: float, record_ttl_s: float) -> bool:
    """Whether a tick at `now` re-publishes the node's checkpoint record that expires at `expires_at`."""
    return expires_at - now < max(2 * period_s, record_ttl_s / 4)


class Announcer:
    def __init__(self, membership: SwarmMembership, presence: Presence, current_step: Callable[[], int]):
        self.membership, self.presence, self.current_step = membership, presence, current_step
        self.period = membership.manifest.timing.lease_s
        self._lease: Optional[Lease] = None  # renewed every tick; set by `hold`, given back by `give_back`
        self._lease_lock = threading.Lock()
        self.last_announcement = "-"
        self.failures = 0
        self._provided: Dict[BlobRef, float] = {}  # blob -> expiry of our provider record
        self._latest: Dict[Job, SignedRecord] = {}  # job -> our latest checkpoint/router record
        # job -> blobs (state and inference) of our checkpoint record the DHT last confirmed: the
        # node's gc must keep them
        self.confirmed: Dict[Job, frozenset] = {}
        # signed records to publish as they are, or blob sha256s to announce as provided (signed when sent,
        # so a backlog can never publish an already-expired provider record)
        self._queue: "queue.Queue[Union[SignedRecord, BlobRef]]" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ddm-announcer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- the lease: one owner, one way back --------------------------------------------------------
    @property
    def lease(self) -> Optional[Lease]:
        return self._lease

    def hold(self, lease: Lease) -> None:
        """Renew `lease` every period from now on (a node holds one lease at a time)."""
        with self._lease_lock:
            if self._lease is not None and self._lease is not lease:
                raise RuntimeError(f"the lease on {self._lease.job} is still held; give it back first")
            self._lease = lease

    def give_back(self, step: int) -> Optional[Lease]:
        """Detach the lease and release it, as one step: every path that gives a job back calls this.
        A tick that read the lease just before is refused by the lease itself (see `Lease`)."""
        with self._lease_lock:
            lease, self._lease = self._lease, None
            if lease is not None:
                lease.release(step)
        return lease

    # --- called from other threads ---------------------------------------------------------------
    def announce_checkpoint(self, job: Job, record: SignedRecord) -> None:
        """Publish a checkpoint (or router) record and announce this node as its blobs' provider."""
        # provider first: whoever sees the record can find the blobs at once
        self.provide(record.inference, now=True)  # type: ignore[attr-defined]
        self.provide(record.blob, now=True)  # type: ignore[attr-defined]
        self._queue.put(record)
        self._latest[job] = record

    def provide(self, blob: BlobRef, now: bool = False) -> None:
        """Announce this node as a provider of a blob it holds (at once with `now`, else next tick)."""
        if blob in self._provided:
            return
        self._provided[blob] = 0.0
        if now:
            self._queue.put(blob)

    def unprovide(self, sha256: str) -> None:
        """Stop announcing blob `sha256` (every reference to it: this node no longer holds its bytes)."""
        for blob in [blob for blob in self._provided if blob.sha256 == sha256]:
            self._provided.pop(blob, None)

    # --- the loop --------------------------------------------------------------------------------
    @property
    def provider_ttl(self) -> float:
        return provider_ttl_s(self.period)

    def _provider_record(self, blob: BlobRef) -> ProviderRecord:
        expires = get_dht_time() + self.provider_ttl
        record = ProviderRecord(self.membership.swarm_id, blob, self.membership.peer_id,
                                tuple(self.membership.maddrs[:8]), expires)
        return record.signed_by(self.membership.identity)

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=max(0.0, min(0.5, next_tick - time.monotonic())))
                self._send(item)
            except queue.Empty:
                pass
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + self.period

    def _send(self, item: Union[SignedRecord, BlobRef]) -> None:
        if isinstance(item, BlobRef):
            if item not in self._provided:
                return  # unprovided while it waited
            record = self._provider_record(item)
            self._publish(record, _describe(record))
            self._provided[item] = record.expires_at
        elif self._publish(item, _describe(item)) and isinstance(item, (CheckpointRecord, RouterRecord)):
            self.confirmed[item.job] = frozenset((item.blob.sha256, item.inference.sha256))

    def _publish(self, record: SignedRecord, what: str) -> bool:
        try:
            self.membership.publish(record)
        except Exception as error:  # the DHT may be briefly unreachable; the next tick retries
            self.failures += 1
            logger.warning(f"could not publish {what}: {error}")
            return False
        self.last_announcement = f"{what} at {time.strftime('%H:%M:%S')}"
        return True

    def _tick(self) -> None:
        step = self.current_step()
        try:
            with self._lease_lock:
                lease = self._lease
            if lease is not None:
                lease.renew(step)
            self.presence.announce(job=lease.job if lease else None)  # the state is the node's
        except Exception as error:
            self.failures += 1
            logger.warning(f"could not renew the lease/presence: {error}")
        now = get_dht_time()
        for blob, expiry in list(self._provided.items()):
            if provider_due(expiry, now, self.period):
                record = self._provider_record(blob)
                self._publish(record, _describe(record))
                if blob in self._provided:
                    self._provided[blob] = record.expires_at
        ttl = self.membership.manifest.timing.record_ttl_s
        for job, record in list(self._latest.items()):
            if record_due(record.expires_at, now, self.period, ttl):  # type: ignore[attr-defined]
                self._latest[job] = record.renewed(self.membership.identity, now + ttl)
                self._publish(self._latest[job], f"{record.KIND} refresh")

    def stop(self, release: bool = True) -> None:
        """Stop the loop; with `release`, give the job back and leave with an OFFLINE tombstone."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        while not self._queue.empty():  # checkpoints made just before stopping still get announced
            self._send(self._queue.get_nowait())
        if release:
            self.give_back(self.current_step())
            self.presence.leave()


def _describe(record: SignedRecord) -> str:
    if isinstance(record, ProviderRecord):
        return f"provider {record.blob.sha256[:8]}"
    return f"{record.KIND} step {record.step}"  # type: ignore[attr-defined]
