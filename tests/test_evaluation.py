"""Held-out velocity losses: one scale for experts, ensembles and monolithic models."""

import torch

from ddm_models.evaluation import velocity_losses
from ddm_models.sampling import EnsembleSampler
from tests.ml_fixtures import random_expert, random_router, small_digits, text_encoder


def test_a_velocity_that_knows_the_clean_images_scores_zero():
    data = small_digits()
    # v = eps - x0 = (x_t - x0) / t: exact only under the FM path x_t = (1 - t) x0 + t eps.
    oracle = lambda x_t, t, text: (x_t - data.images[:200]) / t.view(-1, 1, 1, 1)  # noqa: E731
    losses = velocity_losses(oracle, data, text_encoder(), rows=torch.arange(200), batch_size=200)
    assert losses.shape == (200,)
    assert losses.max() < 1e-8


def test_a_subset_of_rows_gets_the_same_noise_as_the_full_set():
    data, expert = small_digits(), random_expert(0)
    full = velocity_losses(expert.velocity, data, text_encoder(), seed=3)
    rows = torch.tensor([5, 17, 900, 1796])
    assert torch.allclose(velocity_losses(expert.velocity, data, text_encoder(), seed=3, rows=rows), full[rows])
    assert not torch.allclose(velocity_losses(expert.velocity, data, text_encoder(), seed=4, rows=rows), full[rows])


def test_an_ensemble_is_measured_on_the_scale_of_its_experts():
    data = small_digits()
    experts = [random_expert(0, seed=1), random_expert(1, "ddpm", seed=2)]
    sampler = EnsembleSampler(experts, random_router(num_clusters=2), "top1")
    rows = torch.arange(64)
    mixed = velocity_losses(lambda x, t, text: sampler.velocity(x, t, text)[0], data, text_encoder(), rows=rows)
    alone = [velocity_losses(e.velocity, data, text_encoder(), rows=rows) for e in experts]
    # top-1 routing: each image's error is one of its experts' errors.
    assert torch.all(torch.isclose(mixed, alone[0]) | torch.isclose(mixed, alone[1]))
