"""Whether a candidate checkpoint is acceptable: the one decision the generator, a resuming trainer
and a mirror share.

A record is only a promise about a blob. In an open swarm anyone may announce thousands of records
at any step, so:
1. candidates are ranked best first by `trusted_order`, the one ranking decision: a record whose
   claimed step is beyond what its job can plausibly have reached (`Verified.step_bound`) is passed
   over, the rest go by `rank` (latest step, then best held-out metric);
2. before fetching anything, a record whose blob is larger than its model's checkpoint can be (per
   blob kind, `size_limit`) is
   passed over (a garbage blob may not cost more than a real one), and providers are looked up for
   a batch of candidates in one DHT traversal: a record whose blob nobody provides is passed over
   without waiting (`obtainable`);
3. each remaining candidate is fetched (verified against the signed sha256) and checked (`check_header`,
   `check_expert`, `check_router`, or the caller's own check). A failure is sorted by its type:
   *unreachable* (`Unreachable`: no provider could deliver it now; it may be there later) or
   *refused* (`Refused`: its bytes are not what its record promises; never tried again). Any other
   exception is a bug and surfaces;
4. a blob counts as provided only once a provider *answered* for it: a fetch that no provider answered
   at all (`NotProvided`: the provider records name peers that are not there, or that do not hold the
   blob) passes the record over as unprovided and costs no failure;
5. failures are budgeted per signer: after `MAX_FAILURES` failed candidates of one signer, that
   signer's other records are passed over, so a flood costs a bounded number of downloads per key and
   one signer's fakes never use up another's budget; when every failure of a round was "unreachable",
   the job's records are read again (a trainer may have replaced the record we read by a newer one
   meanwhile).

A record names two blobs (`BLOB_KINDS`): the training state, which resuming trainers and mirrors
fetch, and the inference export, the only one a generator fetches. A search is about one of them
(`blob=`); a mirror, which holds both, also checks that they hold the same EMA weights.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Generic, Iterable, Iterator, List, Optional, Set, Tuple, TypeVar, Union

import torch
from safetensors import SafetensorError, safe_open

from ddm_models.checkpoint import CheckpointMetadata, InvalidCheckpoint, load_expert, load_router
from ddm_models.experts import build_expert
from ddm_models.router import Router, build_router
from ddm_models.sampling import LoadedExpert
from node.blobs.fetch import NotProvided
from node.checkpoints.specs import expert_config, router_config
from node.errors import NodeError
from protocol.errors import ProtocolError
from protocol.hashing import BlobRef
from protocol.jobs import Job
from protocol.limits import MAX_STEP
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord

if TYPE_CHECKING:
    from node.checkpoints.audits import Evidence

logger = logging.getLogger("ddm_swarm.acceptance")
Record = Union[CheckpointRecord, RouterRecord]
T = TypeVar("T")
MAX_FAILURES = 8
LOOKUP_BATCH = 64
BLOB_KINDS = ("state", "inference")
# Bytes per model element a blob may hold: a state file at most four float32 copies of the model's
# tensors (EMA, training weights and two AdamW moments), an inference export one 16-bit copy; each
# with a small JSON header.
_BYTES_PER_ELEMENT, _HEADER_BYTES = {"state": 4 * 4, "inference": 2}, 1 << 20
_CONTENTS = {"state": "training", "inference": "inference"}
_elements: Dict[Tuple[str, str], int] = {}
_contradicted_seen: Set[str] = set()


class Unreachable(NodeError):
    """A candidate's blob could not be fetched now (no provider delivered it in time)."""


class Refused(NodeError):
    """A candidate's bytes are not what its signed record promises, or fail the swarm's checks."""


# Claimed steps. A record's step is a claim nobody checked; a trainer that resumes from it continues
# its numbering and a mirror prefers it, so a claim far ahead of the job's real progress must not
# win. Bound: a record of a job may claim at most S + STEP_SLACK + STEPS_PER_S_BOUND * (now - t) for
# the tightest (S, t) among the checkpoints of that job this node verified itself (fetched,
# hash-checked, header-checked): S its step, t when it was made (its signed created_at, never later
# than when we checked it). Every anchor grows at the same rate, so the tightest stays the tightest,
# and a verified record with an old created_at cannot loosen the bound. With nothing verified for a
# job only the protocol's bound applies, halved so that a trainer that adopts a step still has 2^39
# steps before its own records reach protocol.limits.MAX_STEP.
STEPS_PER_S_BOUND = 1000.0
STEP_SLACK = 10_000
UNVERIFIED_STEP_BOUND = MAX_STEP // 2


class Verified:
    """What this node fetched and checked itself, per job: the tightest step anchor (see
    STEPS_PER_S_BOUND) and the signers whose checkpoint it verified. Filled by resume, the mirror, the
    node's own checkpoints and claim-time proofs; read by `trusted_order` (step bounds) and the lease
    choice (who is proven). Thread-safe; kept in memory for the life of the process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._anchor: Dict[Job, Tuple[int, float]] = {}  # job -> (step, time it was reached, unix s)
        self._signers: Dict[Job, Set[str]] = {}

    def add(self, record: Record, now: Optional[float] = None) -> None:
        now = time.time() if now is None else now
        anchor = (record.step, min(now, record.created_at))
        with self._lock:
            known = self._anchor.get(record.job)
            if known is None or _offset(anchor) < _offset(known):
                self._anchor[record.job] = anchor
            self._signers.setdefault(record.job, set()).add(record.signer)

    def signers(self, job: Job) -> Set[str]:
        with self._lock:
            return set(self._signers.get(job, ()))

    def step_bound(self, job: Job, now: Optional[float] = None) -> int:
        """The highest step a record of `job` may claim and still be considered."""
        now = time.time() if now is None else now
        with self._lock:
            known = self._anchor.get(job)
        if known is None:
            return UNVERIFIED_STEP_BOUND
        step, reached = known
        return min(UNVERIFIED_STEP_BOUND, step + STEP_SLACK + int(STEPS_PER_S_BOUND * max(0.0, now - reached)))


def _offset(anchor: Tuple[int, float]) -> float:
    step, reached = anchor
    return step - STEPS_PER_S_BOUND * reached


def trusted_order(records: List[Record], verified: Optional[Verified] = None, now: Optional[float] = None,
                  evidence: Optional["Evidence"] = None) -> List[Record]:
    """The one ranking decision the generator, a resuming trainer and a mirror share: the records
    worth trying, best first. Drops records whose step is beyond `verified.step_bound` of their job
    (see STEPS_PER_S_BOUND), then `rank`s the rest with `evidence` (audits and revocations,
    `node.checkpoints.audits.read_evidence`)."""
    verified = verified if verified is not None else Verified()
    bounds: Dict[Job, int] = {}
    kept = []
    for record in records:
        if record.job not in bounds:
            bounds[record.job] = verified.step_bound(record.job, now)
        if record.step <= bounds[record.job]:
            kept.append(record)
    if len(kept) < len(records):
        logger.info(f"passed over {len(records) - len(kept)} record(s) claiming a step beyond what their job can "
                    f"have reached ({', '.join(f'{job} <= {bound}' for job, bound in bounds.items())})")
    return rank(kept, evidence)


def rank(records: List[Record], evidence: Optional["Evidence"] = None) -> List[Record]:
    """Best first. With `evidence` (`node.checkpoints.audits`): what the operator revoked and what its
    audits contradict are left out; audited experts come first, by the median loss independent
    auditors measured; the rest follow as without evidence: the latest step, then the lowest claimed
    held-out loss (the highest router accuracy), then the newest."""
    def metric(record: Record) -> float:
        return -record.heldout_accuracy if isinstance(record, RouterRecord) else record.heldout_loss

    def claimed(record: Record) -> tuple:
        return (-record.step, metric(record), -record.created_at)

    if evidence is None:
        return sorted(records, key=claimed)
    audited, unaudited = [], []
    for record in records:
        if evidence.is_revoked(record):
            continue
        verdict = evidence.verdict(record)
        if verdict.contradicted:
            if record.blob.sha256 in _contradicted_seen:
                continue
            _contradicted_seen.add(record.blob.sha256)  # said once per process: a mirror ranks every period
            logger.warning(f"passing over {record.KIND} {record.blob.sha256[:12]} (step {record.step}, signer "
                           f"{record.signer[:12]}): {verdict.auditors} independent audit(s) measured a median "
                           f"loss of {verdict.median:.4f}, it claims {record.heldout_loss:.4f}")
        elif verdict.median is not None:
            audited.append((verdict.median, *claimed(record), record))
        else:
            unaudited.append(record)
    return [entry[-1] for entry in sorted(audited, key=lambda e: e[:-1])] + sorted(unaudited, key=claimed)


def blob_of(record: Record, blob: str) -> BlobRef:
    """The record's blob of kind `blob` ("state" or "inference")."""
    return record.inference if blob == "inference" else record.blob


def check_header(path: Path, record: Record, manifest: SwarmManifest, blob: str = "state") -> CheckpointMetadata:
    """Check a checkpoint file's header against its signed record before any tensor is loaded: the
    contents its blob kind must have, the kind, the architecture of the record's model in this
    swarm, the cluster and the step. A record that points at another job's, another model's or an
    older checkpoint is refused here, so a replayed or doctored record can neither poison an
    ensemble nor roll a job back."""
    where = f"checkpoint {blob_of(record, blob).sha256[:12]}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = CheckpointMetadata.from_header(handle.metadata(), where)
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, InvalidCheckpoint):
            raise
        raise InvalidCheckpoint(f"{where} is not a readable safetensors file: {error}") from None
    if metadata.contents != _CONTENTS[blob]:
        raise InvalidCheckpoint(f"{where} holds {metadata.contents} contents, its record names it as the {blob} blob")
    if isinstance(record, RouterRecord):
        expected, cluster = router_config(manifest), -1
    else:
        expected, cluster = expert_config(manifest.expert_spec(record.model), manifest), record.cluster
    if metadata.config_hash != expected.config_hash():
        raise InvalidCheckpoint(f"{where} holds another architecture than model '{record.model}' of swarm "
                                f"'{manifest.name}'")
    if metadata.cluster != cluster or metadata.step != record.step:
        raise InvalidCheckpoint(f"{where} is {metadata.kind} of cluster {metadata.cluster} at step {metadata.step}, "
                                f"its record claims cluster {cluster} step {record.step}")
    return metadata


def check_expert(path: Path, record: CheckpointRecord, manifest: SwarmManifest, blob: str = "state") -> LoadedExpert:
    """Load an expert checkpoint (its `blob` kind) and check it is what its signed record says (header,
    architecture, step, finite weights); `InvalidCheckpoint` if not."""
    check_header(path, record, manifest, blob)
    return load_expert(path)


def check_router(path: Path, record: RouterRecord, manifest: SwarmManifest, blob: str = "state") -> Router:
    check_header(path, record, manifest, blob)
    return load_router(path)


def check_loadable(path: Path, record: Record, manifest: SwarmManifest,
                   blob: str = "state") -> Union[LoadedExpert, Router]:
    """The check for a record of either kind: the expert or the router it holds."""
    if isinstance(record, RouterRecord):
        return check_router(path, record, manifest, blob)
    return check_expert(path, record, manifest, blob)


@dataclass
class Accepted(Generic[T]):
    """The first acceptable candidate: its record, its verified file, and what the check returned."""

    record: Record
    path: Path
    value: T


@dataclass
class Search:
    """What one search tried: failures by kind, as (blob sha256, reason), and what it passed over."""

    refused: List[Tuple[str, str]] = field(default_factory=list)
    unreachable: List[Tuple[str, str]] = field(default_factory=list)
    passed: "Passed" = field(default_factory=lambda: Passed())
    by_signer: Dict[str, int] = field(default_factory=dict)  # failures of each signer's records

    @property
    def failures(self) -> int:
        return len(self.refused) + len(self.unreachable)


def find_acceptable(read: Callable[[], List[Record]], *, fetch: Callable[[Record], Path],
                    check: Callable[[Path, Record], T], membership, store, manifest: SwarmManifest,
                    skip: Iterable[str] = (), rounds: int = 2, pause_s: float = 1.0,
                    max_failures: int = MAX_FAILURES, search: Optional[Search] = None,
                    blob: str = "state", retry_unprovided: bool = False,
                    order: Callable[[List[Record]], List[Record]] = trusted_order) -> Optional[Accepted[T]]:
    """The best record of `read()` whose blob `fetch` delivers and `check` accepts, or None.

    `fetch(record)` returns the verified file; `check(path, record)` returns what the caller keeps (a
    loaded expert, a header) or raises. Failures are sorted by type: `NodeError`/`TimeoutError` from
    fetching is unreachable; `ProtocolError` (bytes that do not hash to the record) and
    `InvalidCheckpoint`/`Refused` from checking are refused. Anything else propagates: it is a bug.
    Blobs in `skip` (refused before) are not tried. `search` collects what was tried. `blob` is the
    kind of blob the search is about (`BLOB_KINDS`): its sizes, providers and hashes are the ones
    looked at, and `fetch` must fetch it. `order` ranks `read()`'s records (`trusted_order` with the
    caller's `Verified`). A round found records unreachable (or, with `retry_unprovided`, unprovided:
    a provider lookup that timed out on a loaded machine looks the same as none) and accepted nothing:
    the next round reads the job again after `pause_s`.
    """
    search = search if search is not None else Search()
    tried: Set[str] = set(skip)
    for round_ in range(rounds):
        unreachable_before, unprovided_before = len(search.unreachable), search.passed.unprovided
        fresh = [record for record in order(read()) if blob_of(record, blob).sha256 not in tried]
        for record in obtainable(fresh, membership, store, manifest, search.passed, blob):
            if search.by_signer.get(record.signer, 0) >= max_failures:
                search.passed.over_budget += 1
                continue
            tried.add(blob_of(record, blob).sha256)
            try:
                path = fetch(record)
            except ProtocolError as error:
                _failed(search, search.refused, record, f"its bytes are not what its record names: {error}", blob)
                continue
            except NotProvided:  # no provider answered at all: nobody provides it, whatever the records say
                search.passed.unprovided += 1
                tried.discard(blob_of(record, blob).sha256)  # a provider may come up by the next round
                continue
            except (NodeError, TimeoutError) as error:
                _failed(search, search.unreachable, record, f"could not fetch it: {error}", blob)
                tried.discard(blob_of(record, blob).sha256)  # the next round tries it again (its signer's budget bounds how often)
                continue
            try:
                return Accepted(record, path, check(path, record))
            except (InvalidCheckpoint, Refused, ProtocolError) as error:
                _failed(search, search.refused, record, str(error), blob)
        unprovided = search.passed.unprovided - unprovided_before if retry_unprovided else 0
        if (len(search.unreachable) == unreachable_before and not unprovided) or round_ == rounds - 1:
            break
        logger.info(f"reading the job's checkpoints again: {len(search.unreachable) - unreachable_before} were "
                    f"unreachable, {unprovided} unprovided")
        time.sleep(pause_s)
    if search.passed:
        logger.info(f"passed over {search.passed.describe()}")
    return None


def _failed(search: Search, where: List[Tuple[str, str]], record: Record, reason: str, blob: str) -> None:
    sha = blob_of(record, blob).sha256
    where.append((sha, reason))
    search.by_signer[record.signer] = search.by_signer.get(record.signer, 0) + 1
    logger.warning(f"skipping {record.KIND} {sha[:12]} (step {record.step}, signer "
                   f"{record.signer[:12]}): {reason}")


def size_limit(record: Record, manifest: SwarmManifest, blob: str = "state") -> int:
    """The largest blob (bytes) of kind `blob` a checkpoint of `record`'s model can be."""
    key = (manifest.swarm_id, "router" if isinstance(record, RouterRecord) else record.model)
    if key not in _elements:
        with torch.device("meta"):  # shapes only: no memory for weights
            model = (build_router(router_config(manifest)) if isinstance(record, RouterRecord)
                     else build_expert(expert_config(manifest.expert_spec(record.model), manifest)))
        _elements[key] = sum(tensor.numel() for tensor in model.state_dict().values())
    return _BYTES_PER_ELEMENT[blob] * _elements[key] + _HEADER_BYTES


@dataclass
class Passed:
    """Records passed over without a download, by reason."""

    unprovided: int = 0
    oversized: int = 0
    over_budget: int = 0  # of signers whose records failed `MAX_FAILURES` times already

    def __bool__(self) -> bool:
        return bool(self.unprovided or self.oversized or self.over_budget)

    def describe(self) -> str:
        return (f"{self.unprovided} whose blob nobody provides, {self.oversized} whose blob is larger than "
                f"its model's checkpoint can be, {self.over_budget} of signers out of failure budget")


def obtainable(records: Iterable[Record], membership, store, manifest: SwarmManifest,
               passed: Passed | None = None, blob: str = "state") -> Iterator[Record]:
    """`records` (in the order given, best first) whose blob of kind `blob` this node holds or
    someone provides, and whose size is plausible for its model. `passed` counts the others."""
    passed = passed if passed is not None else Passed()
    pending = list(records)
    for start in range(0, len(pending), LOOKUP_BATCH):
        batch = []
        for record in pending[start:start + LOOKUP_BATCH]:
            if blob_of(record, blob).size > size_limit(record, manifest, blob):
                passed.oversized += 1
            else:
                batch.append(record)
        unknown = [blob_of(r, blob) for r in batch if not store.has(blob_of(r, blob).sha256)]
        provided = membership.providers_of(unknown) if unknown else {}
        for record in batch:
            ref = blob_of(record, blob)
            if store.has(ref.sha256) or ref in provided:
                yield record
            else:
                passed.unprovided += 1
