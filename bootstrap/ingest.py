"""Read a source once into a spool on disk: every usable image prepared and PNG-encoded, its caption.

The spool is three append-only files in a work folder: `images.bin` (the PNGs back to back),
`captions.bin` (UTF-8 captions back to back) and `ends.i64` (little-endian int64 pairs: where
sample i's PNG and caption end). Memory stays at one sample whatever the collection's size; later
steps (embedding, sharding) read samples back by index through memory maps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from bootstrap.progress import progress_bar
from bootstrap.shards import encode_png
from ddm_models.sources import CaptionedImageSource, EmptySource, SkipReport
from ddm_models.sources.prepare import UnreadableImage, prepare_image

MAX_CAPTION_BYTES = 4096  # longer captions are cut (at a character boundary): they are prompts, not texts


@dataclasses.dataclass
class Spool:
    """Samples 0..count-1 of a read source, in source order. Read with `png(i)` and `caption(i)`."""

    folder: Path
    count: int
    samples_read: int  # samples the source yielded, usable or not (count <= samples_read)

    def __post_init__(self) -> None:
        # The offsets are memory-mapped (16 bytes per sample); the PNGs and captions are read with
        # pread, so the spool of a million images stays in the page cache, not in this process.
        self._ends = np.memmap(self.folder / "ends.i64", dtype="<i8", mode="r", shape=(self.count, 2))
        self._images = os.open(self.folder / "images.bin", os.O_RDONLY)
        self._captions = os.open(self.folder / "captions.bin", os.O_RDONLY)

    def _read(self, fd: int, index: int, column: int) -> bytes:
        start = int(self._ends[index - 1, column]) if index else 0
        return os.pread(fd, int(self._ends[index, column]) - start, start)

    def png(self, index: int) -> bytes:
        return self._read(self._images, index, 0)

    def caption(self, index: int) -> str:
        return self._read(self._captions, index, 1).decode("utf-8")

    def close(self) -> None:
        os.close(self._images)
        os.close(self._captions)

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pixels(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 of sample `index`, decoded from its PNG."""
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.png(index))) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)


def spool_source(source: CaptionedImageSource, folder: Path, image_size: int, report: SkipReport) -> Spool:
    """Stream `source` once into a spool in `folder`: decode, composite on white, centre-crop,
    resize to (image_size, image_size) RGB, PNG-encode. Counts every skip in `report`; raises
    `EmptySource` if nothing usable remains."""
    folder.mkdir(parents=True, exist_ok=True)
    count = seen = image_end = caption_end = 0
    with open(folder / "images.bin", "wb") as images, open(folder / "captions.bin", "wb") as captions, \
            open(folder / "ends.i64", "wb") as ends, progress_bar("reading images", source.size_hint()) as bar:
        for sample in source.samples(report):
            seen += 1
            bar.advance()
            try:
                png = encode_png(prepare_image(sample.image, image_size))
            except UnreadableImage as error:
                report.skip("unreadable image", f"{sample.key}: {error}")
                continue
            caption = sample.caption.encode("utf-8")[:MAX_CAPTION_BYTES].decode("utf-8", errors="ignore")
            caption_bytes = caption.encode("utf-8")
            images.write(png)
            captions.write(caption_bytes)
            image_end, caption_end = image_end + len(png), caption_end + len(caption_bytes)
            ends.write(np.array([image_end, caption_end], dtype="<i8").tobytes())
            report.keep()
            count += 1
    if count == 0:
        raise EmptySource(f"{source.description} has no usable captioned image ({report.summary()}"
                          + _examples(report) + ")")
    return Spool(folder, count, seen)


def _examples(report: SkipReport) -> str:
    named = [f"{reason}: {items[0]}" for reason, items in sorted(report.examples.items()) if items]
    return f"; e.g. {'; '.join(named[:3])}" if named else ""
