"""How big a swarm's models are: every model a manifest names, built on the meta device and counted.

Building on `torch.device("meta")` allocates no memory and runs no initialiser, so even eight
DiT-XL/2 experts count in about a second. `swarm show` prints
`format_model_sizes(manifest_model_sizes(manifest))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ddm_models.configs import ExpertConfig, RouterConfig, expert_config_from_spec, router_config_from_spec
from ddm_models.experts import build_expert, count_parameters
from ddm_models.router import build_router


class ManifestLike(Protocol):
    """What is read of a swarm manifest (`protocol.manifest.SwarmManifest` is one)."""

    experts: Sequence[Any]
    router: Any
    num_clusters: int

    def expert_for_cluster(self, cluster: int) -> Any: ...


class ModelSpecLike(Protocol):
    """What is read of a manifest's model spec (`protocol.manifest.ModelSpec` is one)."""

    name: str
    objective: str
    architecture: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """One model of a swarm: `clusters` are the clusters whose expert it is (empty for the router and
    for an expert spec no cluster uses); `image_shape` is what it sees, (C, H, W) pixels or latents."""

    name: str
    kind: str  # expert | router
    objective: str  # fm | ddpm | router
    size: str  # the named size, e.g. "DiT-XL/2"
    parameters: int
    image_shape: tuple[int, int, int]
    clusters: tuple[int, ...]


def parameters_on_meta(config: ExpertConfig | RouterConfig) -> int:
    """Parameter count of the model `config` builds, without allocating its weights."""
    with torch.device("meta"):
        model = build_expert(config) if isinstance(config, ExpertConfig) else build_router(config)
    return count_parameters(model)


def swarm_model_sizes(experts: Sequence[ModelSpecLike], router: ModelSpecLike,
                      cluster_models: Sequence[str]) -> list[ModelSize]:
    """Every expert spec, then the router (when there are >= 2 clusters), counted on the meta device.

    cluster_models[k] is the expert spec name cluster k trains (for a manifest:
    `[manifest.expert_for_cluster(k).name for k in range(manifest.num_clusters)]`). Raises
    `InvalidConfig` naming the field when a spec does not build."""
    rows = []
    for spec in experts:
        config = expert_config_from_spec(spec.objective, spec.architecture)
        clusters = tuple(k for k, name in enumerate(cluster_models) if name == spec.name)
        rows.append(ModelSize(spec.name, "expert", spec.objective, str(spec.architecture.get("size", "tiny")),
                              parameters_on_meta(config),
                              config.image_shape, clusters))
    if len(cluster_models) >= 2:
        config = router_config_from_spec(router.architecture, len(cluster_models))
        rows.append(ModelSize(router.name, "router", "router", str(router.architecture.get("size", "small")),
                              parameters_on_meta(config),
                              config.image_shape, ()))
    return rows


def manifest_model_sizes(manifest: ManifestLike) -> list[ModelSize]:
    """`swarm_model_sizes` of a swarm manifest: what `swarm show` prints with `format_model_sizes`."""
    clusters = [manifest.expert_for_cluster(k).name for k in range(manifest.num_clusters)]
    return swarm_model_sizes(manifest.experts, manifest.router, clusters)


def swarm_parameters(rows: Sequence[ModelSize]) -> int:
    """Parameters of the whole swarm: each expert once per cluster it trains, plus the router."""
    return sum(row.parameters * (len(row.clusters) if row.kind == "expert" else 1) for row in rows)


def format_model_sizes(rows: Sequence[ModelSize]) -> str:
    """A plain-text table of `rows` and the swarm's total, for a terminal."""
    lines = [f"{'model':<24} {'kind':<7} {'objective':<9} {'size':<18} {'parameters':>12}  {'sees':<10} clusters"]
    for row in rows:
        clusters = ",".join(map(str, row.clusters)) if row.clusters else "-"
        shape = "x".join(map(str, row.image_shape))
        lines.append(f"{row.name:<24} {row.kind:<7} {row.objective:<9} {row.size:<18} "
                     f"{row.parameters / 1e6:>11.1f}M  {shape:<10} {clusters}")
    lines.append(f"swarm total (each expert once per cluster, plus the router): {swarm_parameters(rows) / 1e6:.1f}M")
    return "\n".join(lines)
