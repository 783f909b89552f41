"""DDPM -> flow-matching checkpoint conversion (Heterogeneous DDM's recipe).

A trained DDPM (epsilon) expert's trunk already knows images: keep its stem, patch and position
embeddings, timestep MLP, AdaLN-Single and transformer blocks; re-initialise the output layer (it
predicted epsilon, FM predicts v = eps - x0) and the text projection; the FM expert is fed
timestep 999 t (the DDPM expert saw tau in 0..999), so its time embedding stays meaningful.
Training the result with the FM objective converges faster than from scratch
(benchmarks/conversion.py measures by how much).

The result is an expert of a *given* FM config, normally the swarm's FM spec (its name, objective
and config hash), so that it is an acceptable starting checkpoint of that spec; the two configs
must agree on every field that shapes the weights (`TRUNK_INDEPENDENT` lists the ones that do not).
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
# Config fields that change no weight shape: a DDPM expert converts to an FM config differing in these.
TRUNK_INDEPENDENT = ("name", "objective", "ddpm_schedule", "caption_dropout")


def check_convertible(source: ExpertConfig, target: ExpertConfig) -> None:
    """Raise `InvalidCheckpoint` unless `target` is an FM config with `source`'s trunk."""
    if target.objective != "fm":
        raise InvalidCheckpoint(f"conversion produces a flow-matching expert; the target {target.name!r} is "
                                f"{target.objective!r}")
    differing = sorted(field for field, value in source.to_dict().items()
                       if field not in TRUNK_INDEPENDENT and target.to_dict()[field] != value)
    if differing:
        raise InvalidCheckpoint(f"the DDPM expert {source.name!r} cannot initialise {target.name!r}: they differ in "
                                + ", ".join(f"{f} ({getattr(source, f)!r} vs {getattr(target, f)!r})" for f in differing))


def convert_ddpm_expert(model: Expert, *, seed: int = 0, target: ExpertConfig | None = None) -> Expert:
    """A new FM expert of config `target` (default: `model`'s config with objective "fm") with
    `model`'s trunk and freshly initialised output layer, final modulation and text projection
    (seeded by `seed`). `model` must be a DDPM expert; it is left unchanged."""
    if model.config.objective != "ddpm":
        raise ValueError(f"conversion starts from a DDPM expert, this one is {model.config.objective!r}")
    target = target if target is not None else model.config.replace(objective="fm")
    check_convertible(model.config, target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        converted = build_expert(target)
    fresh = converted.state_dict()
    kept = {name: value for name, value in model.state_dict().items() if not name.startswith(REINITIALISED)}
    converted.load_state_dict({**fresh, **kept})
    return converted.to(next(model.parameters()).device)


def convert_ddpm_checkpoint(source: str | Path | bytes, destination: str | Path, *, target: ExpertConfig | None = None,
                            seed: int = 0) -> Path:
    """Write an FM expert checkpoint of config `target` (the swarm's FM spec; default: the source's
    config with objective "fm") at step 0, no optimizer state, same cluster, converted from the EMA
    weights of the DDPM expert checkpoint at `source`."""
    metadata, tensors = read_checkpoint(source)
    if metadata.kind != "expert" or metadata.objective != "ddpm":
        raise InvalidCheckpoint(f"conversion needs a DDPM expert checkpoint, got a {metadata.objective} {metadata.kind}")
    if target is not None:
        check_convertible(metadata.config, target)  # before building a possibly huge model
    ddpm = build_expert(metadata.config)
    ema = state_dict_part(tensors, "ema")
    check_state_matches(ddpm, ema, str(source) if not isinstance(source, bytes) else "checkpoint")
    ddpm.load_state_dict(ema)
    converted = convert_ddpm_expert(ddpm, seed=seed, target=target)
    fm_config: ExpertConfig = converted.config
    out = CheckpointMetadata(kind="expert", config=fm_config, cluster=metadata.cluster, step=0, samples_seen=0,
                             extra={"converted_from": metadata.config_hash, "source_model": metadata.config.name,
                                    "source_step": metadata.step,
                                    "source_samples_seen": metadata.samples_seen})
    return write_checkpoint(destination, out, checkpoint_tensors(converted.state_dict(), converted.state_dict()))
