"""Images out: sample tensors to PNG grids a person can look at."""

from __future__ import annotations

from pathlib import Path

import torch


def to_grid(images: torch.Tensor, columns: int, *, scale: int = 1, padding: int = 1):
    """A PIL image of `images` (N, C, H, W) in [-1, 1] (C = 1 or 3) in rows of `columns`, each
    image magnified `scale` times with `padding` pixels between them."""
    from PIL import Image

    n, channels, height, width = images.shape
    if channels not in (1, 3):
        raise ValueError(f"can draw 1- or 3-channel images, got {channels} channels (decode latents first)")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if scale > 1:
        pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        height, width = height * scale, width * scale
    rows = -(-n // columns)
    grid = torch.full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding), 255,
                      dtype=torch.uint8)
    for index in range(n):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = pixels[index]
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0], mode="L") if channels == 1 else Image.fromarray(array, mode="RGB")


def save_grid(images: torch.Tensor, columns: int, path: str | Path, **options) -> Path:
    """Write `to_grid(images, columns)` as a PNG atomically; returns the path."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    to_grid(images, columns, **options).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
