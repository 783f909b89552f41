"""Training objectives behind one interface, and their unification in flow-matching (FM) time.

FM time t in [0, 1], 1 = noise: x_t = (1 - t) x0 + t eps, velocity v = eps - x0. The sampler only
ever holds an FM state (x, t); each objective says how its expert sees that state
(`model_input`) and how the expert's prediction becomes an FM velocity (`to_velocity`).

DDPM (epsilon prediction on a discrete 1000-step schedule) sees (x, t) as a variance-preserving
state: s = sqrt((1-t)^2 + t^2), z = x / s has alpha = (1-t)/s and sigma = t/s, and its timestep
tau is where the schedule's abar_tau equals alpha^2 (linear interpolation of the table). Its
epsilon becomes x0_hat = (x - t eps_hat) / (1 - t) and v_hat = eps_hat - x0_hat.

At a fixed (x, t) the three parametrisations are affine in one another (x = (1-t) x0 + t eps,
v = eps - x0), so mixing experts in eps, x0 or v space with weights summing to 1 agrees; the
functions at the bottom convert between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FM_TIMESTEP_SCALE = 999.0  # FM experts see 999 t, the DDPM timestep range, so trunks transfer


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar t broadcast to `like`'s (B, C, H, W), in its dtype."""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def fm_noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The FM path: x_t = (1 - t) x0 + t noise. x0, noise: (B, C, H, W); t: (B,) in [0, 1]."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


class Objective:
    """What an expert is trained to predict, and how that maps to FM velocity.

    training_example(x0, noise, u) -> (x_in, timestep, target): x0, noise (B, C, H, W), u (B,)
    uniform in [0, 1) drawn by the trainer; model_input(x, t) -> (x_in, timestep) for an FM state;
    to_velocity(prediction, x, t) -> v; loss(prediction, target) -> scalar.
    """

    name: str

    def training_example(self, x0, noise, u):
        raise NotImplementedError

    def model_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def to_velocity(self, prediction: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction.float(), target.float())


class FlowMatching(Objective):
    """Rectified flow / flow matching: t = u uniform, predict v = eps - x0; timestep = 999 t."""

    name = "fm"

    def training_example(self, x0, noise, u):
        return fm_noised(x0, noise, u), u * FM_TIMESTEP_SCALE, noise - x0

    def model_input(self, x, t):
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0])
        return x, t * FM_TIMESTEP_SCALE

    def to_velocity(self, prediction, x, t):
        return prediction


class DDPM(Objective):
    """DDPM epsilon prediction on a discrete schedule of `num_steps` (by default linear betas
    1e-4..0.02; "squaredcos_cap_v2" is the cosine schedule; from diffusers' DDPMScheduler).
    Training draws integer tau uniformly.

    Stabilisers for conversion near t = 1: t is limited to the schedule's range (abar clamped to
    [abar_last, abar_first]), alpha = (1-t)/s is floored at `alpha_floor` when dividing, and x0_hat
    is clamped to [-x0_clip, x0_clip] (wide for data in [-1, 1]).
    """

    name = "ddpm"

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear", alpha_floor: float = 0.01, x0_clip: float = 5.0):
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=num_steps, beta_start=beta_start, beta_end=beta_end,
                                  beta_schedule=beta_schedule)
        self.num_steps = num_steps
        self.alphas_cumprod = torch.cumprod(1.0 - scheduler.betas.double(), dim=0)  # (num_steps,), decreasing
        self.alpha_floor, self.x0_clip = alpha_floor, x0_clip

    def abar_at(self, tau: torch.Tensor) -> torch.Tensor:
        """abar at fractional timesteps tau in [0, num_steps - 1] (linear interpolation)."""
        table = self.alphas_cumprod.to(tau.device, torch.float64)
        steps = torch.arange(self.num_steps, device=tau.device, dtype=torch.float64)
        return _interp(tau.double(), steps, table).to(tau.dtype)

    def timestep_for_abar(self, abar: torch.Tensor) -> torch.Tensor:
        """The fractional tau where the schedule's abar equals `abar` (clamped to the table)."""
        table = self.alphas_cumprod.to(abar.device, torch.float64).flip(0)  # increasing
        steps = torch.arange(self.num_steps - 1, -1, -1, device=abar.device, dtype=torch.float64)
        return _interp(abar.double(), table, steps).to(abar.dtype)

    def training_example(self, x0, noise, u):
        tau = (u * self.num_steps).floor().clamp(max=self.num_steps - 1)
        abar = _per_sample(self.alphas_cumprod.to(x0.device)[tau.long()], x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, tau.to(x0.dtype), noise

    def model_input(self, x, t):
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0]).clamp(0, 1)
        scale = torch.sqrt((1 - t) ** 2 + t ** 2)
        alpha = (1 - t) / scale
        return x / _per_sample(scale, x), self.timestep_for_abar(alpha ** 2)

    def to_velocity(self, prediction, x, t):
        return velocity_from_epsilon(prediction, x, t, alpha_floor=self.alpha_floor, x0_clip=self.x0_clip)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp in torch: piecewise-linear through (xp, fp), xp increasing, clamped at the ends."""
    x = x.clamp(xp[0], xp[-1])
    right = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    left = right - 1
    weight = (x - xp[left]) / (xp[right] - xp[left])
    return fp[left] + weight * (fp[right] - fp[left])


# Conversions between parametrisations at a fixed FM state (x, t); t: (B,) or scalar.

def velocity_from_epsilon(eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor, *, alpha_floor: float = 0.0,
                          x0_clip: float | None = None) -> torch.Tensor:
    """v = eps - x0_hat with x0_hat = (x - t eps) / (1 - t); optionally (1-t) floored at
    alpha_floor * s (alpha = (1-t)/s >= alpha_floor) and x0_hat clamped to +-x0_clip."""
    t = _per_sample(t, x)
    one_minus_t = 1 - t
    if alpha_floor > 0:
        one_minus_t = torch.maximum(one_minus_t, alpha_floor * torch.sqrt((1 - t) ** 2 + t ** 2))
    x0 = (x - t * eps) / one_minus_t
    if x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
    return eps - x0


def velocity_from_x0(x0: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x - x0) / t (t > 0)."""
    return (x - x0) / _per_sample(t, x)


def epsilon_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps = x + (1 - t) v."""
    return x + (1 - _per_sample(t, x)) * v


def x0_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x - t v."""
    return x - _per_sample(t, x) * v


def build_objective(name: str, *, ddpm_schedule: str = "linear") -> Objective:
    """"fm" or "ddpm" (with beta schedule "linear" or "cosine")."""
    if name == "fm":
        return FlowMatching()
    if name == "ddpm":
        return DDPM(beta_schedule=_DIFFUSERS_SCHEDULES[ddpm_schedule])
    raise ValueError(f"unknown objective {name!r}; use 'fm' or 'ddpm'")


_DIFFUSERS_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def objective_for(config) -> Objective:
    """The objective an `ExpertConfig` trains and samples with."""
    return build_objective(config.objective, ddpm_schedule=config.ddpm_schedule)
