"""Latent diffusion: a VAE codec between images and the latents experts and the router see.

A swarm manifest may name a diffusers `AutoencoderKL` (`vae: {model: stabilityai/sd-vae-ft-mse}`,
as Paris uses). It is loaded from a local folder or the local Hugging Face cache only, never the
network. Latents follow diffusers' convention:

    z = (E(x) - shift) * scaling_factor        x: (B, 3, H, W) in [-1, 1]
    x = D(z / scaling_factor + shift)          z: (B, C_z, H / f, W / f), f = 2^(len(block_out_channels) - 1)

with `scaling_factor` (0.18215 for SD-VAE) and `shift` (0 unless the VAE's config sets
`shift_factor`) from the VAE's config unless the manifest overrides the scale. E(x) is the mean of
the encoder's Gaussian, not a sample of it, so a data set's latents are one fixed tensor that every
peer can compute, cache and compare.

Latents are computed once per shard or data set (`cached_latents`, `encode_dataset`) and kept as
safetensors files whose name and header carry a hash of the inputs (the images, or a verified shard
sha256) and of the VAE (its config, weights and scale): another VAE or other images never reuse them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ddm_models.data import ImageDataset
from ddm_models.local_cache import exclusive, write_atomically
from ddm_models.errors import ModelError

CACHE_FORMAT = "ddm-swarm/latents/1"


class LatentError(ModelError, RuntimeError):
    """Something about a VAE or its latents is wrong; the message says what."""


class VaeUnavailable(LatentError):
    """The VAE named by a manifest is neither a local folder nor in the local Hugging Face cache."""


class LatentShapeError(LatentError, ValueError):
    """Images whose shape the VAE cannot encode (wrong channels, or sides not a multiple of f)."""


class VaeSpecLike(Protocol):
    """What is read of a manifest's `vae` field (`protocol.manifest.VaeSpec` is one)."""

    model: str
    scaling_factor: float | None


class LatentCodec:
    """Encode images to scaled latents and decode them back, with one `AutoencoderKL`.

    `model_id` names the VAE in messages; `scaling_factor` None takes the VAE config's. The VAE runs
    in eval mode without gradients on its own device and dtype; inputs are moved there, outputs are
    float32 on that device.
    """

    def __init__(self, vae: Any, model_id: str, scaling_factor: float | None = None):
        config = vae.config
        self.vae = vae.eval().requires_grad_(False)
        self.model_id = model_id
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.image_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self._fingerprint: str | None = None

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, *, scaling_factor: float | None = None, cache_dir: str | Path | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LatentCodec:
        """The `AutoencoderKL` at local folder `model`, else Hugging Face model id `model` from the
        local cache (`cache_dir`, default the HF hub cache). Raises `VaeUnavailable` naming it."""
        from diffusers import AutoencoderKL

        try:
            if Path(model).is_dir():
                vae = AutoencoderKL.from_pretrained(model, torch_dtype=dtype)
            else:
                vae = AutoencoderKL.from_pretrained(model, local_files_only=True, cache_dir=cache_dir,
                                                    torch_dtype=dtype)
        except (OSError, ValueError) as error:  # diffusers says "not found" as OSError/EnvironmentError
            where = f"the Hugging Face cache {cache_dir}" if cache_dir else "the local Hugging Face cache"
            raise VaeUnavailable(
                f"VAE {model!r} is not a local folder and not in {where}; download it once "
                f"(`huggingface-cli download {model}`) or name a folder holding its config.json and weights "
                f"({type(error).__name__}: {error})") from error
        return cls(vae.to(device), model, scaling_factor)

    @classmethod
    def from_manifest_spec(cls, spec: VaeSpecLike | None, **kwargs: Any) -> LatentCodec | None:
        """The codec of a manifest's `vae` field; None (pixel space) when the manifest names none.
        `kwargs` go to `from_pretrained` (cache_dir, device, dtype)."""
        if spec is None:
            return None
        return cls.from_pretrained(spec.model, scaling_factor=spec.scaling_factor, **kwargs)

    # --- shapes --------------------------------------------------------------------------------
    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """(C_z, H / f, W / f) of images (C, H, W); raises `LatentShapeError` if it does not divide."""
        channels, height, width = image_shape
        if channels != self.image_channels or height % self.downsample or width % self.downsample:
            raise LatentShapeError(f"VAE {self.model_id!r} encodes {self.image_channels}-channel images with sides "
                                   f"a multiple of {self.downsample}, not {tuple(image_shape)}")
        return (self.latent_channels, height // self.downsample, width // self.downsample)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # --- the two directions --------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> scaled latents (B, C_z, H/f, W/f), float32, in batches."""
        self.latent_shape(tuple(images.shape[1:]))
        parts = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(self.device, self.dtype)
            mean = self.vae.encode(x).latent_dist.mean
            parts.append(((mean.float() - self.shift_factor) * self.scaling_factor))
        return torch.cat(parts) if parts else torch.zeros((0, *self.latent_shape(tuple(images.shape[1:]))))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """scaled latents (B, C_z, h, w) -> images (B, C, h f, w f) in [-1, 1], float32, in batches."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise LatentShapeError(f"VAE {self.model_id!r} decodes (B, {self.latent_channels}, h, w) latents, "
                                   f"not {tuple(latents.shape)}")
        parts = []
        for start in range(0, latents.shape[0], batch_size):
            z = latents[start:start + batch_size].to(self.device).float() / self.scaling_factor + self.shift_factor
            parts.append(self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1))
        return torch.cat(parts)

    # --- identity ------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 (hex) of the VAE's config, weights and the latent scale and shift: equal
        fingerprints encode equal images to equal latents."""
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps({"config": dict(self.vae.config), "scaling": self.scaling_factor,
                                                "shift": self.shift_factor}, sort_keys=True, default=str).encode())
            for name, tensor in sorted(self.vae.state_dict().items()):
                tensor = tensor.detach().to("cpu").contiguous()
                digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


def images_sha256(images: torch.Tensor) -> str:
    """sha256 (hex) of an image tensor's dtype, shape and bytes."""
    images = images.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{images.dtype}{tuple(images.shape)}".encode())
    digest.update(images.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_cache_key(codec: LatentCodec, inputs_sha256: str) -> str:
    """sha256 (hex) naming the latents of inputs `inputs_sha256` under `codec`."""
    return hashlib.sha256(f"{CACHE_FORMAT}\0{inputs_sha256}\0{codec.fingerprint()}".encode()).hexdigest()


def cached_latents(codec: LatentCodec, images: torch.Tensor, cache_dir: str | Path, *, name: str = "latents",
                   inputs_sha256: str | None = None, batch_size: int = 64) -> torch.Tensor:
    """The latents of `images` (B, C, H, W) in [-1, 1]: read from `cache_dir` when computed before,
    else encoded once and written there atomically (safetensors, under a lock so that concurrent
    processes encode only once). `inputs_sha256` names the inputs when a cheaper hash than the
    images' own is known (a shard's verified sha256); otherwise the image bytes are hashed.
    A cached file whose header does not match is recomputed, never trusted."""
    key = latent_cache_key(codec, inputs_sha256 or images_sha256(images))
    shape = (images.shape[0], *codec.latent_shape(tuple(images.shape[1:])))
    path = Path(cache_dir) / f"{name}-{key[:24]}.safetensors"
    with exclusive(path):
        latents = _read_cached(path, key, shape)
        if latents is None:
            latents = codec.encode(images, batch_size=batch_size).to("cpu").contiguous()
            header = {"format": CACHE_FORMAT, "key": key, "vae": codec.model_id, "shape": json.dumps(list(shape))}
            write_atomically(path, lambda temporary: save_file({"latents": latents}, str(temporary), metadata=header))
    return latents


def _read_cached(path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
            latents = file.get_tensor("latents") if "latents" in file.keys() else None
    except (OSError, SafetensorError, ValueError):
        return None  # torn or foreign: recompute over it
    if header.get("format") != CACHE_FORMAT or header.get("key") != key or latents is None:
        return None
    if tuple(latents.shape) != shape or latents.dtype != torch.float32 or not bool(torch.isfinite(latents).all()):
        return None
    return latents


def encode_dataset(codec: LatentCodec, dataset: ImageDataset, cache_dir: str | Path, *,
                   inputs_sha256: str | None = None, batch_size: int = 64) -> ImageDataset:
    """`dataset` with its images replaced by their (cached) latents; labels and any other fields kept."""
    latents = cached_latents(codec, dataset.images, cache_dir, name=_file_stem(dataset.name),
                             inputs_sha256=inputs_sha256, batch_size=batch_size)
    return dataclasses.replace(dataset, images=latents, name=f"{dataset.name} (latents of {codec.model_id})")


def _file_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64].strip("._")
    return stem or "latents"
