"""Assembling the ensemble from the swarm: for every cluster the best acceptable expert, and the
router, fetched as verified blobs and loaded; or loaded back from a folder saved by `fetch`.

A candidate checkpoint is acceptable when its record passed the swarm's policy (signature, trusted
signer, allowed model spec), its bytes hash to the signed sha256, the file loads as the exact
architecture and objective the spec names, for the cluster and step the record claims, with finite
weights; with `verify`, its loss on the cluster's held-out data must also be close to the claim.
The rules, and the order candidates are tried in, are `node.checkpoints.acceptance`'s.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ddm_models.router import Router
from ddm_models.sampling import EnsembleSampler, LoadedExpert, Routing, SampleResult
from ddm_models.text import TextEncoder, build_text_encoder
from node.checkpoints.acceptance import (Accepted, Record, Refused, Search, T, check_expert, check_router,
                                         find_acceptable)
from node.checkpoints.audits import read_evidence
from node.errors import NodeError
from node.files import atomic_write_bytes
from node.swarm.manifest_files import read_manifest_file, write_manifest_file
from protocol.errors import HashMismatch
from protocol.hashing import BlobHasher
from protocol.jobs import Job
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord, decode_record

logger = logging.getLogger("ddm_swarm.assembly")
# A checkpoint is "much worse than it claims" past this factor (plus a small absolute slack, since
# the claim was measured with other noise draws).
VERIFY_TOLERANCE = (1.5, 0.02)


class EnsembleUnavailable(NodeError):
    """No acceptable expert could be assembled from the swarm."""


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
        chosen = Routing.parse(routing or self.manifest.sampling.routing)
        if self.text_encoder is None:
            self.text_encoder = build_text_encoder(self.manifest.text_encoder)
        router = self.router if len(self.experts) > 1 else None
        if len(self.experts) > 1 and router is None:
            raise EnsembleUnavailable("several experts but no router checkpoint in the swarm yet: wait for the "
                                      "router job, or generate from one cluster")
        return EnsembleSampler(self.experts, router, chosen, text_encoder=self.text_encoder)

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
            rows.append({"job": str(record.job), "model": record.model,
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
            name = f"{record.job.slug}-{record.blob.sha256[:12]}.safetensors"
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
    """Picks and fetches the best acceptable checkpoint of every job through a node's `BlobService`
    (the acceptance rules are `node.checkpoints.acceptance`'s)."""

    def __init__(self, manifest: SwarmManifest, membership, blobs, *, verify: bool = False,
                 heldout: Optional[Callable[[int], object]] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None):
        self.manifest, self.membership, self.blobs = manifest, membership, blobs
        self.verify, self.heldout, self.progress = verify, heldout, progress
        self.rejected: List[Tuple[str, str]] = []  # (sha256, reason)

    def _fetch(self, record: Record) -> Path:
        what = f"{record.KIND} {record.blob.sha256[:12]}"
        report = (lambda done, total: self.progress(what, done, total)) if self.progress else None
        return self.blobs.fetch(record.blob, progress=report)

    def _find(self, job: Job, check: Callable[[Path, Record], T]) -> Optional[Accepted[T]]:
        search = Search()
        accepted = find_acceptable(lambda: self.membership.job_checkpoints(job), fetch=self._fetch, check=check,
                                   membership=self.membership, store=self.blobs.store, manifest=self.manifest,
                                   search=search, evidence=lambda records: read_evidence(self.membership, records))
        self.rejected += search.refused + search.unreachable
        return accepted

    def _check_expert(self, path: Path, record: CheckpointRecord) -> LoadedExpert:
        expert = check_expert(path, record, self.manifest)
        if self.verify:
            self._verify(expert, record)
        return expert

    def _verify(self, expert: LoadedExpert, record: CheckpointRecord) -> None:
        from ddm_models.evaluation import expert_loss

        data = self.heldout(record.cluster)
        encoder = build_text_encoder(self.manifest.text_encoder)
        measured = expert_loss(expert, data, encoder)
        factor, slack = VERIFY_TOLERANCE
        if measured > record.heldout_loss * factor + slack:
            raise Refused(f"held-out loss measured {measured:.4f}, it claims {record.heldout_loss:.4f}")

    def expert(self, cluster: int) -> Optional[Accepted[LoadedExpert]]:
        return self._find(Job.expert(cluster), self._check_expert)

    def router(self) -> Optional[Accepted[Router]]:
        return self._find(Job.router(), lambda path, record: check_router(path, record, self.manifest))

    def assemble(self, *, require_all: bool = False) -> Ensemble:
        experts, records, files = [], [], {}
        for cluster in range(self.manifest.num_clusters):
            found = self.expert(cluster)
            if found is None:
                if require_all:
                    raise EnsembleUnavailable(f"no acceptable checkpoint for cluster {cluster} in the swarm")
                continue
            experts.append(found.value)
            records.append(found.record)
            files[found.record.blob.sha256] = found.path
        if not experts:
            raise EnsembleUnavailable(f"no acceptable expert checkpoint in swarm '{self.manifest.name}' yet "
                                      f"({len(self.rejected)} rejected): is anyone training?")
        router = self.router()
        if router is not None:
            records.append(router.record)
            files[router.record.blob.sha256] = router.path
        return Ensemble(self.manifest, experts, router.value if router else None, records, files,
                        rejected=list(self.rejected))
