"""Captioned coloured shapes as WebDataset shards: a small RGB data set whose captions say what is
in each picture ("a red circle"), so a model conditioned on them has something to learn."""

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (240, 220, 40)}
SHAPES = ("square", "circle")


def shape_picture(colour: str, shape: str, rng: random.Random, side: int = 32) -> Image.Image:
    """One RGB picture: a `colour` `shape` of random size and place on a dark grey background."""
    image = Image.new("RGB", (side, side), (40, 40, 40))
    size = rng.randint(side // 2, side - 6)
    left, top = rng.randint(1, side - size - 1), rng.randint(1, side - size - 1)
    box = (left, top, left + size, top + size)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shape_shard(path: Path, samples: list[tuple[str, str]], seed: int = 0, caption_as: str = "txt",
                      clusters: list[int] | None = None, side: int = 32) -> Path:
    """A WebDataset shard of one `side`-pixel picture per (colour, shape) in `samples`, captioned "a <colour>
    <shape>" in `<key>.txt` (or as the "caption" field of `<key>.json`), with `<key>.cls` holding
    `clusters[i]` when given. Keys are `<shard name>-<i>`."""
    rng = random.Random(seed)
    with tarfile.open(path, "w") as tar:
        for i, (colour, shape) in enumerate(samples):
            key = f"{path.stem}-{i:05d}"
            buffer = io.BytesIO()
            shape_picture(colour, shape, rng, side).save(buffer, format="PNG")
            _add(tar, f"{key}.png", buffer.getvalue())
            caption = f"a {colour} {shape}"
            if caption_as == "txt":
                _add(tar, f"{key}.txt", caption.encode())
            else:
                _add(tar, f"{key}.json", json.dumps({"caption": caption}).encode())
            if clusters is not None:
                _add(tar, f"{key}.cls", str(clusters[i]).encode())
    return path
