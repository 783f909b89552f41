"""DDPM -> flow-matching checkpoint conversion (Heterogeneous DDM's recipe).

A trained DDPM (epsilon) expert's trunk already knows images: keep its stem, patch and position
embeddings, timestep MLP, AdaLN-Single and transformer blocks; re-initialise the output layer (it
predicted epsilon, FM predicts v = eps - x0) and the text projection; the FM expert is fed
timestep 999 t (the DDPM expert saw tau in 0..999), so its time embedding stays meaningful.
Training the result with the FM objective converges faster than from scratch
(benchmarks/conversion.py measures by how much).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddm_models.checkpoint import (CheckpointMetadata, InvalidCheckpoint, check_state_matches, checkpoint_tensors,
                                   read_checkpoint, state_dict_part, write_checkpoint)
from ddm_models.configs import ExpertConfig
from ddm_models.experts import Expert, build_expert

# Parameters re-initialised by the conversion (prefixes of state-dict names).
REINITIALISED = ("proj_out.", "head.", "caption_projection.", "pooled_projection.", "null_token", "null_pooled",
                 "scale_shift_table")


def convert_ddpm_expert(model: Expert, *, seed: int = 0) -> Expert:
    """A new FM expert with `model`'s trunk and freshly initialised output layer, final modulation
    and text projection (seeded by `seed`). `model` must be a DDPM expert; it is left unchanged."""
    if model.config.objective != "ddpm":
        raise ValueError(f"conversion starts from a DDPM expert, this one is {model.config.objective!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        converted = build_expert(model.config.replace(objective="fm"))
    fresh = converted.state_dict()
    kept = {name: value for name, value in model.state_dict().items() if not name.startswith(REINITIALISED)}
    converted.load_state_dict({**fresh, **kept})
    return converted.to(next(model.parameters()).device)


def convert_ddpm_checkpoint(source: str | Path | bytes, destination: str | Path, *, seed: int = 0) -> Path:
    """Write an FM expert checkpoint (step 0, no optimizer state, same cluster) converted from the
    EMA weights of the DDPM expert checkpoint at `source`."""
    metadata, tensors = read_checkpoint(source)
    if metadata.kind != "expert" or metadata.objective != "ddpm":
        raise InvalidCheckpoint(f"conversion needs a DDPM expert checkpoint, got a {metadata.objective} {metadata.kind}")
    ddpm = build_expert(metadata.config)
    ema = state_dict_part(tensors, "ema")
    check_state_matches(ddpm, ema, str(source) if not isinstance(source, bytes) else "checkpoint")
    ddpm.load_state_dict(ema)
    converted = convert_ddpm_expert(ddpm, seed=seed)
    fm_config: ExpertConfig = converted.config
    out = CheckpointMetadata(kind="expert", config=fm_config, cluster=metadata.cluster, step=0, samples_seen=0,
                             extra={"converted_from": metadata.config_hash, "source_step": metadata.step,
                                    "source_samples_seen": metadata.samples_seen})
    return write_checkpoint(destination, out, checkpoint_tensors(converted.state_dict(), converted.state_dict()))
