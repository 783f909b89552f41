"""A model of the swarm's records in hivemind's DHT, and the cost of reading and writing them.

Record semantics are hivemind's: under a key, one entry per subkey (the signer); a store replaces
an entry only with a later expiration ("latest expiration wins"); an entry is gone once it expires;
a stored value is visible to readers from the moment its store completes. Replication and partial
views are not modelled: every reader sees the one store (a lost operation stands for a read that
found no replica in time, or a store that reached none).

Costs are counted as the node's `SwarmMembership` makes them: a `get` returns every live entry under
the key (all claims of the swarm, all checkpoint records of a cluster), a `store` sends one entry.
Sizes come from real signed records (`RecordSizes.measure`), entry = value + subkey + expiration.
"""

from __future__ import annotations

import heapq
import os
from collections import defaultdict
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Dict, Iterable, List, Optional, Set

from protocol.hashing import BlobHasher
from protocol.identity import Identity
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, Claim, PeerRecord, ProviderRecord, RouterRecord
from protocol.jobs import Job

_NONE: frozenset = frozenset()
EXPIRATION_BYTES = 8  # a float64 expiration travels with every entry
PEER_ID = "12D3KooWPMGeYauVRuNQLfQFUzhUUDMG1bjoY8GwNhmrMBM28Hk5"
MADDRS = ("/ip4/203.0.113.7/tcp/31337/p2p/" + PEER_ID, "/ip4/203.0.113.7/udp/31337/quic/p2p/" + PEER_ID)


@dataclass(frozen=True)
class RecordSizes:
    """Bytes of one DHT entry of each kind (encoded signed record + subkey + expiration)."""

    claim: int
    peer: int
    checkpoint: int
    router: int
    provider: int

    @staticmethod
    def measure(manifest: SwarmManifest) -> "RecordSizes":
        """Build one real signed record of each kind and take its encoded size."""
        me, now = Identity.generate(), 1.8e9
        hasher = BlobHasher()
        hasher.update(os.urandom(64))
        blob, sid, spec = hasher.finish(), manifest.swarm_id, manifest.expert_for_cluster(manifest.num_clusters - 1)
        records = {
            "claim": Claim(sid, Job.expert(manifest.num_clusters - 1), spec.name, PEER_ID, 123456, "training", now),
            "peer": PeerRecord(sid, PEER_ID, MADDRS, "trainer", Job.expert(0), "training", "ddm-swarm/0.1.0", now),
            "checkpoint": CheckpointRecord(sid, manifest.num_clusters - 1, spec.name, spec.objective, spec.spec_hash,
                                           123400, 123400 * 64, 0.1234, blob, blob, blob.sha256, now, now),
            "router": RouterRecord(sid, manifest.router.name, manifest.router.spec_hash, manifest.num_clusters,
                                   123400, 123400 * 64, 0.5, blob, blob, blob.sha256, now, now),
            "provider": ProviderRecord(sid, blob, PEER_ID, MADDRS, now),
        }
        sizes = {kind: len(r.signed_by(me).encode()) + len(me.signer_id) + EXPIRATION_BYTES
                 for kind, r in records.items()}
        return RecordSizes(**sizes)


class SimClaim:
    """What the lease rules read of a `Claim` (`job`, `signer`, `state`, `expires_at`): built once
    per holder instead of a signed record per renewal (the rules never look at the rest)."""

    __slots__ = ("job", "signer", "state", "expires_at")

    def __init__(self, job: Job, signer: str, state: str, expires_at: float):
        self.job, self.signer, self.state, self.expires_at = job, signer, state, expires_at


class ClaimStore:
    """The swarm's claims key: one entry per signer slot. Keeps, incrementally, the live training
    claims of each job (`holders`), so coverage is known at every moment without a scan."""

    def __init__(self, jobs: List[Job], on_coverage: Callable[[int, bool, float], None] = lambda *_: None):
        self.jobs, self.on_coverage = jobs, on_coverage  # (job, covered now, when)
        self.entry_exp: Dict[int, float] = {}  # slot -> expiration of its entry (any state)
        self.entry_job: Dict[int, int] = {}
        self.entry_state: Dict[int, str] = {}
        self.holders: List[Dict[int, SimClaim]] = [dict() for _ in jobs]  # job -> slot -> live claim
        self.held_by: Dict[int, int] = {}  # slot -> job it holds a live training claim on
        self.uncovered = len(jobs)
        self.live_entries = 0
        self._holder_heap: List[tuple] = []
        self._entry_heap: List[tuple] = []
        self.version = 0  # bumped whenever the set of holders changes

    def store(self, slot: int, signer: str, job: int, state: str, expires: float, now: float) -> bool:
        """Apply a completed store; False if the DHT keeps the entry it has (a later expiration)."""
        self.advance(now)
        if expires <= now:
            return False
        current = self.entry_exp.get(slot)
        if current is not None and current > now and expires <= current:
            return False
        if current is None or current <= now:
            self.live_entries += 1
        self.entry_exp[slot], self.entry_job[slot], self.entry_state[slot] = expires, job, state
        heapq.heappush(self._entry_heap, (expires, slot))
        if state == "training" and self.held_by.get(slot) == job:  # a renewal: the same holder, later
            self.holders[job][slot].expires_at = expires
            heapq.heappush(self._holder_heap, (expires, slot))
            return True
        self._drop_holder(slot, now)
        if state == "training":
            self.holders[job][slot] = SimClaim(self.jobs[job], signer, state, expires)
            if len(self.holders[job]) == 1:
                self.uncovered -= 1
                self.on_coverage(job, True, now)
            self.held_by[slot] = job
            heapq.heappush(self._holder_heap, (expires, slot))
        self.version += 1
        return True

    def _drop_holder(self, slot: int, when: float) -> None:
        job = self.held_by.pop(slot, None)
        if job is not None:
            del self.holders[job][slot]
            if not self.holders[job]:
                self.uncovered += 1
                self.on_coverage(job, False, when)

    def advance(self, now: float) -> None:
        """Let every entry whose expiration has passed disappear."""
        heap = self._holder_heap
        while heap and heap[0][0] <= now:
            expires, slot = heapq.heappop(heap)
            if slot in self.held_by and self.entry_exp.get(slot) == expires:
                self._drop_holder(slot, expires)
                self.version += 1
        heap = self._entry_heap
        while heap and heap[0][0] <= now:
            expires, slot = heapq.heappop(heap)
            if self.entry_exp.get(slot) == expires:
                self.live_entries -= 1
                del self.entry_exp[slot]

    def live_claims(self, now: float) -> List[SimClaim]:
        """Every live training claim: what `live_claimers` keeps of a full read of the key."""
        self.advance(now)
        return [claim for holders in self.holders for claim in holders.values()]

    def compact_view(self, own: int, now: float, per_job: int = 1) -> List[SimClaim]:
        """A read that `should_move` answers exactly as a full one: every live claim on `own`, and one
        live claim of each other held job (it looks only at whether another job has a holder).
        `keep_previous_job` asks whether another job has a holder *other than me*: `per_job=2` (a
        signer holds one job at most, so one of two claims is someone else's)."""
        self.advance(now)
        view = list(self.holders[own].values())
        for job, holders in enumerate(self.holders):
            if job != own and holders:
                view.extend(islice(holders.values(), per_job))
        return view

    def choice_view(self, candidates: Iterable[int], me: int, proven: Dict[int, Set[int]],
                    now: float) -> List[SimClaim]:
        """A read that `choose_job` over `candidates` answers exactly as a full one, for the signer in
        slot `me` (its own claims left out, as the rule leaves them out); `proven`: job -> slots.

        The rule orders jobs by (proven claimers, claimers, progress, spread), counted without `me`.
        A job with more proven claimers than the fewest any job has loses on the first key: one
        proven claim keeps it losing. Among the others (all with the fewest proven), one with more
        unproven claimers than the fewest loses on the second key: one unproven claim keeps it
        losing; the rest keep no claim and tie as they did, for progress and spread to decide. So
        the rule chooses the job it would choose from all N claims, from at most one claim per job
        (tests/test_swarm_sim.py checks this against the full call)."""
        self.advance(now)
        counts = []
        for job in candidates:
            holders, sure_slots = self.holders[job], proven.get(job, _NONE)
            mine = me in holders
            sure = len(holders.keys() & sure_slots) - (mine and me in sure_slots) if sure_slots else 0
            counts.append((job, sure, len(holders) - mine - sure))
        if not counts:
            return []
        fewest_sure = min(sure for _, sure, _ in counts)
        fewest_unsure = min(unsure for _, sure, unsure in counts if sure == fewest_sure)
        view: List[SimClaim] = []
        for job, sure, unsure in counts:
            holders, sure_slots = self.holders[job], proven.get(job, _NONE)
            if sure > fewest_sure:
                view.append(holders[next(s for s in holders.keys() & sure_slots if s != me)])
            elif unsure > fewest_unsure:
                view.append(holders[next(s for s in holders if s != me and s not in sure_slots)])
        return view


class CheckpointStore:
    """One key per job; under it one record per signer that announced a checkpoint of the job."""

    def __init__(self, jobs: List[Job], rank, signers: List[str]):
        self.jobs, self.rank, self.signers = jobs, rank, signers  # signers: slot -> signer id
        self.records: List[Dict[int, list]] = [dict() for _ in jobs]  # job -> slot -> [record, expires, holder]
        self._best: Dict[int, tuple] = {}  # job -> (valid until, best entry or None)
        self._summary: Dict[int, tuple] = {}  # job -> (valid until, (latest step, signers, slots))
        self.total = 0  # entries under every job's key (some may have expired since)

    def store(self, job: int, slot: int, record, expires: float, now: float) -> None:
        entry = self.records[job].get(slot)
        if entry is None or entry[1] <= now or expires > entry[1]:
            self.total += entry is None
            self.records[job][slot] = [record, expires, slot]
            self._best.pop(job, None)
            self._summary.pop(job, None)

    def live(self, job: int, now: float) -> List[list]:
        entries = self.records[job]
        for slot in [s for s, e in entries.items() if e[1] <= now]:
            del entries[slot]
            self.total -= 1
        return list(entries.values())

    def summary(self, job: int, now: float) -> tuple:
        """(latest live step, signers of live records, their slots): what `progress_by_job` reads of
        the job's key, cached until a record of the job is stored or one expires (a join reads every
        job's key: K + 1 summaries per join)."""
        cached = self._summary.get(job)
        if cached is not None and now < cached[0]:
            return cached[1]
        live = self.live(job, now)
        slots = {e[2] for e in live}
        value = (max((e[0].step for e in live), default=0), {self.signers[s] for s in slots}, slots)
        self._summary[job] = (min((e[1] for e in live), default=float("inf")), value)
        return value

    def count(self, job: int) -> int:
        return len(self.records[job])

    def best(self, job: int, now: float) -> Optional[list]:
        """The entry whose record `rank` puts first among the live ones (cached until one changes)."""
        cached = self._best.get(job)
        if cached is not None and now < cached[0]:
            return cached[1]
        live = self.live(job, now)
        best = None
        if live:
            by_record = {id(e[0]): e for e in live}
            best = by_record[id(self.rank([e[0] for e in live])[0])]
        self._best[job] = (min((e[1] for e in live), default=float("inf")), best)
        return best


class Counters:
    """DHT operations and bytes, by purpose: gets, stores, bytes received, bytes sent."""

    def __init__(self) -> None:
        self.by_purpose: Dict[str, List[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])

    def get(self, purpose: str, bytes_in: float, count: int = 1) -> None:
        row = self.by_purpose[purpose]
        row[0] += count
        row[2] += bytes_in

    def store(self, purpose: str, bytes_out: float, count: int = 1) -> None:
        row = self.by_purpose[purpose]
        row[1] += count
        row[3] += bytes_out

    def totals(self) -> Dict[str, float]:
        rows = list(self.by_purpose.values())
        return {"gets": sum(r[0] for r in rows), "stores": sum(r[1] for r in rows),
                "bytes_in": sum(r[2] for r in rows), "bytes_out": sum(r[3] for r in rows)}

