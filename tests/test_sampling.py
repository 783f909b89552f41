"""The ensemble sampler: routing strategies, sparse execution, guidance, determinism, mixed experts."""

import pytest
import torch

from ddm_models.sampling import EnsembleSampler, Routing, RoutingError
from tests.ml_fixtures import random_expert, random_router, text_encoder

PROMPTS = ["the digit 0", "the digit 3", "a handwritten seven", "number 9", "the digit 5"]


def _ensemble(objectives=("fm", "ddpm", "fm", "ddpm"), **router_overrides):
    experts = [random_expert(k, objective, seed=k, width=32 + 16 * (k % 2), heads=2)
               for k, objective in enumerate(objectives)]
    return experts, random_router(**router_overrides)


def _count_rows(experts):
    """Rows each expert's network actually computed, counted by forward hooks."""
    rows = {e.cluster: 0 for e in experts}
    for e in experts:
        e.model.register_forward_hook(lambda module, args, out, k=e.cluster: rows.__setitem__(k, rows[k] + len(out)))
    return rows


def _fix_router_preference(router, bias):
    """Make the router's logits constant: it then always prefers clusters in the order of `bias`."""
    last = router.head[-1]
    torch.nn.init.zeros_(last.weight)
    last.bias.data = torch.tensor(bias, dtype=torch.float32)


@pytest.mark.parametrize("name", ["top1", "top2", "top17", "full"])
def test_a_routing_reads_back_from_its_own_spelling(name):
    assert str(Routing.parse(name)) == name


@pytest.mark.parametrize("name", ["top0", "topk", "top02", "Top2", "", "all"])
def test_a_routing_name_that_means_nothing_is_refused_with_the_valid_spellings(name):
    with pytest.raises(RoutingError, match="top1, top2, top<k> or full"):
        Routing.parse(name)


def test_same_seed_gives_identical_images_and_another_seed_does_not():
    experts, router = _ensemble()
    sampler = EnsembleSampler(experts, router, text_encoder=text_encoder())
    a = sampler.sample(PROMPTS, num_steps=4, seed=11).images
    b = sampler.sample(PROMPTS, num_steps=4, seed=11).images
    c = sampler.sample(PROMPTS, num_steps=4, seed=12).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 1, 8, 8) and a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("routing,expected", [("top1", 1), ("top2", 2), ("top3", 3), ("full", 4)])
def test_each_sample_runs_exactly_its_selected_experts(routing, expected):
    experts, router = _ensemble()
    rows = _count_rows(experts)
    result = EnsembleSampler(experts, router, routing, text_encoder=text_encoder()).sample(
        PROMPTS, num_steps=3, guidance_scale=1.0)
    assert sum(rows.values()) == sum(result.evaluations.values()) == expected * len(PROMPTS) * 3
    assert rows == result.evaluations
    assert ((result.routing > 0).sum(dim=2) == expected).all()
    torch.testing.assert_close(result.routing.sum(dim=2), torch.ones(3, len(PROMPTS)))


def test_unselected_experts_never_run():
    experts, router = _ensemble()
    _fix_router_preference(router, [0.0, 5.0, -5.0, 4.0])
    rows = _count_rows(experts)
    EnsembleSampler(experts, router, "top2", text_encoder=text_encoder()).sample(PROMPTS, num_steps=2)
    assert rows[0] == rows[2] == 0 and rows[1] > 0 and rows[3] > 0


def test_guidance_runs_conditional_and_unconditional_branches_per_expert():
    experts, router = _ensemble()
    rows = _count_rows(experts)
    sampler = EnsembleSampler(experts, router, "top1", text_encoder=text_encoder())
    guided = sampler.sample(PROMPTS, num_steps=2, guidance_scale=3.0, seed=1)
    assert sum(rows.values()) == 2 * sum(guided.evaluations.values())
    plain = sampler.sample(PROMPTS, num_steps=2, guidance_scale=1.0, seed=1)
    assert not torch.equal(guided.images, plain.images)


def test_ensemble_velocity_is_the_router_weighted_mixture_of_converted_expert_velocities():
    experts, router = _ensemble(objectives=("fm", "ddpm", "fm", "ddpm"))
    sampler = EnsembleSampler(experts, router, "full", text_encoder=text_encoder())
    text = text_encoder().encode(PROMPTS)
    x, t = torch.randn(5, 1, 8, 8), torch.full((5,), 0.6)
    v, weights, _ = sampler.velocity(x, t, text, guidance_scale=2.0)
    probs = torch.softmax(router(x, t, text), dim=1)
    expected = sum(probs[:, k].view(-1, 1, 1, 1) * e.velocity(x, t, text, 2.0) for k, e in enumerate(experts))
    torch.testing.assert_close(weights, probs)
    torch.testing.assert_close(v, expected)


def test_top2_weights_are_the_two_largest_probabilities_renormalised():
    experts, router = _ensemble()
    sampler = EnsembleSampler(experts, router, "top2")
    text = text_encoder().encode(PROMPTS)
    x, t = torch.randn(5, 1, 8, 8), torch.full((5,), 0.3)
    probs = torch.softmax(router(x, t, text), dim=1)
    top = probs.topk(2, dim=1)
    weights = sampler.routing_weights(x, t, text)
    torch.testing.assert_close(weights.gather(1, top.indices), top.values / top.values.sum(1, keepdim=True))


def test_a_missing_cluster_gets_no_weight():
    experts, router = _ensemble()
    _fix_router_preference(router, [5.0, 0.0, 0.0, 0.0])
    sampler = EnsembleSampler(experts[1:], router, "top1", text_encoder=text_encoder())
    result = sampler.sample(PROMPTS, num_steps=2)
    assert result.evaluations[1] + result.evaluations[2] + result.evaluations[3] == 2 * len(PROMPTS)
    assert not result.routing[:, :, 0].any()


def test_a_router_without_text_routes_on_the_image_and_time_alone():
    experts, router = _ensemble(use_text=False)
    result = EnsembleSampler(experts, router, "top2", text_encoder=text_encoder()).sample(PROMPTS, num_steps=2)
    assert torch.isfinite(result.images).all()


def test_one_expert_samples_without_a_router():
    expert = random_expert(0, "ddpm")
    result = EnsembleSampler([expert], None, "top1", text_encoder=text_encoder()).sample(PROMPTS, num_steps=3)
    assert result.evaluations == {0: 15} and torch.isfinite(result.images).all()


def test_experts_with_different_image_shapes_are_refused():
    with pytest.raises(ValueError, match="image shape"):
        EnsembleSampler([random_expert(0), random_expert(1, sample_size=16)], random_router())
