"""Experts and their configs: shapes, named sizes, caption dropout, config validation."""

import pytest
import torch

from ddm_models.configs import EXPERT_SIZES, ExpertConfig, InvalidConfig, RouterConfig, expert_config
from ddm_models.experts import build_expert, count_parameters
from tests.ml_fixtures import random_expert, text_encoder


def _parameters_on_meta(size):
    with torch.device("meta"):
        return count_parameters(build_expert(EXPERT_SIZES[size]))


def test_dit_b2_shape_has_about_120_million_parameters():
    # DiT-B/2 with AdaLN-Zero has 130M; AdaLN-Single drops ~7% and cross-attention adds some back.
    assert 110e6 < _parameters_on_meta("DiT-B/2") < 135e6


def test_dit_xl2_shape_has_about_600_million_parameters():
    assert 580e6 < _parameters_on_meta("DiT-XL/2") < 630e6


def test_tiny_expert_is_about_two_million_parameters_for_28x28_digits():
    config = EXPERT_SIZES["tiny"]
    assert config.image_shape == (1, 28, 28)
    assert 1.5e6 < count_parameters(build_expert(config)) < 3e6


def test_latent_expert_maps_32x32x4_latents_to_the_same_shape():
    config = expert_config("DiT-S/2", width=64, depth=1, heads=2, text_dim=8, text_pooled_dim=8)
    model = build_expert(config)
    from ddm_models.text import TextBatch
    text = TextBatch(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 8))
    assert model(torch.randn(2, 4, 32, 32), torch.tensor([0.0, 500.0]), text).shape == (2, 4, 32, 32)


def test_fresh_expert_predicts_zero():
    model = build_expert(EXPERT_SIZES["tiny"])
    text = text_encoder().encode(["the digit 3", "seven"])
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([10.0, 900.0]), text)
    assert out.shape == (2, 1, 28, 28) and not out.abs().any()


def test_prediction_depends_on_the_prompt():
    expert = random_expert(0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 500.0])
    a = expert.model(x, t, text_encoder().encode(["the digit 1", "the digit 1"]))
    b = expert.model(x, t, text_encoder().encode(["the digit 8", "the digit 8"]))
    assert not torch.allclose(a, b)


def test_dropped_captions_are_replaced_by_the_null_embedding():
    expert = random_expert(0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500.0, 20.0])
    drop = torch.tensor([True, False])
    a = expert.model(x, t, text_encoder().encode(["the digit 1", "the digit 1"]), drop_text=drop)
    b = expert.model(x, t, text_encoder().encode(["the digit 8", "the digit 1"]), drop_text=drop)
    torch.testing.assert_close(a, b)


def test_null_embedding_is_learned():
    expert = random_expert(0)
    names = {name for name, p in expert.model.named_parameters() if p.requires_grad}
    assert {"null_token", "null_pooled"} <= names


def test_config_round_trips_through_a_dict_with_a_stable_hash():
    config = expert_config("small", objective="ddpm", caption_dropout=0.2)
    again = ExpertConfig.from_dict(config.to_dict())
    assert again == config and again.config_hash() == config.config_hash()
    assert config.config_hash() != config.replace(depth=9).config_hash()
    router = RouterConfig(channels=(8, 16))
    assert RouterConfig.from_dict(router.to_dict()) == router


@pytest.mark.parametrize("bad", [{"objective": "score"}, {"width": "128"}, {"depth": 0}, {"patch_size": 5},
                                 {"colour": 3}, {"pooled_text": 1}, {"caption_dropout": 1.0}])
def test_bad_expert_configs_are_refused_with_a_typed_error(bad):
    with pytest.raises(InvalidConfig):
        ExpertConfig.from_dict({**EXPERT_SIZES["tiny"].to_dict(), **bad})


def test_unknown_size_is_refused():
    with pytest.raises(InvalidConfig, match="unknown expert size"):
        expert_config("DiT-G/1")
