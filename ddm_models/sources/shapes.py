"""A synthetic captioned collection: coloured shapes on white, captioned with colour and shape.

Like scikit-learn's `make_blobs`: data with a known structure for tests and benchmarks ("a red
circle", "a small blue square"), generated from a seed, with no files needed. `ShapesSource` is a
source like any other.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Optional

import numpy as np

from ddm_models.sources import RawSample, SkipReport

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20),
           "purple": (140, 50, 170), "orange": (250, 130, 20)}
SHAPES = ("circle", "square", "triangle")


def shape_sample(index: int, seed: int = 0, pixels: int = 48) -> tuple[bytes, str]:
    """(PNG bytes, caption) of sample `index`: one shape of a random colour, size and position."""
    from PIL import Image, ImageDraw

    rng = np.random.Generator(np.random.PCG64([seed, index]))
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    small = bool(rng.integers(2))
    radius = pixels * (0.18 if small else 0.34)
    cx, cy = (pixels / 2 + rng.uniform(-0.1, 0.1, 2) * pixels)
    image = Image.new("RGB", (pixels, pixels), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=COLOURS[colour])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), f"a {'small ' if small else ''}{colour} {shape}"


class ShapesSource:
    """`count` coloured shapes, generated on the fly from `seed`."""

    def __init__(self, count: int, seed: int = 0, pixels: int = 48):
        self.count, self.seed, self.pixels = count, seed, pixels
        self.description = f"synthetic coloured shapes ({count}, seed {seed})"

    def size_hint(self) -> Optional[int]:
        return self.count

    def samples(self, report: SkipReport) -> Iterator[RawSample]:
        for index in range(self.count):
            png, caption = shape_sample(index, self.seed, self.pixels)
            yield RawSample(f"shape-{index:07d}", png, caption)
