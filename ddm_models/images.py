"""Images out: sample tensors to PNG grids a person can look at, with their prompts if wanted."""

from __future__ import annotations

import os
import textwrap
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
    return _save_png(to_grid(images, columns, **options), path)


def to_prompt_grid(images: torch.Tensor, prompts: list[str], columns: int, *, scale: int = 4, padding: int = 4,
                   font_size: int = 11, caption_lines: int = 3):
    """A PIL RGB image of `images` (N, C, H, W) in [-1, 1] (C = 1 or 3) in rows of `columns`,
    each magnified `scale` times with its prompt written under it (wrapped to the image's width,
    at most `caption_lines` lines, the rest elided)."""
    from PIL import Image, ImageDraw, ImageFont

    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    tiles = to_grid(images, 1, scale=scale, padding=0).convert("RGB")  # one column: tile i is rows i*side..
    side_h, side_w = images.shape[2] * scale, images.shape[3] * scale
    font = ImageFont.load_default(size=font_size)
    line_h = font_size + 2
    chars = max(4, int(side_w / (0.6 * font_size)))  # a proportional font's mean advance is ~0.6 em
    cell_w, cell_h = side_w + padding, side_h + caption_lines * line_h + 2 * padding
    rows = -(-len(prompts) // columns)
    grid = Image.new("RGB", (columns * cell_w + padding, rows * cell_h + padding), "white")
    draw = ImageDraw.Draw(grid)
    for index, prompt in enumerate(prompts):
        left, top = padding + (index % columns) * cell_w, padding + (index // columns) * cell_h
        grid.paste(tiles.crop((0, index * side_h, side_w, (index + 1) * side_h)), (left, top))
        lines = textwrap.wrap(prompt, chars, max_lines=caption_lines, placeholder="...") or [""]
        for line_number, line in enumerate(lines):
            draw.text((left, top + side_h + 2 + line_number * line_h), line, fill="black", font=font)
    return grid


def save_prompt_grid(images: torch.Tensor, prompts: list[str], path: str | Path, columns: int | None = None,
                     **options) -> Path:
    """Write `to_prompt_grid` (default: up to 8 columns) as a PNG atomically; returns the path."""
    columns = columns or min(8, len(prompts))
    return _save_png(to_prompt_grid(images, prompts, columns, **options), path)


def _save_png(image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
