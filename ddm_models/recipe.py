"""Hyper-parameters as data: how to train an ensemble on the embedded default, in one place.

`EMBEDDED_RECIPE` is what `python -m ddm_models.train_ensemble` runs and what the swarm demo's
nodes use (configs/local.yaml carries the same values in its model specs' `training` maps);
`EnsembleRecipe.from_dict` reads an edited copy, validating every field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ddm_models.configs import (ExpertConfig, InvalidConfig, RouterConfig, _from_dict, expert_config,
                                router_config)


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    """Optimiser settings of one trainer (AdamW with linear warm-up, EMA of the weights)."""

    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.999
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.ema_decay < 1 or self.warmup_steps < 0:
            raise InvalidConfig(f"bad training settings {self}")

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `ExpertTrainer` / `RouterTrainer`."""
        return dataclasses.asdict(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingSettings:
        return _from_dict(cls, data)


@dataclasses.dataclass(frozen=True)
class EnsembleRecipe:
    """K experts on K clusters of the embedded digits plus a router, trained in a time budget.

    `objectives` is cycled over the clusters ("fm", "ddpm" alternates the two). `router_share` is
    the fraction of all worker time given to the router; `workers` processes of
    `threads_per_worker` threads each train the jobs side by side.
    """

    num_clusters: int = 4
    cluster_seed: int = 0
    fine_clusters: int = 64
    heldout_fraction: float = 0.1
    split_seed: int = 0
    expert: ExpertConfig = dataclasses.field(default_factory=lambda: expert_config("tiny"))
    objectives: tuple[str, ...] = ("fm",)
    expert_training: TrainingSettings = TrainingSettings()
    router: RouterConfig = dataclasses.field(default_factory=lambda: router_config("small"))
    router_training: TrainingSettings = TrainingSettings(batch_size=128, lr=2e-3)
    router_share: float = 0.12
    workers: int = 2
    threads_per_worker: int = 1
    seed: int = 0
    sample_steps: int = 20
    guidance_scale: float = 2.0
    routing: str = "top2"

    def __post_init__(self) -> None:
        if self.router.num_clusters != self.num_clusters:
            raise InvalidConfig(f"the router has {self.router.num_clusters} clusters, the recipe {self.num_clusters}")
        if not self.objectives or any(o not in ("fm", "ddpm") for o in self.objectives):
            raise InvalidConfig(f"objectives must be a non-empty list of 'fm'/'ddpm', got {self.objectives}")
        if not 0 < self.router_share < 1 or self.workers < 1 or self.threads_per_worker < 1:
            raise InvalidConfig("router_share must be in (0, 1), workers and threads_per_worker >= 1")

    def expert_config(self, cluster: int) -> ExpertConfig:
        return self.expert.replace(objective=self.objectives[cluster % len(self.objectives)])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(expert=self.expert.to_dict(), router=self.router.to_dict(), objectives=list(self.objectives),
                    expert_training=self.expert_training.to_dict(), router_training=self.router_training.to_dict())
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleRecipe:
        """Fields left out keep `EMBEDDED_RECIPE`'s values; nested maps are validated by their types."""
        if not isinstance(data, dict):
            raise InvalidConfig(f"a recipe must be a mapping, got {type(data).__name__}")
        base = EMBEDDED_RECIPE.to_dict()
        nested = {"expert": ExpertConfig, "router": RouterConfig, "expert_training": TrainingSettings,
                  "router_training": TrainingSettings}
        values = {}
        for name, kind in nested.items():
            part = data.get(name, {})
            if not isinstance(part, dict):
                raise InvalidConfig(f"recipe field {name} must be a mapping")
            values[name] = kind.from_dict({**base[name], **part})
        flat = {name: value for name, value in data.items() if name not in nested}
        scalars = _from_dict(_ScalarFields, {**{k: v for k, v in base.items() if k not in nested}, **flat})
        return cls(**dataclasses.asdict(scalars), **values)


@dataclasses.dataclass(frozen=True)
class _ScalarFields:
    """The recipe's non-nested fields, for validation by `_from_dict`."""

    num_clusters: int
    cluster_seed: int
    fine_clusters: int
    heldout_fraction: float
    split_seed: int
    objectives: tuple[str, ...]
    router_share: float
    workers: int
    threads_per_worker: int
    seed: int
    sample_steps: int
    guidance_scale: float
    routing: str


EMBEDDED_RECIPE = EnsembleRecipe()
