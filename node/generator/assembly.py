"""Assembling the ensemble from the swarm: for every cluster the best acceptable expert, and the
router, fetched as verified blobs and loaded; or loaded back from a folder saved by `fetch`.

A candidate checkpoint is acceptable when its record passed the swarm's policy (signature, trusted
signer, allowed model spec), its bytes hash to the signed sha256, the file loads as the exact
architecture and objective the spec names, for the cluster and step the record claims, with finite
weights; with `verify`, its loss on the cluster's held-out data must also be close to the claim.
Candidates are tried best first (latest step, then lowest held-out loss); a bad one is skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from safetensors import SafetensorError, safe_open

from ddm_models.checkpoint import CheckpointMetadata, InvalidCheckpoint, load_expert, load_router
from ddm_models.router import Router
from ddm_models.sampling import EnsembleSampler, LoadedExpert, SampleResult
from ddm_models.text import TextEncoder, build_text_encoder
from node.candidates import MAX_FAILURES, Passed, obtainable
from node.errors import NodeError
from node.files import atomic_write_bytes
from node.jobs import expert_config, router_config
from node.swarm_files import read_manifest_file, write_manifest_file
from protocol.errors import HashMismatch, ProtocolError
from protocol.hashing import BlobHasher
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord, decode_record

logger = logging.getLogger("ddm_swarm.assembly")
Record = Union[CheckpointRecord, RouterRecord]
# A checkpoint is "much worse than it claims" past this factor (plus a small absolute slack, since
# the claim was measured with other noise draws).
VERIFY_TOLERANCE = (1.5, 0.02)


class EnsembleUnavailable(NodeError):
    """No acceptable expert could be assembled from the swarm."""


def routing_strategy(name: str) -> Tuple[str, Optional[int]]:
    """Manifest/CLI routing names (top1, top2, top3, full) -> the sampler's (strategy, k)."""
    if name in ("top1", "top2", "full"):
        return name, None
    if name.startswith("top") and name[3:].isdigit():
        return "topk", int(name[3:])
    raise NodeError(f"unknown routing {name!r}: use top1, top2, top3 or full")


def rank(records: List[Record]) -> List[Record]:
    metric = (lambda r: r.heldout_loss) if records and isinstance(records[0], CheckpointRecord) else \
        (lambda r: -r.heldout_accuracy)
    return sorted(records, key=lambda r: (-r.step, metric(r), -r.created_at))


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


@dataclass
class Ensemble:
    """The router and one expert per available cluster, with the records they came from."""

    manifest: SwarmManifest
    experts: List[LoadedExpert]
    router: Optional[Router]
    records: List[Record]
    files: Dict[str, Path] = field(default_factory=dict)  # blob sha256 -> file
    text_encoder: Optional[TextEncoder] = None
    rejected: List[Tuple[str, str]] = field(default_factory=list)  # (blob sha256, why it was not used)

    def sampler(self, routing: Optional[str] = None) -> EnsembleSampler:
        strategy, k = routing_strategy(routing or self.manifest.sampling.routing)
        if self.text_encoder is None:
            self.text_encoder = build_text_encoder(self.manifest.text_encoder)
        router = self.router if len(self.experts) > 1 else None
        if len(self.experts) > 1 and router is None:
            raise EnsembleUnavailable("several experts but no router checkpoint in the swarm yet: wait for the "
                                      "router job, or generate from one cluster")
        return EnsembleSampler(self.experts, router, strategy=strategy, k=k, text_encoder=self.text_encoder)

    def sample(self, prompts: List[str], *, routing: Optional[str] = None, steps: Optional[int] = None,
               guidance: Optional[float] = None, seed: int = 0) -> SampleResult:
        """Images (B, C, H, W) in [-1, 1] for `prompts`, with the swarm's sampling defaults."""
        defaults = self.manifest.sampling
        return self.sampler(routing).sample(list(prompts), num_steps=steps or defaults.steps,
                                            guidance_scale=defaults.guidance if guidance is None else guidance,
                                            seed=seed)

    def describe(self) -> List[dict]:
        rows = []
        for record in self.records:
            is_router = isinstance(record, RouterRecord)
            rows.append({"job": "router" if is_router else f"expert/{record.cluster}", "model": record.model,
                         "objective": "router" if is_router else record.objective, "step": record.step,
                         "heldout": record.heldout_accuracy if is_router else record.heldout_loss,
                         "signer": record.signer[:12], "sha256": record.blob.sha256})
        return rows

    # --- offline copies --------------------------------------------------------------------------
    def save(self, out: Path) -> Path:
        """Write the ensemble to `out` (safetensors files, the manifest, ensemble.json) for offline use."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        entries = []
        for record in self.records:
            name = f"{'router' if isinstance(record, RouterRecord) else f'expert-{record.cluster}'}-" \
                   f"{record.blob.sha256[:12]}.safetensors"
            target = out / name
            if not target.exists():
                tmp = target.with_name(f".{name}.tmp")
                shutil.copyfile(self.files[record.blob.sha256], tmp)
                tmp.replace(target)
            entries.append({"file": name, "record": record.encode().hex()})
        write_manifest_file(self.manifest, out / "manifest.yaml")
        atomic_write_bytes(out / "ensemble.json", json.dumps({"swarm_id": self.manifest.swarm_id,
                                                              "checkpoints": entries}, indent=2).encode())
        return out

    @classmethod
    def load(cls, folder: Path) -> "Ensemble":
        """An ensemble saved by `save`, checked again: signatures, file hashes, architectures."""
        folder = Path(folder)
        try:
            index = json.loads((folder / "ensemble.json").read_text())
            manifest = read_manifest_file(folder / "manifest.yaml")
        except (OSError, ValueError) as error:
            raise NodeError(f"{folder} is not an ensemble saved by `ddm-swarm fetch`: {error}") from None
        if index.get("swarm_id") != manifest.swarm_id:
            raise NodeError(f"{folder}/ensemble.json belongs to another swarm than its manifest.yaml")
        experts, router, records, files = [], None, [], {}
        for entry in index["checkpoints"]:
            record = decode_record(bytes.fromhex(entry["record"]))
            path = folder / entry["file"]
            _check_file_hash(path, record.blob.sha256)
            if isinstance(record, RouterRecord):
                router = check_router(path, record, manifest)
            else:
                experts.append(check_expert(path, record, manifest))
            records.append(record)
            files[record.blob.sha256] = path
        return cls(manifest, experts, router, records, files)


def _check_file_hash(path: Path, sha256: str) -> None:
    hasher = BlobHasher()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(piece)
    if hasher.finish().sha256 != sha256:
        raise HashMismatch(f"{path} does not hash to the sha256 its signed record names; re-fetch the ensemble")


class Assembler:
    """Picks and fetches the best acceptable checkpoint of every job through a node's `BlobService`."""

    def __init__(self, manifest: SwarmManifest, membership, blobs, *, verify: bool = False,
                 heldout: Optional[Callable[[int], object]] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None):
        self.manifest, self.membership, self.blobs = manifest, membership, blobs
        self.verify, self.heldout, self.progress = verify, heldout, progress
        self.rejected: List[Tuple[str, str]] = []  # (sha256, reason)
        self._failures = 0  # of the job being assembled

    def _fetch(self, record: Record) -> Optional[Path]:
        what = f"{record.KIND} {record.blob.sha256[:12]}"
        report = (lambda done, total: self.progress(what, done, total)) if self.progress else None
        try:
            return self.blobs.fetch(record.blob, progress=report)
        except (NodeError, ProtocolError, TimeoutError) as error:
            self._reject(record, f"could not fetch it: {error}")
            return None

    def _reject(self, record: Record, reason: str) -> None:
        self._failures += 1
        self.rejected.append((record.blob.sha256, reason))
        logger.warning(f"skipping {record.KIND} {record.blob.sha256[:12]} (step {record.step}, signer "
                       f"{record.signer[:12]}): {reason}")

    def _candidates(self, read: Callable[[], List[Record]]):
        """Obtainable records best first (see `node.candidates`); if every one tried failed, read the
        DHT again once (a trainer may have replaced the record we read by a newer one meanwhile).
        Gives up after `MAX_FAILURES` failed candidates, so a flood of records costs a bounded time."""
        tried, self._failures = set(), 0
        for attempt in range(2):
            passed = Passed()
            fresh = [record for record in rank(read()) if record.blob.sha256 not in tried]
            for record in obtainable(fresh, self.membership, self.blobs.store, self.manifest, passed):
                if self._failures >= MAX_FAILURES:
                    logger.warning(f"gave up on this job after {self._failures} unusable checkpoints")
                    return
                tried.add(record.blob.sha256)
                yield record
            if attempt == 0:
                time.sleep(1.0)
        if passed:
            logger.info(f"passed over {passed.describe()}")

    def expert(self, cluster: int) -> Optional[Tuple[LoadedExpert, CheckpointRecord, Path]]:
        for record in self._candidates(lambda: self.membership.checkpoints(cluster)):
            path = self._fetch(record)
            if path is None:
                continue
            try:
                expert = check_expert(path, record, self.manifest)
            except InvalidCheckpoint as error:
                self._reject(record, str(error))
                continue
            if self.verify and not self._verified(expert, record):
                continue
            return expert, record, path
        return None

    def _verified(self, expert: LoadedExpert, record: CheckpointRecord) -> bool:
        from ddm_models.evaluation import expert_loss

        data = self.heldout(record.cluster)
        encoder = build_text_encoder(self.manifest.text_encoder)
        measured = expert_loss(expert, data, encoder)
        factor, slack = VERIFY_TOLERANCE
        if measured > record.heldout_loss * factor + slack:
            self._reject(record, f"held-out loss measured {measured:.4f}, it claims {record.heldout_loss:.4f}")
            return False
        return True

    def router(self) -> Optional[Tuple[Router, RouterRecord, Path]]:
        for record in self._candidates(self.membership.routers):
            path = self._fetch(record)
            if path is None:
                continue
            try:
                return check_router(path, record, self.manifest), record, path
            except InvalidCheckpoint as error:
                self._reject(record, str(error))
        return None

    def assemble(self, *, require_all: bool = False) -> Ensemble:
        experts, records, files = [], [], {}
        for cluster in range(self.manifest.num_clusters):
            found = self.expert(cluster)
            if found is None:
                if require_all:
                    raise EnsembleUnavailable(f"no acceptable checkpoint for cluster {cluster} in the swarm")
                continue
            experts.append(found[0])
            records.append(found[1])
            files[found[1].blob.sha256] = found[2]
        if not experts:
            raise EnsembleUnavailable(f"no acceptable expert checkpoint in swarm '{self.manifest.name}' yet "
                                      f"({len(self.rejected)} rejected): is anyone training?")
        router = self.router()
        if router is not None:
            records.append(router[1])
            files[router[1].blob.sha256] = router[2]
        return Ensemble(self.manifest, experts, router[0] if router else None, records, files,
                        rejected=list(self.rejected))
