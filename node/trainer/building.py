"""The trainer of a job: a `RouterTrainer` or an `ExpertTrainer` built from the swarm's model specs on
the job's data, and its own saved state loaded back where there is one."""

from __future__ import annotations

import logging
from pathlib import Path

from ddm_models.checkpoint import InvalidCheckpoint
from ddm_models.router_training import RouterTrainer
from ddm_models.text import build_text_encoder
from ddm_models.training import ExpertTrainer
from node.checkpoints.published import PublishedCheckpoints, UnreadableNodeFile
from node.checkpoints.specs import expert_config, router_config, training_options
from protocol.jobs import Job
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.node")


def build_trainer(manifest: SwarmManifest, job: Job, model: str, data, *, seed: int, device: str):
    """A fresh trainer of `job` with model `model` (an expert spec's name; the router's for the
    router) on `data` (`node.data`'s `SwarmData` or `ShardData`); expert k is seeded `seed + k`."""
    text = build_text_encoder(manifest.text_encoder)
    if job.is_router:
        train, clusters, heldout = data.router_data()
        return RouterTrainer(router_config(manifest), train, clusters, text, seed=seed, device=device,
                             heldout=heldout, **training_options(manifest.router))
    spec = manifest.expert_spec(model)
    train, heldout = data.expert_data(job.cluster)
    return ExpertTrainer(expert_config(spec, manifest), train, text, seed=seed + job.cluster, device=device,
                         cluster=job.cluster, heldout=heldout, **training_options(spec))


def load_own_state(trainer, state: Path, published: PublishedCheckpoints) -> bool:
    """Load the training state this node saved in `state` (its job's folder) into `trainer`; False when
    there is none. A state file that cannot be loaded is an `UnreadableNodeFile` saying what to do."""
    if not (state / "state.safetensors").exists():
        return False
    try:
        trainer.load_state(state)
    except InvalidCheckpoint as error:
        raise UnreadableNodeFile(
            f"{state / 'state.safetensors'} cannot be loaded ({error}). Move it away and restart: the node "
            f"then resumes from its last published checkpoint (step {published.step}) or the "
            "swarm's latest") from None
    return True
