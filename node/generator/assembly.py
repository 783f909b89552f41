"""Assembling the ensemble from the swarm: for every cluster the best acceptable expert, and the
router, fetched as verified blobs and loaded; or loaded back from a folder saved by `fetch`
(`node.generator.saved`). A generator fetches each record's inference export only (the EMA weights
in 16 bits), never the training state.

A candidate checkpoint is acceptable when its record passed the swarm's policy (signature, trusted
signer, allowed model spec), its bytes hash to the signed sha256, the file loads as the exact
architecture and objective the spec names, for the cluster and step the record claims, with finite
weights; with `verify`, its loss on the cluster's held-out data must also be close to the claim.
The rules, and the order candidates are tried in, are `node.checkpoints.acceptance`'s.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ddm_models.devices import inference_dtype, resolve_device
from ddm_models.router import Router
from ddm_models.sampling import EnsembleSampler, LoadedExpert, Routing, SampleResult
from ddm_models.text import TextEncoder, build_text_encoder
from node.checkpoints.acceptance import (Accepted, Record, Refused, Search, T, check_expert, check_router,
                                         find_acceptable, trusted_order)
from node.checkpoints.audits import read_evidence
from node.errors import NodeError
from protocol.jobs import Job
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, RouterRecord

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
    files: Dict[str, Path] = field(default_factory=dict)  # inference blob sha256 -> file
    text_encoder: Optional[TextEncoder] = None
    rejected: List[Tuple[str, str]] = field(default_factory=list)  # (blob sha256, why it was not used)
    codec: Optional[object] = None  # the swarm's VAE (`ddm_models.latents.LatentCodec`), loaded when first needed

    def sampler(self, routing: Optional[str] = None, *, device: str = "cpu", offload: bool = False) -> EnsembleSampler:
        """The sampler on `device` ("auto": CUDA when present): experts in bf16 on a GPU, float32 on
        the CPU; with `offload` they stay on the CPU and move onto the device as routing needs them."""
        target = resolve_device(device)
        for expert in self.experts:  # cast in place: a second float32 copy would double host memory
            expert.model.to(dtype=inference_dtype(target))
        chosen = Routing.parse(routing or self.manifest.sampling.routing)
        if self.text_encoder is None:
            self.text_encoder = build_text_encoder(self.manifest.text_encoder)
        router = self.router if len(self.experts) > 1 else None
        if len(self.experts) > 1 and router is None:
            raise EnsembleUnavailable("several experts but no router checkpoint in the swarm yet: wait for the "
                                      "router job, or generate from one cluster")
        if self.codec is None and self.manifest.vae is not None:  # a latent swarm: samples are decoded to RGB
            from ddm_models.latents import LatentCodec

            self.codec = LatentCodec.from_manifest_spec(self.manifest.vae)
        return EnsembleSampler(self.experts, router, chosen, text_encoder=self.text_encoder, device=target,
                               offload=offload, codec=self.codec)

    def sample(self, prompts: List[str], *, routing: Optional[str] = None, steps: Optional[int] = None,
               guidance: Optional[float] = None, seed: int = 0, device: str = "cpu", offload: bool = False,
               batch_size: Optional[int] = None) -> SampleResult:
        """Images (B, C, H, W) in [-1, 1] for `prompts`, with the swarm's sampling defaults, sampled on
        `device`, `batch_size` prompts at a time (default all; the images do not depend on it)."""
        defaults = self.manifest.sampling
        sampler = self.sampler(routing, device=device, offload=offload)
        return sampler.sample(list(prompts), num_steps=steps or defaults.steps,
                              guidance_scale=defaults.guidance if guidance is None else guidance, seed=seed,
                              batch_size=batch_size)

    def describe(self) -> List[dict]:
        rows = []
        for record in self.records:
            is_router = isinstance(record, RouterRecord)
            rows.append({"job": str(record.job), "model": record.model,
                         "objective": "router" if is_router else record.objective, "step": record.step,
                         "heldout": record.heldout_accuracy if is_router else record.heldout_loss,
                         "signer": record.signer[:12], "sha256": record.inference.sha256})
        return rows

    # --- offline copies (node.generator.saved) -------------------------------------------------------
    def save(self, out: Path) -> Path:
        """Write the ensemble to `out` in a diffusers-like layout, with its signed records, for offline use."""
        from node.generator.saved import save_ensemble

        return save_ensemble(self, Path(out))

    @classmethod
    def load(cls, folder: Path) -> "Ensemble":
        """An ensemble saved by `save`, checked again: signatures, file hashes, architectures."""
        from node.generator.saved import load_ensemble

        return load_ensemble(Path(folder))


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


class Assembler:
    """Picks and fetches the best acceptable checkpoint of every job through a node's `BlobService`
    (the acceptance rules are `node.checkpoints.acceptance`'s)."""

    def __init__(self, manifest: SwarmManifest, membership, blobs, *, verify: bool = False,
                 heldout: Optional[Callable[[int], object]] = None,
                 router_heldout: Optional[Callable[[], Tuple[object, object]]] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None, device: str = "cpu"):
        """`heldout(cluster)`: that cluster's held-out images; `router_heldout()`: (held-out images,
        their clusters); both used with `verify` only, measured on `device`."""
        self.manifest, self.membership, self.blobs = manifest, membership, blobs
        self.verify, self.heldout, self.progress = verify, heldout, progress
        self.router_heldout = router_heldout
        self.device = resolve_device(device)  # where `verify` measures held-out losses
        self.rejected: List[Tuple[str, str]] = []  # (sha256, reason)

    def _fetch(self, record: Record) -> Path:
        what = f"{record.KIND} {record.inference.sha256[:12]}"
        report = (lambda done, total: self.progress(what, done, total)) if self.progress else None
        return self.blobs.fetch(record.inference, progress=report)

    def _find(self, job: Job, check: Callable[[Path, Record], T]) -> Optional[Accepted[T]]:
        search = Search()
        accepted = find_acceptable(lambda: self.membership.job_checkpoints(job), fetch=self._fetch, check=check,
                                   membership=self.membership, store=self.blobs.store, manifest=self.manifest,
                                   search=search, blob="inference",
                                   # nothing accepted: read again after a pause (a trainer may have replaced
                                   # its record; a relayed provider may have its reservation back, or a
                                   # direct connection made by hole punching; a provider lookup may have
                                   # timed out)
                                   rounds=3, pause_s=5.0, retry_unprovided=True,
                                   order=lambda records: trusted_order(records, evidence=read_evidence(self.membership,
                                                                                                       records)))
        self.rejected += search.refused + search.unreachable
        return accepted

    def _check_expert(self, path: Path, record: CheckpointRecord) -> LoadedExpert:
        expert = check_expert(path, record, self.manifest, blob="inference")
        if self.verify:
            self._verify(expert, record)
        return expert

    def _verify(self, expert: LoadedExpert, record: CheckpointRecord) -> None:
        from ddm_models.evaluation import expert_loss

        data = self.heldout(record.cluster)
        encoder = build_text_encoder(self.manifest.text_encoder)
        expert.model.to(self.device)
        try:
            measured = expert_loss(expert, data, encoder)
        finally:
            expert.model.to("cpu")  # loaded experts wait on the host until a sampler places them
        factor, slack = VERIFY_TOLERANCE
        if measured > record.heldout_loss * factor + slack:
            raise Refused(f"held-out loss measured {measured:.4f}, it claims {record.heldout_loss:.4f}")

    def _check_router(self, path: Path, record: RouterRecord) -> Router:
        router = check_router(path, record, self.manifest, blob="inference")
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
            files[found.record.inference.sha256] = found.path
        if not experts:
            raise EnsembleUnavailable(f"no acceptable expert checkpoint in swarm '{self.manifest.name}' yet "
                                      f"({len(self.rejected)} rejected): is anyone training?")
        router = self.router()
        if router is not None:
            records.append(router.record)
            files[router.record.inference.sha256] = router.path
        return Ensemble(self.manifest, experts, router.value if router else None, records, files,
                        rejected=list(self.rejected))
