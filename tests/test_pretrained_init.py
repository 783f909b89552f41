"""Pretrained initialisation: DDPM -> FM conversion into a swarm's FM spec, and experts initialised
from facebookresearch DiT checkpoint files (tiny DiT-shaped state dicts made here)."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from ddm_models.checkpoint import InvalidCheckpoint, load_expert, read_checkpoint
from ddm_models.configs import expert_config
from ddm_models.conversion import convert_ddpm_checkpoint
from ddm_models.experts import build_expert
from ddm_models.pretrained_dit import (dit_checkpoint_to_expert, dit_to_expert_state, init_expert_from_dit,
                                       read_dit_state_dict)
from ddm_models.text import TextBatch
from ddm_models.training import ExpertTrainer
from tests.ml_fixtures import small_digits, text_encoder, tiny_config

WIDTH, DEPTH, HEADS, PATCH, SIZE, CHANNELS = 32, 2, 2, 2, 8, 4


def _target(objective="fm", **overrides):
    return expert_config("DiT-S/2", objective=objective, **{
        "name": f"swarm-{objective}", "width": WIDTH, "depth": DEPTH, "heads": HEADS, "sample_size": SIZE,
        "text_dim": 8, "text_pooled_dim": 8, **overrides})


def _dit_state(seed=0, learn_sigma=True):
    """Random weights under facebookresearch DiT's parameter names and shapes; the null class (the
    last row, CFG's) embeds to zero, so that DiT conditioned on it sees the time alone, as ours does."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    d, out = WIDTH, CHANNELS * (2 if learn_sigma else 1)
    state = {"x_embedder.proj.weight": r(d, CHANNELS, PATCH, PATCH), "x_embedder.proj.bias": r(d),
             "pos_embed": build_expert(_target()).pos_embed.pos_embed.clone(),
             "t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d),
             "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
             "y_embedder.embedding_table.weight": r(11, d),
             "final_layer.linear.weight": r(PATCH * PATCH * out, d), "final_layer.linear.bias": r(PATCH * PATCH * out),
             "final_layer.adaLN_modulation.1.weight": r(2 * d, d), "final_layer.adaLN_modulation.1.bias": r(2 * d)}
    state["y_embedder.embedding_table.weight"][-1] = 0
    for i in range(DEPTH):
        state.update({f"blocks.{i}.attn.qkv.weight": r(3 * d, d), f"blocks.{i}.attn.qkv.bias": r(3 * d),
                      f"blocks.{i}.attn.proj.weight": r(d, d), f"blocks.{i}.attn.proj.bias": r(d),
                      f"blocks.{i}.mlp.fc1.weight": r(4 * d, d), f"blocks.{i}.mlp.fc1.bias": r(4 * d),
                      f"blocks.{i}.mlp.fc2.weight": r(d, 4 * d), f"blocks.{i}.mlp.fc2.bias": r(d),
                      f"blocks.{i}.adaLN_modulation.1.weight": r(6 * d, d),
                      f"blocks.{i}.adaLN_modulation.1.bias": r(6 * d)})
    return state


def _dit_trunk(state, x, t, label):
    """DiT's trunk as the paper writes it (AdaLN-Zero blocks), for comparison: tokens (B, T, D)."""
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    t_emb = F.linear(F.silu(F.linear(torch.cat([args.cos(), args.sin()], -1), state["t_embedder.mlp.0.weight"],
                                     state["t_embedder.mlp.0.bias"])),
                     state["t_embedder.mlp.2.weight"], state["t_embedder.mlp.2.bias"])
    c = F.silu(t_emb + state["y_embedder.embedding_table.weight"][label])
    h = F.conv2d(x, state["x_embedder.proj.weight"], state["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + state["pos_embed"]
    for i in range(DEPTH):
        p = lambda name: state[f"blocks.{i}.{name}"]  # noqa: E731
        s1, sc1, g1, s2, sc2, g2 = F.linear(c, p("adaLN_modulation.1.weight"), p("adaLN_modulation.1.bias")
                                            )[:, None].chunk(6, dim=-1)
        a = F.layer_norm(h, (WIDTH,), eps=1e-6) * (1 + sc1) + s1
        q, k, v = F.linear(a, p("attn.qkv.weight"), p("attn.qkv.bias")).chunk(3, dim=-1)
        heads = lambda z: z.unflatten(-1, (HEADS, WIDTH // HEADS)).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
        h = h + g1 * F.linear(attended, p("attn.proj.weight"), p("attn.proj.bias"))
        m = F.layer_norm(h, (WIDTH,), eps=1e-6) * (1 + sc2) + s2
        m = F.linear(F.gelu(F.linear(m, p("mlp.fc1.weight"), p("mlp.fc1.bias")), approximate="tanh"),
                     p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        h = h + g2 * m
    return h


def test_an_expert_from_a_dit_file_computes_dits_trunk_at_mid_range_times(tmp_path):
    state = _dit_state()
    torch.save(state, tmp_path / "DiT-tiny.pt")
    model = init_expert_from_dit(tmp_path / "DiT-tiny.pt", _target("ddpm")).eval()
    captured = {}
    model.transformer_blocks[-1].register_forward_hook(lambda m, a, out: captured.setdefault("h", out))
    x, t = torch.randn(3, CHANNELS, SIZE, SIZE), torch.full((3,), 500.0)
    text = TextBatch(torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool), torch.randn(3, 8))
    with torch.no_grad():
        model(x, t, text)
    torch.testing.assert_close(captured["h"], _dit_trunk(state, x, t, torch.full((3,), 10)), atol=1e-3, rtol=1e-3)


def test_a_ddpm_target_keeps_the_epsilon_half_of_dits_learned_sigma_output():
    state = _dit_state()
    model = build_expert(_target("ddpm"))
    model.load_state_dict(dit_to_expert_state(state, model))
    tokens = torch.randn(2, (SIZE // PATCH) ** 2, WIDTH)
    theirs = F.linear(tokens, state["final_layer.linear.weight"], state["final_layer.linear.bias"])
    theirs = theirs.reshape(2, SIZE // PATCH, SIZE // PATCH, PATCH, PATCH, 2 * CHANNELS)[..., :CHANNELS]
    ours = model.proj_out(tokens).reshape(2, SIZE // PATCH, SIZE // PATCH, PATCH, PATCH, CHANNELS)
    torch.testing.assert_close(ours, theirs)


def test_an_fm_target_reinitialises_the_output_layer_and_text_path(tmp_path):
    torch.save(_dit_state(), tmp_path / "dit.pt")
    model = init_expert_from_dit(tmp_path / "dit.pt", _target(), seed=7)
    torch.manual_seed(7)
    fresh = build_expert(_target())  # what the seeded fresh parts must be
    assert not model.proj_out.weight.any() and not model.proj_out.bias.any()
    for name in ("caption_projection.linear_1.weight", "null_token"):
        assert torch.equal(model.state_dict()[name], fresh.state_dict()[name])
    assert torch.equal(model.pos_embed.proj.weight, _dit_state()["x_embedder.proj.weight"])


def test_the_written_checkpoint_is_a_step_0_checkpoint_of_the_swarms_spec(tmp_path):
    torch.save({"model": _dit_state(1), "ema": _dit_state(2)}, tmp_path / "train-ckpt.pt")
    target = _target()
    path = dit_checkpoint_to_expert(tmp_path / "train-ckpt.pt", tmp_path / "out.safetensors", target, cluster=3)
    metadata, _ = read_checkpoint(path)
    assert (metadata.config_hash, metadata.step, metadata.cluster) == (target.config_hash(), 0, 3)
    expert = load_expert(path)  # the EMA weights of a training checkpoint were taken
    assert torch.equal(expert.model.pos_embed.proj.weight, _dit_state(2)["x_embedder.proj.weight"])


def test_a_dit_file_with_pickled_objects_is_refused_unread(tmp_path):
    torch.save({"model": _dit_state(), "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "full.pt")
    with pytest.raises(InvalidCheckpoint, match="pickled objects"):
        read_dit_state_dict(tmp_path / "full.pt")


def test_a_dit_of_another_shape_is_refused_naming_the_fields(tmp_path):
    torch.save(_dit_state(), tmp_path / "dit.pt")
    with pytest.raises(InvalidCheckpoint, match="width.*depth"):
        init_expert_from_dit(tmp_path / "dit.pt", _target(width=64, depth=3))


def test_a_learned_position_embedding_is_refused(tmp_path):
    state = _dit_state()
    state["pos_embed"] = torch.randn_like(state["pos_embed"])
    torch.save(state, tmp_path / "dit.pt")
    with pytest.raises(InvalidCheckpoint, match="position embedding"):
        init_expert_from_dit(tmp_path / "dit.pt", _target())


def test_a_ddpm_checkpoint_converts_into_the_swarms_fm_spec_and_trains_from_it(tmp_path):
    ddpm = ExpertTrainer(tiny_config("ddpm", name="swarm-ddpm"), small_digits(), text_encoder(), batch_size=16)
    ddpm.train_steps(2)
    source = ddpm.export(tmp_path / "ddpm.safetensors", heldout_loss=0.0)
    target = tiny_config("fm", name="swarm-fm", caption_dropout=0.2)
    path = convert_ddpm_checkpoint(source, tmp_path / "fm.safetensors", target=target)
    assert read_checkpoint(path)[0].config_hash == target.config_hash()
    fm = ExpertTrainer(target, small_digits(), text_encoder(), batch_size=16)
    fm.init_from_checkpoint(path)  # refuses any config hash but the target's
    assert fm.step == 0 and math.isfinite(fm.train_steps(1).loss)


def test_a_ddpm_checkpoint_cannot_convert_into_an_fm_spec_of_another_shape(tmp_path):
    ddpm = ExpertTrainer(tiny_config("ddpm"), small_digits(), text_encoder(), batch_size=16)
    source = ddpm.export(tmp_path / "ddpm.safetensors", heldout_loss=0.0)
    with pytest.raises(InvalidCheckpoint, match="width"):
        convert_ddpm_checkpoint(source, tmp_path / "fm.safetensors", target=tiny_config("fm", width=64))
    with pytest.raises(InvalidCheckpoint, match="flow-matching"):
        convert_ddpm_checkpoint(source, tmp_path / "fm.safetensors", target=tiny_config("ddpm", name="x"))


def test_a_dit_xl_file_needs_the_dit_xl_head_count(tmp_path):
    # the shapes of DiT-XL-2-256x256.pt (the check reads shapes only)
    from ddm_models.pretrained_dit import check_dit_fits
    state = {"x_embedder.proj.weight": torch.empty(1152, 4, 2, 2), "pos_embed": torch.empty(1, 256, 1152),
             "blocks.27.attn.qkv.weight": torch.empty(1), "blocks.0.mlp.fc1.weight": torch.empty(4608, 1)}
    check_dit_fits(state, expert_config("DiT-XL/2"), "DiT-XL-2-256x256.pt")
    with pytest.raises(InvalidCheckpoint, match="heads: DiT has 16"):
        check_dit_fits(state, expert_config("DiT-XL/2", heads=8), "DiT-XL-2-256x256.pt")
