"""A tiny diffusers `AutoencoderKL` (44k parameters, f = 2, 4 latent channels) saved the ways a user
has a VAE: as a plain folder, and inside a Hugging Face hub cache (models--org--name/snapshots/...)."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL

TINY_VAE_ID = "tiny-org/tiny-vae"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16)


def save_in_folder(vae: AutoencoderKL, folder: Path) -> Path:
    vae.save_pretrained(folder)
    return folder


def save_in_hub_cache(vae: AutoencoderKL, cache: Path, model_id: str = TINY_VAE_ID) -> Path:
    """Lay `vae` out as huggingface_hub caches a download; returns the cache root."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    vae.save_pretrained(repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return cache
