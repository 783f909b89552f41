"""Real expert checkpoint files without training: the right architecture of a manifest's model
(random initial weights), or a poisoned one (another architecture, NaN weights), as a peer that
lies would publish them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from safetensors import safe_open

from ddm_models.checkpoint import (CheckpointMetadata, checkpoint_tensors, state_dict_part, write_checkpoint)
from ddm_models.experts import build_expert
from node.checkpoints.specs import expert_config
from protocol.manifest import SwarmManifest

POISONS = ("none", "wrong-architecture", "nan")


def write_expert_checkpoint(manifest: SwarmManifest, model: str, cluster: int, step: int, path: Path, *,
                            poison: str = "none", seed: int = 0) -> Path:
    """An expert checkpoint of `model` for `cluster` at `step` (EMA and training weights, no optimizer
    state). `poison`: "wrong-architecture" holds a narrower model than the spec names; "nan" has a
    NaN in its weights (metadata and shapes are right)."""
    config = expert_config(manifest.expert_spec(model), manifest)
    if poison == "wrong-architecture":
        config = dataclasses.replace(config, width=config.width // 2)
    torch.manual_seed(seed)
    state = build_expert(config).state_dict()
    if poison == "nan":
        first = next(name for name, value in state.items() if value.is_floating_point())
        state[first] = state[first].clone()
        state[first].view(-1)[0] = float("nan")
    metadata = CheckpointMetadata(kind="expert", config=config, cluster=cluster, step=step, samples_seen=32 * step,
                                  heldout_metric=0.01)
    return write_checkpoint(path, metadata, checkpoint_tensors(state, state))


def write_export_as_is(state: Path, path: Path) -> Path:
    """The inference export of the checkpoint file `state` as a lying peer would write it: its EMA
    weights in bfloat16 and its header marked "inference", with no check of what it holds (so a
    poisoned state gives an equally poisoned export)."""
    with safe_open(str(state), framework="pt") as handle:
        metadata = CheckpointMetadata.from_header(handle.metadata(), str(state))
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    weights = {name: value.to(torch.bfloat16) for name, value in state_dict_part(tensors, "ema").items()}
    return write_checkpoint(path, dataclasses.replace(metadata, contents="inference", optimizer_step=None), weights)
