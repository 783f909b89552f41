"""Objectives: DDPM and flow-matching experts agree in FM velocity; mixing spaces agree."""

import pytest
import torch

from ddm_models.objectives import (DDPM, FlowMatching, build_objective, epsilon_from_velocity, fm_noised,
                                   velocity_from_epsilon, velocity_from_x0, x0_from_velocity)


class GaussianData:
    """x0 ~ N(mu, diag(sigma^2)) per pixel: the ideal predictors are known in closed form."""

    def __init__(self, shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)
        self.sigma = 0.1 + 0.7 * torch.rand(shape, generator=g, dtype=torch.float64)

    def ideal_fm_velocity(self, x, t):
        """E[eps - x0 | x_t = x] on the FM path x_t = (1-t) x0 + t eps."""
        t = t.view(-1, 1, 1, 1)
        var = (1 - t) ** 2 * self.sigma ** 2 + t ** 2
        residual = x - (1 - t) * self.mu
        eps = t * residual / var
        x0 = self.mu + (1 - t) * self.sigma ** 2 * residual / var
        return eps - x0, x0

    def ideal_ddpm_epsilon(self, z, tau, objective):
        """E[eps | z_tau = z] for z = sqrt(abar) x0 + sqrt(1 - abar) eps, abar read off the
        expert's own discrete schedule at its (fractional) timestep tau."""
        abar = objective.abar_at(tau).view(-1, 1, 1, 1)
        var = abar * self.sigma ** 2 + 1 - abar
        return (1 - abar).sqrt() * (z - abar.sqrt() * self.mu) / var


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_converted_ddpm_predictor_gives_the_fm_velocity_of_the_ideal_fm_predictor(schedule):
    data = GaussianData((2, 4, 4))
    ddpm, fm = build_objective("ddpm", ddpm_schedule=schedule), FlowMatching()
    g = torch.Generator().manual_seed(1)
    t = torch.linspace(0.01, 0.99, 199, dtype=torch.float64)
    x0 = data.mu + data.sigma * torch.randn((len(t), 2, 4, 4), generator=g, dtype=torch.float64)
    x = fm_noised(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)

    v_fm_ideal, x0_ideal = data.ideal_fm_velocity(x, t)
    assert x0_ideal.abs().max() < ddpm.x0_clip  # the stabilising clamp stays out of the comparison
    x_in, timestep = fm.model_input(x, t)
    v_fm = fm.to_velocity(v_fm_ideal, x, t)  # the ideal FM expert predicts its velocity directly
    z, tau = ddpm.model_input(x, t)
    assert (tau > 0).all() and (tau < 999).all()  # no clamp to the schedule's ends in [0.01, 0.99]
    v_ddpm = ddpm.to_velocity(data.ideal_ddpm_epsilon(z, tau, ddpm), x, t)

    torch.testing.assert_close(v_ddpm, v_fm, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(timestep, t * 999)


def test_the_float32_conversion_agrees_to_single_precision_tolerance():
    data = GaussianData((1, 8, 8), seed=3)
    ddpm = DDPM()
    g = torch.Generator().manual_seed(2)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    x0 = data.mu + data.sigma * torch.randn((len(t), 1, 8, 8), generator=g, dtype=torch.float64)
    x = fm_noised(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), t)
    v_ideal, _ = data.ideal_fm_velocity(x, t)
    z, tau = ddpm.model_input(x.float(), t.float())
    eps = data.ideal_ddpm_epsilon(z.double(), tau.double(), ddpm).float()
    v = ddpm.to_velocity(eps, x.float(), t.float()).double()
    # x0_hat divides by 1 - t: float32 rounding of tau and eps (~1e-6 relative) grows up to 100x at t = 0.99.
    error = (v - v_ideal).abs().amax(dim=(1, 2, 3))
    assert error.max() < 5e-4, error.max()


def test_ddpm_training_examples_follow_the_discrete_schedule():
    ddpm = DDPM()
    x0, noise = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)
    x_in, tau, target = ddpm.training_example(x0, noise, torch.tensor([0.0, 0.5, 0.9999]))
    assert tau.tolist() == [0.0, 500.0, 999.0]
    torch.testing.assert_close(x_in[:, 0, 0, 0], ddpm.alphas_cumprod[[0, 500, 999]].sqrt().float())
    assert torch.equal(target, noise)


def test_flow_matching_examples_lie_on_the_fm_path_with_velocity_target():
    fm = build_objective("fm")
    x0, noise, u = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.rand(4)
    x_in, timestep, target = fm.training_example(x0, noise, u)
    torch.testing.assert_close(x_in, fm_noised(x0, noise, u))
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(timestep, 999 * u)


def test_ddpm_conversion_stays_finite_at_pure_noise():
    ddpm = DDPM()
    x = torch.randn(4, 1, 8, 8)
    z, tau = ddpm.model_input(x, torch.ones(4))
    assert (tau == 999).all()
    v = ddpm.to_velocity(torch.randn_like(x) * 3, x, torch.ones(4))
    assert torch.isfinite(v).all() and v.abs().max() <= 3 * 6 + ddpm.x0_clip


def test_mixing_in_epsilon_x0_or_velocity_space_agrees_for_weights_summing_to_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.98 + 0.01
    velocities = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = torch.softmax(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)

    def mix(items):
        return sum(weights[:, k].view(-1, 1, 1, 1) * item for k, item in enumerate(items))

    v_mixed = mix(velocities)
    eps_mixed = mix([epsilon_from_velocity(v, x, t) for v in velocities])
    x0_mixed = mix([x0_from_velocity(v, x, t) for v in velocities])
    torch.testing.assert_close(velocity_from_epsilon(eps_mixed, x, t), v_mixed)
    torch.testing.assert_close(velocity_from_x0(x0_mixed, x, t), v_mixed)


def test_mixing_spaces_disagree_when_weights_do_not_sum_to_one():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.full((2,), 0.5, dtype=torch.float64)
    velocities = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2)]
    v_mixed = 0.7 * velocities[0] + 0.7 * velocities[1]
    eps_mixed = 0.7 * epsilon_from_velocity(velocities[0], x, t) + 0.7 * epsilon_from_velocity(velocities[1], x, t)
    assert not torch.allclose(velocity_from_epsilon(eps_mixed, x, t), v_mixed)
