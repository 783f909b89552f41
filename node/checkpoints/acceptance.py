"""Whether a candidate checkpoint is acceptable: the one decision the generator, a resuming trainer
and a mirror share.

A record is only a promise about a blob. In an open swarm anyone may announce thousands of records
at any step, so:
1. candidates are ranked best first (`rank`: latest step, then best held-out metric);
2. before fetching anything, a record whose blob is larger than its model's checkpoint can be is
   passed over (a garbage blob may not cost more than a real one), and providers are looked up for
   a batch of candidates in one DHT traversal: a record whose blob nobody provides is passed over
   without waiting (`obtainable`);
3. each remaining candidate is fetched (verified against the signed sha256) and checked (`check_header`,
   `check_expert`, `check_router`, or the caller's own check). A failure is sorted by its type:
   *unreachable* (`Unreachable`: no provider could deliver it now; it may be there later) or
   *refused* (`Refused`: its bytes are not what its record promises; never tried again). Any other
   exception is a bug and surfaces;
4. the search gives up on a job after `MAX_FAILURES` failed candidates, so a flood of records costs a
   bounded number of downloads; when every failure of a round was "unreachable", the job's records are
   read again (a trainer may have replaced the record we read by a newer one meanwhile).
"""

from __future__ import annotations

import logging
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
from node.checkpoints.specs import expert_config, router_config

if TYPE_CHECKING:
    from node.checkpoints.audits import Evidence
from node.errors import NodeError
from protocol.errors import ProtocolError
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord

logger = logging.getLogger("ddm_swarm.acceptance")
Record = Union[CheckpointRecord, RouterRecord]
T = TypeVar("T")
MAX_FAILURES = 8
LOOKUP_BATCH = 64
# A checkpoint holds at most four float32 copies of the model's tensors (EMA, training weights and
# two AdamW moments) and a small JSON header.
_COPIES, _HEADER_BYTES = 4, 1 << 20
_size_limits: Dict[Tuple[str, str], int] = {}
_contradicted_seen: Set[str] = set()


class Unreachable(NodeError):
    """A candidate's blob could not be fetched now (no provider delivered it in time)."""


class Refused(NodeError):
    """A candidate's bytes are not what its signed record promises, or fail the swarm's checks."""


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


def check_header(path: Path, record: Record, manifest: SwarmManifest) -> CheckpointMetadata:
    """Check a checkpoint file's header against its signed record before any tensor is loaded: the
    kind, the architecture of the record's model in this swarm, the cluster and the step. A record
    that points at another job's, another model's or an older checkpoint is refused here, so a
    replayed or doctored record can neither poison an ensemble nor roll a job back."""
    where = f"checkpoint {record.blob.sha256[:12]}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = CheckpointMetadata.from_header(handle.metadata(), where)
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, InvalidCheckpoint):
            raise
        raise InvalidCheckpoint(f"{where} is not a readable safetensors file: {error}") from None
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


def check_expert(path: Path, record: CheckpointRecord, manifest: SwarmManifest) -> LoadedExpert:
    """Load an expert checkpoint and check it is what its signed record says; `InvalidCheckpoint` if not."""
    check_header(path, record, manifest)
    return load_expert(path)


def check_router(path: Path, record: RouterRecord, manifest: SwarmManifest) -> Router:
    check_header(path, record, manifest)
    return load_router(path)


def check_loadable(path: Path, record: Record, manifest: SwarmManifest) -> Union[LoadedExpert, Router]:
    """The check for a record of either kind: the expert or the router it holds."""
    if isinstance(record, RouterRecord):
        return check_router(path, record, manifest)
    return check_expert(path, record, manifest)


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

    @property
    def failures(self) -> int:
        return len(self.refused) + len(self.unreachable)


def find_acceptable(read: Callable[[], List[Record]], *, fetch: Callable[[Record], Path],
                    check: Callable[[Path, Record], T], membership, store, manifest: SwarmManifest,
                    skip: Iterable[str] = (), rounds: int = 2, pause_s: float = 1.0,
                    max_failures: int = MAX_FAILURES, search: Optional[Search] = None,
                    evidence: Optional[Callable[[List[Record]], "Evidence"]] = None) -> Optional[Accepted[T]]:
    """The best record of `read()` whose blob `fetch` delivers and `check` accepts, or None.

    `fetch(record)` returns the verified file; `check(path, record)` returns what the caller keeps (a
    loaded expert, a header) or raises. Failures are sorted by type: `NodeError`/`TimeoutError` from
    fetching is unreachable; `ProtocolError` (bytes that do not hash to the record) and
    `InvalidCheckpoint`/`Refused` from checking are refused. Anything else propagates: it is a bug.
    Blobs in `skip` (refused before) are not tried. `search` collects what was tried. `evidence(records)`
    (audits and revocations, `node.checkpoints.audits.read_evidence`) orders and filters them (`rank`).
    """
    search = search if search is not None else Search()
    tried: Set[str] = set(skip)
    for round_ in range(rounds):
        unreachable_before = len(search.unreachable)
        records = read()
        fresh = [record for record in rank(records, evidence(records) if evidence else None)
                 if record.blob.sha256 not in tried]
        for record in obtainable(fresh, membership, store, manifest, search.passed):
            if search.failures >= max_failures:
                logger.warning(f"gave up on this job after {search.failures} unusable checkpoints")
                return None
            tried.add(record.blob.sha256)
            try:
                path = fetch(record)
            except ProtocolError as error:
                _failed(search.refused, record, f"its bytes are not what its record names: {error}")
                continue
            except (NodeError, TimeoutError) as error:
                _failed(search.unreachable, record, f"could not fetch it: {error}")
                continue
            try:
                return Accepted(record, path, check(path, record))
            except (InvalidCheckpoint, Refused, ProtocolError) as error:
                _failed(search.refused, record, str(error))
        if len(search.unreachable) == unreachable_before or round_ == rounds - 1:
            break
        logger.info(f"reading the job's checkpoints again: {len(search.unreachable) - unreachable_before} were "
                    "unreachable")
        time.sleep(pause_s)
    if search.passed:
        logger.info(f"passed over {search.passed.describe()}")
    return None


def _failed(where: List[Tuple[str, str]], record: Record, reason: str) -> None:
    where.append((record.blob.sha256, reason))
    logger.warning(f"skipping {record.KIND} {record.blob.sha256[:12]} (step {record.step}, signer "
                   f"{record.signer[:12]}): {reason}")


def size_limit(record: Record, manifest: SwarmManifest) -> int:
    """The largest blob (bytes) a checkpoint of `record`'s model can be."""
    key = (manifest.swarm_id, "router" if isinstance(record, RouterRecord) else record.model)
    if key not in _size_limits:
        with torch.device("meta"):  # shapes only: no memory for weights
            model = (build_router(router_config(manifest)) if isinstance(record, RouterRecord)
                     else build_expert(expert_config(manifest.expert_spec(record.model), manifest)))
        elements = sum(tensor.numel() for tensor in model.state_dict().values())
        _size_limits[key] = _COPIES * 4 * elements + _HEADER_BYTES
    return _size_limits[key]


@dataclass
class Passed:
    """Records passed over without a download, by reason."""

    unprovided: int = 0
    oversized: int = 0

    def __bool__(self) -> bool:
        return bool(self.unprovided or self.oversized)

    def describe(self) -> str:
        return (f"{self.unprovided} whose blob nobody provides, {self.oversized} whose blob is larger than "
                f"its model's checkpoint can be")


def obtainable(records: Iterable[Record], membership, store, manifest: SwarmManifest,
               passed: Passed | None = None) -> Iterator[Record]:
    """`records` (in the order given, best first) whose blob this node holds or someone provides,
    and whose size is plausible for its model. `passed` counts the others."""
    passed = passed if passed is not None else Passed()
    pending = list(records)
    for start in range(0, len(pending), LOOKUP_BATCH):
        batch = []
        for record in pending[start:start + LOOKUP_BATCH]:
            if record.blob.size > size_limit(record, manifest):
                passed.oversized += 1
            else:
                batch.append(record)
        unknown = [record.blob.sha256 for record in batch if not store.has(record.blob.sha256)]
        provided = membership.providers_of(unknown) if unknown else {}
        for record in batch:
            if store.has(record.blob.sha256) or record.blob.sha256 in provided:
                yield record
            else:
                passed.unprovided += 1
