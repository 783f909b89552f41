"""Generation at scale: experts offloaded to the CPU, batched sampling, bf16 weights."""

import copy

import pytest
import torch

from ddm_models.sampling import EnsembleSampler, ExpertPlacement
from tests.ml_fixtures import random_expert, random_router, text_encoder

PROMPTS = ["the digit 0", "the digit 3", "a handwritten seven", "number 9", "the digit 5", "eight", "one"]


def _ensemble():
    experts = [random_expert(k, objective, seed=k, width=32, heads=2)
               for k, objective in enumerate(("fm", "ddpm", "fm", "ddpm"))]
    return experts, random_router()


def test_offloaded_experts_give_the_same_images_bit_for_bit():
    experts, router = _ensemble()
    plain = EnsembleSampler(experts, router, "top2", text_encoder=text_encoder()).sample(PROMPTS, num_steps=4, seed=3)
    experts, router = _ensemble()
    offloaded = EnsembleSampler(experts, router, "top2", text_encoder=text_encoder(), offload=True,
                                max_resident=1).sample(PROMPTS, num_steps=4, seed=3)
    assert torch.equal(plain.images, offloaded.images)
    assert plain.evaluations == offloaded.evaluations and torch.equal(plain.routing, offloaded.routing)
    assert plain.moves == 0 and offloaded.moves > 0


def test_offload_keeps_at_most_max_resident_experts_on_the_device():
    experts = {e.cluster: e for e in _ensemble()[0]}
    placement = ExpertPlacement(experts, torch.device("cpu"), offload=True, max_resident=2)
    for cluster in (0, 1, 2, 0, 3, 3, 1):
        assert placement.acquire(cluster) is experts[cluster]
        assert len(placement.resident) <= 2 and cluster in placement.resident
    # 0 1 2 (evicts 0) 0 (evicts 1) 3 (evicts 2) 3 (resident) 1 (evicts 0): six moves in
    assert placement.moves == 6 and list(placement.resident) == [3, 1]


def test_sampling_in_batches_gives_the_images_of_one_batch():
    experts, router = _ensemble()
    sampler = EnsembleSampler(experts, router, "top2", text_encoder=text_encoder())
    whole = sampler.sample(PROMPTS, num_steps=3, seed=5)
    batched = sampler.sample(PROMPTS, num_steps=3, seed=5, batch_size=3)
    assert batched.images.shape == whole.images.shape and batched.routing.shape == whole.routing.shape
    torch.testing.assert_close(batched.images, whole.images, atol=1e-4, rtol=0)  # batched matmuls round differently
    assert batched.evaluations == whole.evaluations


def test_bf16_experts_sample_close_to_float32_ones():
    experts, router = _ensemble()
    full = EnsembleSampler(experts, router, "top2", text_encoder=text_encoder()).sample(PROMPTS, num_steps=3, seed=2)
    half = [copy.deepcopy(e) for e in experts]
    for expert in half:
        expert.model.to(torch.bfloat16)
    images = EnsembleSampler(half, copy.deepcopy(router).to(torch.bfloat16), "top2",
                             text_encoder=text_encoder()).sample(PROMPTS, num_steps=3, seed=2).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert (images - full.images).abs().mean() < 0.05


def test_a_bad_batch_size_or_resident_count_is_refused():
    experts, router = _ensemble()
    with pytest.raises(ValueError, match="batch_size"):
        EnsembleSampler(experts, router, text_encoder=text_encoder()).sample(PROMPTS, batch_size=0)
    with pytest.raises(ValueError, match="max_resident"):
        EnsembleSampler(experts, router, offload=True, max_resident=0)
