"""The models a manifest names, as `ddm_models` configs: `architecture.size` picks a named size,
other keys override it; `training` maps onto the trainer's options."""

from __future__ import annotations

from typing import Any, Dict, Tuple

from ddm_models.configs import EXPERT_SIZES, ROUTER_SIZES, ExpertConfig, InvalidConfig, RouterConfig
from ddm_models.recipe import TrainingSettings
from ddm_models.sampling import Routing, RoutingError
from ddm_models.text import TextEncoderError, UnknownTextEncoder, text_encoder_dims, text_encoder_spec
from node.errors import InvalidJobSetup
from protocol.manifest import ModelSpec, SwarmManifest


def _split_spec(spec: ModelSpec, sizes: dict, kind: str) -> Tuple[Any, Dict[str, Any]]:
    architecture = dict(spec.architecture)
    size = architecture.pop("size", None)
    if size is not None and size not in sizes:
        raise InvalidJobSetup(f"model '{spec.name}': unknown {kind} size {size!r}; known: {sorted(sizes)}")
    return sizes.get(size), architecture


def _from_the_swarm(manifest: SwarmManifest) -> Dict[str, Any]:
    """What a model's config takes from the swarm unless its spec says otherwise: the image shape of
    the data (pixel-space swarms; a latent swarm's specs state their latent shape) and the widths of
    the text encoder's states."""
    fields: Dict[str, Any] = {}
    if manifest.vae is None:
        fields.update(in_channels=manifest.dataset.channels, sample_size=manifest.dataset.image_size)
    try:
        dim, pooled = text_encoder_dims(manifest.text_encoder)
    except TextEncoderError:  # an encoder whose config is not cached: the spec's (or the size's) widths stand
        return fields
    return {**fields, "text_dim": dim, "text_pooled_dim": pooled}


def expert_config(spec: ModelSpec, manifest: SwarmManifest) -> ExpertConfig:
    base, overrides = _split_spec(spec, EXPERT_SIZES, "expert")
    try:
        fields = {**(base or ExpertConfig()).to_dict(), **_from_the_swarm(manifest), **overrides, "name": spec.name,
                  "objective": spec.objective}
        config = ExpertConfig.from_dict(fields)
    except InvalidConfig as error:
        raise InvalidJobSetup(f"model '{spec.name}' in swarm '{manifest.name}': {error}") from None
    image = (manifest.dataset.channels, manifest.dataset.image_size, manifest.dataset.image_size)
    if manifest.vae is None and tuple(config.image_shape) != image:
        raise InvalidJobSetup(f"model '{spec.name}' expects images {config.image_shape}, the swarm's data are {image}")
    return config


def router_config(manifest: SwarmManifest) -> RouterConfig:
    spec = manifest.router
    base, overrides = _split_spec(spec, ROUTER_SIZES, "router")
    swarm = {k: v for k, v in _from_the_swarm(manifest).items() if k != "text_dim"}
    try:
        fields = {**(base or RouterConfig()).to_dict(), **swarm, **overrides, "num_clusters": manifest.num_clusters}
        return RouterConfig.from_dict(fields)
    except InvalidConfig as error:
        raise InvalidJobSetup(f"router '{spec.name}' in swarm '{manifest.name}': {error}") from None


def training_options(spec: ModelSpec) -> Dict[str, Any]:
    """Trainer keyword arguments from a spec's `training` map (defaults live in `TrainingSettings`)."""
    try:
        return TrainingSettings.from_dict(dict(spec.training)).trainer_kwargs()
    except InvalidConfig as error:
        raise InvalidJobSetup(f"model '{spec.name}' training options: {error}") from None


def check_model_specs(manifest: SwarmManifest) -> None:
    """Every model the manifest names must build into a `ddm_models` config with valid training
    options; raise `InvalidJobSetup` naming the model and the field otherwise. Cheap: no weights."""
    try:
        text_encoder_spec(manifest.text_encoder)
    except UnknownTextEncoder as error:
        raise InvalidJobSetup(f"manifest field 'text_encoder' of swarm '{manifest.name}': {error}") from None
    for spec in manifest.experts:
        expert_config(spec, manifest)
        training_options(spec)
    try:
        Routing.parse(manifest.sampling.routing)
    except RoutingError as error:
        raise InvalidJobSetup(f"manifest field 'sampling.routing' of swarm '{manifest.name}': {error}") from None
    if manifest.num_clusters >= 2:  # one cluster needs no router
        router_config(manifest)
        training_options(manifest.router)
