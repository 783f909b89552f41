"""Shared pieces of the ddm_models tests: the real MiniLM encoder (loaded once per process, every
digit caption precomputed) and the 8x8 digits with tiny models, so each test runs in seconds."""

import functools

import torch

from ddm_models.captions import all_captions
from ddm_models.configs import expert_config, router_config
from ddm_models.data import load_small_digits
from ddm_models.experts import build_expert
from ddm_models.objectives import objective_for
from ddm_models.router import build_router
from ddm_models.sampling import LoadedExpert
from ddm_models.text import CachedTextEncoder, MiniLMEncoder


@functools.lru_cache(maxsize=1)
def text_encoder() -> CachedTextEncoder:
    encoder = CachedTextEncoder(MiniLMEncoder())
    encoder.precompute(all_captions())
    return encoder


@functools.lru_cache(maxsize=1)
def small_digits():
    return load_small_digits()


def tiny_config(objective="fm", **overrides):
    """An 8x8 expert small enough to train for a few steps in well under a second."""
    return expert_config("digits-8x8", objective=objective, **{"width": 32, "depth": 2, "heads": 2, **overrides})


def tiny_router_config(**overrides):
    return router_config("digits-8x8", **{"channels": (16, 32), "time_dim": 32, **overrides})


def random_expert(cluster, objective="fm", seed=0, **overrides) -> LoadedExpert:
    """An untrained expert whose zero-initialised output layer is randomised, so it predicts
    something that depends on its inputs."""
    torch.manual_seed(seed)
    config = tiny_config(objective, **overrides)
    model = build_expert(config)
    for parameter in model.parameters():
        if not parameter.abs().sum():
            torch.nn.init.normal_(parameter, std=0.05)
    return LoadedExpert(cluster, config, objective_for(config), model.eval())


def random_router(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_router(tiny_router_config(**overrides)).eval()
