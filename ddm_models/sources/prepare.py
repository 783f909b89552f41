"""Decode one image file into the swarm's pixels: RGB on white, centre-cropped square, resized.

Done once per image by `swarm create`; the shards then hold exactly these pixels, so every node
trains on the same bytes whatever Pillow build it has.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from ddm_models.sources import SourceError

# Larger images are refused rather than decoded: a 16k x 16k photo is 768 MB of RGB.
MAX_SOURCE_PIXELS = 8192 * 8192


class UnreadableImage(SourceError):
    """An image file does not decode (truncated, not an image, too large)."""


def prepare_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> (size, size, 3) uint8 RGB.

    Transparent pixels are composited onto white (emoji, logos), the largest centred square is
    kept, then resized with bicubic filtering (Pillow's resize low-pass filters when shrinking).
    """
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > MAX_SOURCE_PIXELS:
                    raise UnreadableImage(f"{image.width}x{image.height} pixels is more than {MAX_SOURCE_PIXELS}")
                image.load()
                rgb = _on_white(image)
    except UnreadableImage:
        raise
    # Pillow reports broken files as any of these, depending on the format plug-in.
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"{type(error).__name__}: {error}") from None
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    square = rgb.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def _on_white(image):
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
