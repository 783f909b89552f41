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
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ddm_models.router import Router
from ddm_models.sampling import EnsembleSampler, LoadedExpert, Routing, SampleResult
from ddm_models.text import TextEncoder, build_text_encoder
from node.checkpoints.acceptance import (Accepted, Record, Refused, Search, T, check_expert, check_router,
                                         find_acceptable)
from node.errors import NodeError
from node.files import atomic_write_bytes
from node.swarm.manifest_files import read_manifest_file, write_manifest_file
from protocol.errors import HashMismatch
from protocol.hashing import BlobHasher
from protocol.jobs import Job
from protocol.manifest import SwarmManifest
from protocol.policy import RecordPolicy
from protocol.records import CheckpointRecord, RouterRecord, decode_record

logger = logging.getLogger("ddm_swarm.assembly")
# A checkpoint is "much worse than it claims" past this factor (plus a small absolute slack, since
# the claim was measured with other noise draws).
VERIFY_TOLERANCE = (1.5, 0.02)
# A router is "much worse than it claims" when its measured accuracy falls below claim / factor - slack.
ROUTER_VERIFY_TOLERANCE = (1.5, 0.02)


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
        """An ensemble saved by `save`, checked again as if it came from the swarm: each record passes
        the swarm's record policy but for expiry (`RecordPolicy.check_saved`: this swarm, a trusted
        signer, an allowed model), each file is a regular file directly inside `folder` and hashes to
        its record, each checkpoint is the architecture its record names. The folder may come from
        anyone: a name with a path in it, a symlink or a FIFO is refused before it is opened."""
        folder = Path(folder)
        try:
            index = json.loads(_read_regular(folder, "ensemble.json"))
            manifest_path = _regular_file(folder, "manifest.yaml")
            manifest = read_manifest_file(manifest_path)
        except (OSError, ValueError) as error:
            raise NodeError(f"{folder} is not an ensemble saved by `ddm-swarm fetch`: {error}") from None
        if not isinstance(index, dict) or index.get("swarm_id") != manifest.swarm_id:
            raise NodeError(f"{folder}/ensemble.json belongs to another swarm than its manifest.yaml")
        entries = index.get("checkpoints")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise NodeError(f"{folder}/ensemble.json has no list of checkpoints")
        policy = RecordPolicy(manifest)
        experts, router, records, files = [], None, [], {}
        for entry in entries:
            record = decode_record(_hex(entry.get("record"), folder))
            policy.check_saved(record)
            path = _regular_file(folder, entry.get("file"))
            _check_file_hash(path, record.blob.sha256)
            if isinstance(record, RouterRecord):
                router = check_router(path, record, manifest)
            else:
                experts.append(check_expert(path, record, manifest))
            records.append(record)
            files[record.blob.sha256] = path
        return cls(manifest, experts, router, records, files)


def verify_router(router: Router, claimed: float, heldout, encoder: TextEncoder, *, max_images: int = 512) -> float:
    """The router's measured held-out accuracy (see `router_accuracy`); `Refused` if it is much below
    `claimed` (ROUTER_VERIFY_TOLERANCE). `heldout`: (images, clusters (N,) int64)."""
    from ddm_models.evaluation import router_accuracy

    data, clusters = heldout
    measured = router_accuracy(router, data, clusters, encoder, max_images=max_images)
    factor, slack = ROUTER_VERIFY_TOLERANCE
    if measured < claimed / factor - slack:
        raise Refused(f"held-out accuracy measured {measured:.3f}, it claims {claimed:.3f}")
    return measured


def _hex(text, folder: Path) -> bytes:
    try:
        return bytes.fromhex(text)
    except (TypeError, ValueError):
        raise NodeError(f"{folder}/ensemble.json holds a record that is not hex") from None


def _regular_file(folder: Path, name) -> Path:
    """`folder/name` if `name` is a plain file name and that is a regular file (not a symlink, FIFO
    or device; checked with lstat, so a link is never followed); `NodeError` otherwise."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name:
        raise NodeError(f"{folder}: a saved checkpoint must be named by a file inside the folder, got {name!r:.80}")
    path = folder / name
    try:
        mode = os.lstat(path).st_mode
    except OSError as error:
        raise NodeError(f"cannot read {path}: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        raise NodeError(f"{path} is not a regular file (a symlink, FIFO or device is never read from a saved "
                        "ensemble)")
    return path


def _open_regular(path: Path) -> int:
    # O_NOFOLLOW and O_NONBLOCK: a file swapped for a link or a FIFO after the lstat is neither
    # followed nor waited on; fstat then checks what was opened
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise NodeError(f"{path} is not a regular file")
    return descriptor


def _read_regular(folder: Path, name: str) -> str:
    with os.fdopen(_open_regular(_regular_file(folder, name)), "rb") as handle:
        return handle.read(16 * 1024 * 1024).decode()


def _check_file_hash(path: Path, sha256: str) -> None:
    hasher = BlobHasher()
    with os.fdopen(_open_regular(path), "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 22), b""):
            hasher.update(piece)
    if hasher.finish().sha256 != sha256:
        raise HashMismatch(f"{path} does not hash to the sha256 its signed record names; re-fetch the ensemble")


class Assembler:
    """Picks and fetches the best acceptable checkpoint of every job through a node's `BlobService`
    (the acceptance rules are `node.checkpoints.acceptance`'s)."""

    def __init__(self, manifest: SwarmManifest, membership, blobs, *, verify: bool = False,
                 heldout: Optional[Callable[[int], object]] = None,
                 router_heldout: Optional[Callable[[], Tuple[object, object]]] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None):
        """`heldout(cluster)`: that cluster's held-out images; `router_heldout()`: (held-out images,
        their clusters); both used with `verify` only."""
        self.manifest, self.membership, self.blobs = manifest, membership, blobs
        self.verify, self.heldout, self.progress = verify, heldout, progress
        self.router_heldout = router_heldout
        self.rejected: List[Tuple[str, str]] = []  # (sha256, reason)

    def _fetch(self, record: Record) -> Path:
        what = f"{record.KIND} {record.blob.sha256[:12]}"
        report = (lambda done, total: self.progress(what, done, total)) if self.progress else None
        return self.blobs.fetch(record.blob, progress=report)

    def _find(self, job: Job, check: Callable[[Path, Record], T]) -> Optional[Accepted[T]]:
        search = Search()
        accepted = find_acceptable(lambda: self.membership.job_checkpoints(job), fetch=self._fetch, check=check,
                                   membership=self.membership, store=self.blobs.store, manifest=self.manifest,
                                   search=search)
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

    def _check_router(self, path: Path, record: RouterRecord) -> Router:
        router = check_router(path, record, self.manifest)
        if self.verify and self.router_heldout is not None:
            verify_router(router, record.heldout_accuracy, self.router_heldout(),
                          build_text_encoder(self.manifest.text_encoder))
        return router

    def expert(self, cluster: int) -> Optional[Accepted[LoadedExpert]]:
        return self._find(Job.expert(cluster), self._check_expert)

    def router(self) -> Optional[Accepted[Router]]:
        return self._find(Job.router(), self._check_router)

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
