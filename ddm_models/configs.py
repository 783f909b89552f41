"""Model configurations as data: frozen dataclasses, validated on load, hashed canonically.

A config travels inside every checkpoint and its hash inside every signed checkpoint record, so two
peers agree on an architecture exactly when their `config_hash()` values agree. Named sizes live in
`EXPERT_SIZES` and `ROUTER_SIZES`; `expert_config("DiT-B/2", objective="ddpm")` picks one and
overrides fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any, TypeVar
from ddm_models.errors import ModelError


class InvalidConfig(ModelError, ValueError):
    """A model config is malformed: unknown or missing field, wrong type, or impossible value."""


OBJECTIVES = ("fm", "ddpm")
DDPM_SCHEDULES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """One expert's architecture and objective.

    Images (or latents) are (in_channels, sample_size, sample_size). The transformer sees
    (sample_size / patch_size)^2 tokens of `width` channels through `depth` blocks with `heads`
    heads, AdaLN-Single modulation and cross-attention on text token states of `text_dim` channels.
    `stem_channels` > 0 adds a 3x3 conv stem before patchifying, `head_channels` > 0 a 3x3 conv head
    after unpatchifying (both help tiny pixel-space models); with both, `stem_skip` also feeds the
    stem's full-resolution features to the head (a U-Net-style skip: pixel detail that one linear
    map per patch cannot draw). `pooled_text` adds a learned projection
    of the pooled text embedding (`text_pooled_dim`) to the timestep embedding feeding AdaLN-Single.
    `caption_dropout` is the probability that training replaces a caption by the learned null
    embedding (classifier-free guidance). `ddpm_schedule` is the beta schedule of a "ddpm" expert:
    "linear" (DDPM's 1e-4..0.02) or "cosine" (Nichol & Dhariwal).
    """

    name: str = "tiny"
    objective: str = "fm"
    in_channels: int = 1
    sample_size: int = 28
    patch_size: int = 4
    width: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    text_dim: int = 384
    text_pooled_dim: int = 384
    pooled_text: bool = True
    stem_channels: int = 32
    head_channels: int = 32
    stem_skip: bool = True
    caption_dropout: float = 0.1
    ddpm_schedule: str = "linear"

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        _check(self.ddpm_schedule in DDPM_SCHEDULES,
               f"ddpm_schedule must be one of {DDPM_SCHEDULES}, got {self.ddpm_schedule!r}")
        for field in ("in_channels", "sample_size", "patch_size", "width", "depth", "heads", "text_dim",
                      "text_pooled_dim"):
            _check(getattr(self, field) >= 1, f"{field} must be >= 1, got {getattr(self, field)}")
        _check(self.stem_channels >= 0 and self.head_channels >= 0, "stem/head channels must be >= 0")
        _check(not self.stem_skip or (self.stem_channels > 0 and self.head_channels > 0) or
               (self.stem_channels == 0 and self.head_channels == 0),
               "stem_skip needs both a conv stem and a conv head (or neither, when it is ignored)")
        _check(self.sample_size % self.patch_size == 0,
               f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
        _check(self.width % self.heads == 0, f"width {self.width} is not a multiple of heads {self.heads}")
        _check(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(0.0 <= self.caption_dropout < 1.0, f"caption_dropout must be in [0, 1), got {self.caption_dropout}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.sample_size, self.sample_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertConfig:
        """Build from a plain dict; unknown keys, missing-but-required or mistyped values raise
        `InvalidConfig` (fields left out take their defaults)."""
        return _from_dict(cls, data)

    def config_hash(self) -> str:
        return config_hash(self)

    def replace(self, **changes: Any) -> ExpertConfig:
        return dataclasses.replace(self, **changes)


ROUTER_BACKBONES = ("conv", "dit")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """The router, predicting p(cluster | x_t, t[, pooled text]).

    `backbone` "conv": a small conv net whose stages have widths `channels` (each halves the
    resolution after the first). "dit": a DiT trunk as DDM's router (patches of `patch_size`,
    `depth` AdaLN-Single blocks of `width` channels and `heads` heads, self-attention only) whose
    learned CLS token is decoded to the K logits. `use_text` lets it see the pooled text embedding
    (`text_pooled_dim`) as DDM's router may, which makes it informative near t = 1 where x_t is
    almost pure noise; Paris's router does not.
    """

    name: str = "router-small"
    num_clusters: int = 4
    in_channels: int = 1
    sample_size: int = 28
    channels: tuple[int, ...] = (32, 64, 128)
    time_dim: int = 128
    use_text: bool = True
    text_pooled_dim: int = 384
    backbone: str = "conv"
    patch_size: int = 2
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _check(self.num_clusters >= 2, f"a router needs >= 2 clusters, got {self.num_clusters}")
        _check(self.backbone in ROUTER_BACKBONES, f"backbone must be one of {ROUTER_BACKBONES}, got {self.backbone!r}")
        _check(len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
               f"channels must be positive widths, got {self.channels}")
        for field in ("in_channels", "sample_size", "time_dim", "text_pooled_dim", "patch_size", "width", "depth",
                      "heads"):
            _check(getattr(self, field) >= 1, f"{field} must be >= 1, got {getattr(self, field)}")
        if self.backbone == "dit":
            _check(self.sample_size % self.patch_size == 0,
                   f"sample_size {self.sample_size} is not a multiple of patch_size {self.patch_size}")
            _check(self.width % self.heads == 0, f"width {self.width} is not a multiple of heads {self.heads}")
            _check(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.sample_size, self.sample_size)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["channels"] = list(self.channels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        return _from_dict(cls, data)

    def config_hash(self) -> str:
        return config_hash(self)

    def replace(self, **changes: Any) -> RouterConfig:
        return dataclasses.replace(self, **changes)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidConfig(message)


Config = TypeVar("Config", ExpertConfig, RouterConfig)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check one JSON/YAML value against a field's annotation (int, float, bool, str, tuple[int, ...])."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidConfig(f"{where} must be a list, got {type(value).__name__}")
        (item,) = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return tuple(_coerce(v, item, f"{where}[]") for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise InvalidConfig(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfig(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidConfig(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise InvalidConfig(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"no coercion for {annotation}")  # a programming error, not bad input


def _from_dict(cls: type[Config], data: Any) -> Config:
    if not isinstance(data, dict):
        raise InvalidConfig(f"a {cls.__name__} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields
    if unknown:
        raise InvalidConfig(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(fields)}")
    values = {name: _coerce(value, hints[name], f"{cls.__name__}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as error:
        raise InvalidConfig(f"{cls.__name__}: {error}") from error


def canonical_json(config: ExpertConfig | RouterConfig) -> str:
    """Sorted keys, no whitespace, tuples as lists: equal configs give equal strings."""
    return json.dumps({"type": type(config).__name__, **config.to_dict()}, sort_keys=True, separators=(",", ":"))


def config_hash(config: ExpertConfig | RouterConfig) -> str:
    """sha256 (hex) of `canonical_json(config)`."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


# Named sizes. "tiny" (0.7M parameters) is the CPU expert of the embedded default: on one core it
# trains at ~280 images/s, 2.5x the steps of the DESIGN sketch "tiny-128" (128 wide, 6 deep, 2M),
# and in our runs reached a higher conditional accuracy in the same CPU time.
EXPERT_SIZES: dict[str, ExpertConfig] = {
    "tiny": ExpertConfig(),
    "tiny-128": ExpertConfig(name="tiny-128", width=128, depth=6, heads=4, mlp_ratio=4.0),
    "small": ExpertConfig(name="small", width=192, depth=8, heads=6, mlp_ratio=4.0),
    "digits-8x8": ExpertConfig(name="digits-8x8", sample_size=8, patch_size=2, width=64, depth=3, heads=4,
                               stem_channels=16, head_channels=16),
}

# The DiT family (Peebles & Xie, table 1): S 384 x 12 / 6 heads, B 768 x 12 / 12, L 1024 x 24 / 16,
# XL 1152 x 28 / 16, each with patches of 2, 4 or 8, named "DiT-XL/2" as in the paper. Experts see
# 32x32x4 SD-VAE latents (256x256 images) with AdaLN-Single and cross-attention on CLIP ViT-L/14
# token states (768 wide) as in PixArt-alpha and Paris, which trains them at 129M-605M parameters.
DIT_SHAPES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_PATCHES = (2, 4, 8)
CLIP_L14_DIM = 768
_LATENT = dict(in_channels=4, sample_size=32, stem_channels=0, head_channels=0, stem_skip=False, mlp_ratio=4.0,
               pooled_text=False, text_dim=CLIP_L14_DIM, text_pooled_dim=CLIP_L14_DIM)
for _shape, (_width, _depth, _heads) in DIT_SHAPES.items():
    for _patch in DIT_PATCHES:
        EXPERT_SIZES[f"DiT-{_shape}/{_patch}"] = ExpertConfig(name=f"DiT-{_shape}/{_patch}", width=_width,
                                                             depth=_depth, heads=_heads, patch_size=_patch, **_LATENT)

ROUTER_SIZES: dict[str, RouterConfig] = {
    "small": RouterConfig(),
    "digits-8x8": RouterConfig(name="router-8x8", sample_size=8, channels=(32, 64)),
    "latent": RouterConfig(name="router-latent", in_channels=4, sample_size=32, channels=(64, 128, 256, 256),
                           time_dim=256, text_pooled_dim=CLIP_L14_DIM),
}
# DDM's router: a DiT-B/2 trunk with a CLS token (Paris's is DiT-B/2-sized too, and image-only).
for _shape, (_width, _depth, _heads) in DIT_SHAPES.items():
    for _patch in DIT_PATCHES:
        ROUTER_SIZES[f"DiT-{_shape}/{_patch}"] = RouterConfig(
            name=f"router-DiT-{_shape}/{_patch}", backbone="dit", in_channels=4, sample_size=32, patch_size=_patch,
            width=_width, depth=_depth, heads=_heads, time_dim=256, use_text=False, text_pooled_dim=CLIP_L14_DIM)


def expert_config(size: str, **overrides: Any) -> ExpertConfig:
    """The named size `size` with `overrides` applied (validated)."""
    if size not in EXPERT_SIZES:
        raise InvalidConfig(f"unknown expert size {size!r}; known: {sorted(EXPERT_SIZES)}")
    return _from_dict(ExpertConfig, {**EXPERT_SIZES[size].to_dict(), **overrides})


def router_config(size: str, **overrides: Any) -> RouterConfig:
    """The named router size `size` with `overrides` applied (validated)."""
    if size not in ROUTER_SIZES:
        raise InvalidConfig(f"unknown router size {size!r}; known: {sorted(ROUTER_SIZES)}")
    return _from_dict(RouterConfig, {**ROUTER_SIZES[size].to_dict(), **overrides})


def expert_config_from_spec(objective: str, architecture: dict[str, Any]) -> ExpertConfig:
    """An expert config from a swarm manifest's model spec: `architecture` names a `size` (default
    "tiny") and may override any field; `objective` is the spec's objective."""
    fields = dict(architecture)
    size = fields.pop("size", "tiny")
    if not isinstance(size, str):
        raise InvalidConfig(f"architecture.size must be a size name, got {size!r}")
    return expert_config(size, objective=objective, **fields)


def router_config_from_spec(architecture: dict[str, Any], num_clusters: int) -> RouterConfig:
    """A router config from a swarm manifest's router spec (`size` default "small") for `num_clusters`."""
    fields = dict(architecture)
    size = fields.pop("size", "small")
    if not isinstance(size, str):
        raise InvalidConfig(f"architecture.size must be a size name, got {size!r}")
    return router_config(size, num_clusters=num_clusters, **fields)


# Tiny named constructors, as DiT's `DiT_XL_2()`: the named size with overrides applied.
def DiT_S_2(**overrides: Any) -> ExpertConfig: return expert_config("DiT-S/2", **overrides)
def DiT_S_4(**overrides: Any) -> ExpertConfig: return expert_config("DiT-S/4", **overrides)
def DiT_S_8(**overrides: Any) -> ExpertConfig: return expert_config("DiT-S/8", **overrides)
def DiT_B_2(**overrides: Any) -> ExpertConfig: return expert_config("DiT-B/2", **overrides)
def DiT_B_4(**overrides: Any) -> ExpertConfig: return expert_config("DiT-B/4", **overrides)
def DiT_B_8(**overrides: Any) -> ExpertConfig: return expert_config("DiT-B/8", **overrides)
def DiT_L_2(**overrides: Any) -> ExpertConfig: return expert_config("DiT-L/2", **overrides)
def DiT_L_4(**overrides: Any) -> ExpertConfig: return expert_config("DiT-L/4", **overrides)
def DiT_L_8(**overrides: Any) -> ExpertConfig: return expert_config("DiT-L/8", **overrides)
def DiT_XL_2(**overrides: Any) -> ExpertConfig: return expert_config("DiT-XL/2", **overrides)
def DiT_XL_4(**overrides: Any) -> ExpertConfig: return expert_config("DiT-XL/4", **overrides)
def DiT_XL_8(**overrides: Any) -> ExpertConfig: return expert_config("DiT-XL/8", **overrides)
