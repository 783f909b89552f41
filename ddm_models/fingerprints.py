"""Seeded-sample fingerprints (after Kim et al., "Generative Artificial Intelligence Consensus in a
Trustless Network"): a few images sampled from an expert with fixed seeds and few steps, each
reduced to a 64-bit difference hash (dHash: 9x8 grey thumbnail, one bit per horizontally adjacent
pair, 1 where the left pixel is brighter). Two honest peers sampling the same checkpoint get the
same bits unless float rounding flips a near-tie; whether it does across thread counts is measured
by `benchmarks/audit_agreement.py`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ddm_models.sampling import EnsembleSampler, LoadedExpert
from ddm_models.text import TextEncoder

FINGERPRINT_PROMPTS = ("a digit zero", "a digit three", "a digit seven")
FINGERPRINT_STEPS = 4


def dhash(image: np.ndarray) -> str:
    """64-bit difference hash (16 hex chars) of one image (C, H, W) in [-1, 1]."""
    grey = ((np.clip(image.mean(axis=0), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    thumb = np.asarray(Image.fromarray(grey, mode="L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (thumb[:, :-1] > thumb[:, 1:]).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


@torch.no_grad()
def sample_fingerprint(expert: LoadedExpert, text_encoder: TextEncoder, *, seed: int,
                       prompts: Sequence[str] = FINGERPRINT_PROMPTS, steps: int = FINGERPRINT_STEPS) -> str:
    """The concatenated dHashes of `expert`'s samples of `prompts` (noise from `seed`, `steps` Euler
    steps, no guidance so no router is involved): 16 hex chars per prompt."""
    sampler = EnsembleSampler([expert], None, "top1", text_encoder=text_encoder)
    images = sampler.sample(list(prompts), num_steps=steps, guidance_scale=1.0, seed=seed, device="cpu").images
    return "".join(dhash(image) for image in images.float().numpy())


def hamming(a: str, b: str) -> int:
    """Bits that differ between two fingerprints of equal length (hex strings)."""
    return bin(int(a, 16) ^ int(b, 16)).count("1") if a and b and len(a) == len(b) else 64 * max(len(a), len(b)) // 16
