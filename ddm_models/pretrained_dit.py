"""Initialise an expert from a facebookresearch DiT checkpoint (e.g. DiT-XL-2-256x256.pt).

The file is read with `torch.load(weights_only=True)`: tensors and plain containers only, so a
file carrying pickled objects (code) is refused, never run. DiT is class-conditional with
AdaLN-Zero; our experts are text-conditional with AdaLN-Single, so the mapping is:

    DiT                                      expert
    x_embedder.proj                          pos_embed.proj                       (kept)
    pos_embed (fixed sin-cos)                pos_embed's own sin-cos buffer       (checked equal)
    t_embedder.mlp.0 / .2                    adaln_single.emb.timestep_embedder.linear_1 / _2
    blocks.i.attn.qkv (rows q | k | v)       transformer_blocks.i.attn1.to_q / to_k / to_v
    blocks.i.attn.proj                       transformer_blocks.i.attn1.to_out.0
    blocks.i.mlp.fc1 / fc2                   transformer_blocks.i.ff.net.0.proj / ff.net.2
    blocks.i.adaLN_modulation.1 (W_i, b_i)   adaln_single.linear = (W_0, b_0) and
                                             transformer_blocks.i.scale_shift_table = W_i c* + b_i - (W_0 c* + b_0)
    y_embedder (class labels)                dropped: text comes through fresh cross-attention
    final_layer                              re-initialised for "fm"; for "ddpm" its linear is kept,
                                             cut from 8 learned-sigma channels to the 4 epsilon ones

AdaLN-Single shares one modulation MLP across blocks where DiT has one per block; as PixArt-alpha
re-parameterises, block 0's MLP becomes the shared one and every block's difference from it,
evaluated at c* = SiLU(t_embed(500) + null-class embedding), becomes that block's learned offset,
so each block starts with DiT's modulation at mid-range times. Cross-attention, caption projection
and the null prompt start fresh (cross-attention outputs zero, so the trunk first acts as DiT did).
The result is written as a step-0 checkpoint of the given target config: an acceptable starting
point of the swarm's spec.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import PatchEmbed

from ddm_models.checkpoint import CheckpointMetadata, InvalidCheckpoint, checkpoint_tensors, write_checkpoint
from ddm_models.configs import DIT_SHAPES, ExpertConfig
from ddm_models.experts import Expert, build_expert

DIT_TIMESTEP_FREQUENCIES = 256
REPARAMETERISATION_TIMESTEP = 500.0  # PixArt-alpha evaluates DiT's per-block modulation at t = 500


def read_dit_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights in a DiT checkpoint file: a bare state dict (the released files) or a
    training checkpoint's "ema" (else "model") entry. Only tensors and plain containers are
    unpickled; anything else raises `InvalidCheckpoint`."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InvalidCheckpoint(f"{path} holds pickled objects other than tensors; it is refused unread "
                                f"(torch.load weights_only=True: {str(error).splitlines()[0]})") from error
    except (OSError, RuntimeError, EOFError) as error:
        raise InvalidCheckpoint(f"cannot read DiT checkpoint {path}: {error}") from error
    if isinstance(payload, dict):
        for key in ("ema", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in payload.items()):
        raise InvalidCheckpoint(f"{path} is not a DiT state dict (names to tensors)")
    state = {name.removeprefix("module."): tensor for name, tensor in payload.items()}  # DDP-saved names
    if "x_embedder.proj.weight" not in state or "blocks.0.attn.qkv.weight" not in state:
        raise InvalidCheckpoint(f"{path} does not look like a facebookresearch DiT: no x_embedder / blocks.0.attn")
    return state


def check_dit_fits(state: dict[str, torch.Tensor], target: ExpertConfig, where: str) -> None:
    """Raise `InvalidCheckpoint` naming every field in which the DiT weights and `target` disagree."""
    width, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(name.split(".")[1]) for name in state if name.startswith("blocks."))
    tokens = state["pos_embed"].shape[1] if "pos_embed" in state else (target.sample_size // target.patch_size) ** 2
    found = {"width": width, "in_channels": in_channels, "patch_size": patch, "depth": depth,
             "sample_size": math.isqrt(tokens) * patch,
             "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width,
             "stem_channels": 0, "head_channels": 0}
    # heads leave no trace in the weights; the DiT family fixes them by width and depth
    heads = {(w, n): h for w, n, h in DIT_SHAPES.values()}.get((width, depth))
    if heads is not None:
        found["heads"] = heads
    wrong = [f"{field}: DiT has {value!r}, {target.name!r} {getattr(target, field)!r}"
             for field, value in found.items() if getattr(target, field) != value]
    if wrong:
        raise InvalidCheckpoint(f"{where} cannot initialise {target.name!r}: " + "; ".join(wrong))


def check_dit_position_embedding(state: dict[str, torch.Tensor], target: ExpertConfig, where: str) -> None:
    """Raise `InvalidCheckpoint` unless DiT's `pos_embed` (if it has one) is the fixed sin-cos table
    (1, T, D) the expert of `target` builds: a learned one cannot be kept. Builds the patch embedding
    alone (cheap even for DiT-XL), without touching the caller's random state."""
    if "pos_embed" not in state:
        return
    with torch.random.fork_rng(devices=[]):
        ours = PatchEmbed(height=target.sample_size, width=target.sample_size, patch_size=target.patch_size,
                          in_channels=target.in_channels, embed_dim=target.width, interpolation_scale=1).pos_embed
    if state["pos_embed"].shape != ours.shape or not torch.allclose(state["pos_embed"].float(), ours, atol=1e-4):
        raise InvalidCheckpoint(f"{where}: its position embedding is not DiT's fixed sin-cos one; "
                                "a learned one cannot be kept by this expert")


def _frequencies(t: torch.Tensor) -> torch.Tensor:
    """DiT's sinusoidal timestep features [cos | sin] (256 wide), as diffusers' Timesteps(flip_sin_to_cos)."""
    half = DIT_TIMESTEP_FREQUENCIES // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


def _mid_range_condition(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """c* = SiLU(t_embed(500) + null-class embedding): (1, D), what AdaLN modulations act on."""
    hidden = F.linear(_frequencies(torch.tensor([REPARAMETERISATION_TIMESTEP])),
                      state["t_embedder.mlp.0.weight"], state["t_embedder.mlp.0.bias"])
    t_embed = F.linear(F.silu(hidden), state["t_embedder.mlp.2.weight"], state["t_embedder.mlp.2.bias"])
    table = state.get("y_embedder.embedding_table.weight")
    null_class = table[-1:] if table is not None else torch.zeros_like(t_embed)  # the CFG row is the last
    return F.silu(t_embed + null_class)


def dit_to_expert_state(state: dict[str, torch.Tensor], model: Expert) -> dict[str, torch.Tensor]:
    """`model`'s state dict with every tensor the mapping above provides taken from DiT `state`."""
    config, mapped = model.config, dict(model.state_dict())
    mapped["pos_embed.proj.weight"] = state["x_embedder.proj.weight"]
    mapped["pos_embed.proj.bias"] = state["x_embedder.proj.bias"]
    embedder = "adaln_single.emb.timestep_embedder"
    for ours, theirs in (("linear_1", "mlp.0"), ("linear_2", "mlp.2")):
        mapped[f"{embedder}.{ours}.weight"] = state[f"t_embedder.{theirs}.weight"]
        mapped[f"{embedder}.{ours}.bias"] = state[f"t_embedder.{theirs}.bias"]
    condition = _mid_range_condition(state)
    shared_w, shared_b = state["blocks.0.adaLN_modulation.1.weight"], state["blocks.0.adaLN_modulation.1.bias"]
    mapped["adaln_single.linear.weight"], mapped["adaln_single.linear.bias"] = shared_w, shared_b
    for i in range(config.depth):
        dit, ours = f"blocks.{i}", f"transformer_blocks.{i}"
        q, k, v = state[f"{dit}.attn.qkv.weight"].chunk(3)
        qb, kb, vb = state[f"{dit}.attn.qkv.bias"].chunk(3)
        for name, weight, bias in (("to_q", q, qb), ("to_k", k, kb), ("to_v", v, vb)):
            mapped[f"{ours}.attn1.{name}.weight"], mapped[f"{ours}.attn1.{name}.bias"] = weight, bias
        for ours_name, theirs in (("attn1.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"),
                                  ("ff.net.2", "mlp.fc2")):
            mapped[f"{ours}.{ours_name}.weight"] = state[f"{dit}.{theirs}.weight"]
            mapped[f"{ours}.{ours_name}.bias"] = state[f"{dit}.{theirs}.bias"]
        weight, bias = state[f"{dit}.adaLN_modulation.1.weight"], state[f"{dit}.adaLN_modulation.1.bias"]
        offset = F.linear(condition, weight - shared_w, bias - shared_b)  # (1, 6 D)
        mapped[f"{ours}.scale_shift_table"] = offset.reshape(6, config.width)
    if config.objective == "ddpm":
        mapped["proj_out.weight"], mapped["proj_out.bias"] = _epsilon_channels(state, config)
    return {name: tensor.to(mapped[name].dtype).contiguous() for name, tensor in mapped.items()}


def _epsilon_channels(state: dict[str, torch.Tensor], config: ExpertConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DiT's final linear, (p p C_out, D) with channels innermost, cut to the first `in_channels`
    output channels (epsilon; a learned-sigma DiT has 2 C_out: epsilon then the variance)."""
    weight, bias = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    patches, channels = config.patch_size ** 2, config.in_channels
    out = weight.shape[0] // patches
    if out not in (channels, 2 * channels):
        raise InvalidCheckpoint(f"DiT's final layer has {out} output channels; expected {channels} or {2 * channels}")
    return (weight.reshape(patches, out, -1)[:, :channels].reshape(patches * channels, -1),
            bias.reshape(patches, out)[:, :channels].reshape(-1))


def init_expert_from_dit(path: str | Path, target: ExpertConfig, *, seed: int = 0) -> Expert:
    """A new expert of config `target` initialised from the DiT checkpoint at `path` (see the module
    docstring), its fresh parts seeded by `seed`."""
    state = read_dit_state_dict(path)
    check_dit_fits(state, target, str(path))
    check_dit_position_embedding(state, target, str(path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_expert(target)
    model.load_state_dict(dit_to_expert_state(state, model))
    return model


def dit_checkpoint_to_expert(path: str | Path, destination: str | Path, target: ExpertConfig, *, cluster: int = 0,
                             seed: int = 0) -> Path:
    """Write a step-0 expert checkpoint of `target` (the swarm's spec) for `cluster`, initialised
    from the DiT checkpoint at `path`; the header records the source file's sha256."""
    model = init_expert_from_dit(path, target, seed=seed)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    metadata = CheckpointMetadata(kind="expert", config=target, cluster=cluster, step=0, samples_seen=0,
                                  extra={"initialised_from": "facebookresearch/DiT", "source_sha256": digest.hexdigest()})
    return write_checkpoint(destination, metadata, checkpoint_tensors(model.state_dict(), model.state_dict()))
