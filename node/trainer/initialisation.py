"""Pretrained initialisation of a node's expert (`ddm-swarm node --init-from SOURCE`).

A node that claims an expert job and has nothing to resume (no state of its own, no newer checkpoint
of the job's model in the swarm) starts its expert from a pretrained source instead of random weights:

  * a DDPM expert checkpoint file of the cluster it trains (a node's `state.safetensors`, or a
    record's state blob), converted into the job's FM spec (`ddm_models.conversion`, the
    Heterogeneous DDM recipe). The checkpoint's cluster pins the node's job;
  * `swarm`: the best acceptable DDPM checkpoint record of the claimed cluster, found by the one
    candidate search every peer uses (`node.checkpoints.acceptance.find_acceptable`), fetched as a
    blob, checked against its record, then converted the same way;
  * a facebookresearch DiT `.pt` file (`ddm_models.pretrained_dit`, read with weights_only=True).

The result is a step-0 checkpoint of the job's spec *in this swarm* (the config hash the swarm's
records name, for the claimed cluster); the trainer continues from it as from any checkpoint, so the
node's first published checkpoint is an ordinary, acceptable one of that spec. Resuming always wins:
what this node or the swarm trained already is never replaced by a pretrained start (the log says so).

A source is read and checked once, when the command starts (`read_init_source`): a file that is not
a checkpoint, of another architecture, or a DDPM of another cluster than --job, is refused with
`InvalidInitSource` before the node joins. Only the sources' headers and shapes are read then.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import FrozenSet, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from ddm_models.checkpoint import CheckpointMetadata, InvalidCheckpoint
from ddm_models.configs import ExpertConfig
from ddm_models.conversion import check_convertible, convert_ddpm_checkpoint
from ddm_models.experts import build_expert
from ddm_models.pretrained_dit import (check_dit_fits, check_dit_position_embedding, dit_checkpoint_to_expert,
                                       read_dit_state_dict)
from node.checkpoints.acceptance import Search, check_header, find_acceptable
from node.checkpoints.specs import expert_config
from node.errors import NodeError
from protocol.jobs import Job
from protocol.manifest import ModelSpec, SwarmManifest

logger = logging.getLogger("ddm_swarm.node")
SWARM = "swarm"  # the --init-from word for "the swarm's best DDPM checkpoint of my cluster"
SEARCH_ROUNDS = 3  # reads of the cluster's records when every DDPM candidate was unreachable


class InvalidInitSource(NodeError):
    """--init-from names something that cannot initialise the expert this node would train."""


class InitKind(str, Enum):
    DDPM_FILE = "DDPM checkpoint"
    DIT_FILE = "DiT checkpoint"
    SWARM = "swarm's DDPM checkpoint"


@dataclass(frozen=True)
class InitSource:
    """A checked --init-from: what it is, the file (None for `swarm`), the jobs it can initialise."""

    kind: InitKind
    path: Optional[Path]
    jobs: FrozenSet[Job]
    cluster: Optional[int] = None  # a DDPM file's cluster

    @property
    def pinned_job(self) -> Optional[Job]:
        """The job a DDPM file is for: a checkpoint of one cluster initialises that cluster's expert."""
        return Job.expert(self.cluster) if self.cluster is not None else None

    def __str__(self) -> str:
        return f"{self.kind.value} {self.path}" if self.path else self.kind.value


@dataclass(frozen=True)
class Initialised:
    """How a trainer was initialised: for the log and status, and the blob it came from (the
    lineage of the node's first record, None for a local file)."""

    description: str
    parent_blob: Optional[str] = None


def _expert_targets(manifest: SwarmManifest, job: Optional[Job], model: Optional[str]
                    ) -> List[Tuple[Job, ModelSpec, ExpertConfig]]:
    """(job, spec, config) of every expert job this node may claim (only --job's when given)."""
    if job is not None and job.is_router:
        raise InvalidInitSource("--init-from initialises an expert; --job router trains the router")
    jobs = [job] if job is not None else [j for j in manifest.jobs if not j.is_router]
    targets = []
    for candidate in jobs:
        spec = manifest.model_for(candidate, model)
        targets.append((candidate, spec, expert_config(spec, manifest)))
    return targets


def _convertible(source: ExpertConfig, target: ExpertConfig) -> Optional[str]:
    """None if a DDPM expert of config `source` converts into `target`, else why not."""
    try:
        check_convertible(source, target)
    except InvalidCheckpoint as error:
        return str(error)
    return None


def _ddpm_specs_into(manifest: SwarmManifest, target: ExpertConfig) -> List[ModelSpec]:
    """The swarm's DDPM expert specs whose checkpoints convert into `target`."""
    return [spec for spec in manifest.experts if spec.objective == "ddpm"
            and _convertible(expert_config(spec, manifest), target) is None]


def read_init_source(text: str, manifest: SwarmManifest, job: Optional[Job] = None,
                     model: Optional[str] = None) -> InitSource:
    """Check --init-from `text` (a file path or `swarm`) against the jobs this node may train (--job,
    --model); `InvalidInitSource` saying what is wrong and how to fix it."""
    if text == SWARM:
        return _swarm_source(manifest, job, model)
    path = Path(text)
    if not path.is_file():
        raise InvalidInitSource(f"--init-from {text!r:.200}: no such file (give a DDPM expert checkpoint "
                                f"(.safetensors), a facebookresearch DiT .pt file, or '{SWARM}')")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata()
    except (SafetensorError, OSError, ValueError):
        header = None  # not safetensors: a DiT .pt file, or nothing we can read
    if header is not None:
        return _ddpm_file(path, header, manifest, job, model)
    return _dit_file(path, manifest, job, model)


def _swarm_source(manifest: SwarmManifest, job: Optional[Job], model: Optional[str]) -> InitSource:
    targets = _expert_targets(manifest, job, model)
    jobs = frozenset(j for j, _, config in targets if config.objective == "fm" and _ddpm_specs_into(manifest, config))
    if not jobs:
        models = sorted({spec.name for _, spec, _ in targets})
        raise InvalidInitSource(f"--init-from {SWARM}: no DDPM model of swarm '{manifest.name}' converts into "
                                f"the flow-matching model(s) this node would train ({', '.join(models)}); "
                                "the trunks must match (width, depth, heads, patch, text widths)")
    return InitSource(InitKind.SWARM, None, jobs)


def _ddpm_file(path: Path, header, manifest: SwarmManifest, job: Optional[Job], model: Optional[str]) -> InitSource:
    where = f"--init-from {path}"
    try:
        metadata = CheckpointMetadata.from_header(header, where)
    except InvalidCheckpoint as error:
        raise InvalidInitSource(f"{error}: not a ddm-swarm checkpoint") from None
    if metadata.kind != "expert" or metadata.objective != "ddpm":
        raise InvalidInitSource(f"{where} is a {metadata.objective} {metadata.kind} checkpoint; a checkpoint "
                                "initialises an expert only when it is a DDPM expert (converted into flow matching)")
    if metadata.contents != "training":
        raise InvalidInitSource(f"{where} is an inference export (16-bit EMA weights); give the training state "
                                "file (a node's state.safetensors or a record's state blob)")
    if metadata.cluster >= manifest.num_clusters:
        raise InvalidInitSource(f"{where} is a checkpoint of cluster {metadata.cluster}; swarm '{manifest.name}' "
                                f"has clusters 0..{manifest.num_clusters - 1}")
    pinned = Job.expert(metadata.cluster)
    if job is not None and job != pinned:
        raise InvalidInitSource(f"{where} is a DDPM checkpoint of cluster {metadata.cluster}, --job is {job}: "
                                f"an expert starts from a checkpoint of its own cluster")
    [(_, spec, target)] = _expert_targets(manifest, pinned, model)
    if target.objective != "fm":
        fm = [s.name for s in manifest.experts if s.objective == "fm"]
        raise InvalidInitSource(f"{where}: {pinned} trains the {target.objective} model '{spec.name}' in swarm "
                                f"'{manifest.name}'; a DDPM checkpoint initialises a flow-matching expert "
                                f"(pass --model with one of {fm})")
    why_not = _convertible(metadata.config, target)
    if why_not:
        raise InvalidInitSource(f"{where}: {why_not}")
    _check_ema_shapes(path, metadata.config, where)
    return InitSource(InitKind.DDPM_FILE, path, frozenset({pinned}), cluster=metadata.cluster)


def _check_ema_shapes(path: Path, config: ExpertConfig, where: str) -> None:
    """The file's EMA tensors must have the names and shapes its header's config builds (read from
    the safetensors header: no weight is loaded; their values are checked when they are converted)."""
    with torch.device("meta"):  # shapes only
        expected = {f"ema/{name}": tuple(t.shape) for name, t in build_expert(config).state_dict().items()}
    with safe_open(str(path), framework="pt") as handle:
        found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys() if name.startswith("ema/")}
    wrong = sorted(name for name in expected.keys() | found.keys() if expected.get(name) != found.get(name))
    if wrong:
        raise InvalidInitSource(f"{where}: its tensors do not fit the architecture its header names "
                                f"({', '.join(wrong[:3])}{' …' if len(wrong) > 3 else ''})")


def _is_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (a pickle, protocol 2, before PyTorch 1.6)."""
    with open(path, "rb") as file:
        return zipfile.is_zipfile(file) or file.seek(0) == 0 and file.read(1) == b"\x80"


def _dit_file(path: Path, manifest: SwarmManifest, job: Optional[Job], model: Optional[str]) -> InitSource:
    where = f"--init-from {path}"
    neither = f"{where} is neither a ddm-swarm checkpoint (safetensors) nor a facebookresearch DiT .pt file"
    if not _is_torch_file(path):
        raise InvalidInitSource(f"{neither}: it is not a file torch.save wrote")
    try:
        state = read_dit_state_dict(path)
    except InvalidCheckpoint as error:
        raise InvalidInitSource(f"{neither}: {error}") from None
    jobs, refusals = set(), {}
    for candidate, spec, target in _expert_targets(manifest, job, model):
        try:
            check_dit_fits(state, target, where)
            check_dit_position_embedding(state, target, where)
            jobs.add(candidate)
        except InvalidCheckpoint as error:
            refusals.setdefault(spec.name, str(error))
    if not jobs:
        raise InvalidInitSource("; ".join(refusals.values()))
    for name, reason in refusals.items():  # a heterogeneous swarm: the other models start from scratch
        logger.warning(f"{reason}: its jobs start from scratch if this node claims one")
    return InitSource(InitKind.DIT_FILE, path, frozenset(jobs))


class PretrainedStart:
    """Initialises a freshly built expert trainer from a checked `InitSource` (one per node).

    `membership`, `blobs`, `store` and `announcer` are the node's (the `swarm` source searches and
    fetches through them, and provides the DDPM blob it fetched, as a resumed checkpoint is)."""

    def __init__(self, source: InitSource, manifest: SwarmManifest, membership, blobs, store, announcer):
        self.source, self.manifest = source, manifest
        self.membership, self.blobs, self.store, self.announcer = membership, blobs, store, announcer

    def start(self, job: Job, model: str, trainer, work_dir: Path, *, seed: int,
              resumed: Optional[str]) -> Optional[Initialised]:
        """Initialise `trainer` (job `job`, model `model`, step 0) unless it `resumed` (a description
        of what it resumed from) or the source cannot initialise this job; what was done, or None."""
        if resumed is not None:
            logger.info(f"--init-from {self.source} ignored: {job} resumed from {resumed}")
            return None
        if job not in self.source.jobs:
            logger.info(f"--init-from {self.source} does not apply to {job} (model '{model}'): it starts from scratch")
            return None
        target = trainer.config
        work_dir.mkdir(parents=True, exist_ok=True)
        converted = work_dir / "initialisation.safetensors"  # removed once loaded; rewritten on a restart
        try:
            if self.source.kind is InitKind.SWARM:
                found = self._from_swarm(job, target, converted, seed)
                if found is None:
                    return None
            elif self.source.kind is InitKind.DDPM_FILE:
                convert_ddpm_checkpoint(self.source.path, converted, target=target, seed=seed)
                found = Initialised(f"DDPM checkpoint {self.source.path}")
            else:
                dit_checkpoint_to_expert(self.source.path, converted, target, cluster=job.cluster, seed=seed)
                found = Initialised(f"DiT checkpoint {self.source.path}")
            trainer.init_from_checkpoint(converted)  # refuses any config hash but the swarm's spec's
        except InvalidCheckpoint as error:  # the file changed since the start-up check
            raise InvalidInitSource(f"--init-from {self.source}: {error}") from None
        finally:
            converted.unlink(missing_ok=True)
        logger.info(f"initialised {job} (model '{model}') from {found.description}")
        return found

    def _from_swarm(self, job: Job, target: ExpertConfig, converted: Path, seed: int) -> Optional[Initialised]:
        """Convert the best acceptable DDPM checkpoint of `job`'s cluster in the swarm into `converted`."""
        ddpm_hashes = {spec.spec_hash for spec in _ddpm_specs_into(self.manifest, target)}

        def ddpm_records() -> list:
            return [r for r in self.membership.job_checkpoints(job) if r.spec_hash in ddpm_hashes]

        def convert(path: Path, record) -> Path:
            check_header(path, record, self.manifest)  # what its record says: job, model, step
            return convert_ddpm_checkpoint(path, converted, target=target, seed=seed)

        search = Search()
        accepted = find_acceptable(ddpm_records, fetch=lambda record: self.blobs.fetch(record.blob), check=convert,
                                   membership=self.membership, store=self.store, manifest=self.manifest,
                                   rounds=SEARCH_ROUNDS, search=search)
        for sha, reason in search.refused:
            logger.warning(f"cannot initialise from {sha[:12]}: {reason}")
        if accepted is None:
            logger.warning(f"--init-from {SWARM}: no acceptable DDPM checkpoint of {job} in the swarm; "
                           "it starts from scratch")
            return None
        record = accepted.record
        self.announcer.provide(record.blob)  # we hold it now, and our first record names it as parent
        return Initialised(f"the swarm's DDPM checkpoint of model '{record.model}' at step {record.step} "
                           f"(signer {record.signer[:12]}…)", parent_blob=record.blob.sha256)
