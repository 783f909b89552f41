"""A folder of captioned images, in the layouts Hugging Face `imagefolder` and img2dataset users have.

1. If the folder holds `metadata.jsonl` or `metadata.csv` files (at any depth), they list the
   samples: each row names `file_name` (relative to the metadata file's folder) and a caption
   column (default `text`). Rows are read one at a time; images no row names are not used.
2. Otherwise every image file under the folder is a sample, captioned by the `.txt` file of the
   same stem beside it (`cat.jpg` + `cat.txt`).

Files are visited in sorted path order, so the same folder always gives the same stream.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from ddm_models.sources import RawSample, SkipReport, SourceError, clean_caption

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


class ImageFolderSource:
    """Images under `root` with captions from metadata files or `.txt` sidecars (see the module)."""

    def __init__(self, root: Path, *, caption_column: str = "text"):
        self.root, self.caption_column = Path(root), caption_column
        self.metadata = sorted(p for p in self.root.rglob("metadata.*") if p.name in METADATA_NAMES)
        layout = "metadata " + ", ".join(str(p.relative_to(self.root)) for p in self.metadata[:3]) \
            if self.metadata else "sidecar .txt captions"
        self.description = f"imagefolder {self.root} ({layout})"

    def size_hint(self) -> Optional[int]:
        return None

    def samples(self, report: SkipReport) -> Iterator[RawSample]:
        if self.metadata:
            for metadata in self.metadata:
                yield from self._from_metadata(metadata, report)
        else:
            yield from self._from_sidecars(report)

    # --- layout 1: metadata files -------------------------------------------------------------
    def _from_metadata(self, metadata: Path, report: SkipReport) -> Iterator[RawSample]:
        for line, row in _metadata_rows(metadata, report):
            where = f"{metadata.relative_to(self.root)} row {line}"
            name = row.get("file_name")
            if not isinstance(name, str) or not name:
                report.skip("metadata row without file_name", where)
                continue
            path = (metadata.parent / name).resolve()
            if not path.is_relative_to(self.root.resolve()):
                report.skip("file_name outside the folder", where)
                continue
            caption = clean_caption(row.get(self.caption_column))
            if caption is None:
                report.skip("missing caption", f"{where} ({name}: no '{self.caption_column}')")
                continue
            data = _read(path, report, f"{where} ({name})")
            if data is not None:
                yield RawSample(str(path.relative_to(self.root.resolve())), data, caption)

    # --- layout 2: sidecar captions -----------------------------------------------------------
    def _from_sidecars(self, report: SkipReport) -> Iterator[RawSample]:
        found = False
        for path in _walk_sorted(self.root):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            found = True
            where = str(path.relative_to(self.root))
            sidecar = path.with_suffix(".txt")
            caption = clean_caption(_read(sidecar, None, where)) if sidecar.is_file() else None
            if caption is None:
                report.skip("missing caption", f"{where} (no {sidecar.name})")
                continue
            data = _read(path, report, where)
            if data is not None:
                yield RawSample(where, data, caption)
        if not found:
            raise SourceError(f"{self.root} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no "
                              f"{' or '.join(METADATA_NAMES)}")


def _metadata_rows(path: Path, report: SkipReport) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a metadata.jsonl or metadata.csv, read one row at a time."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as file:
            if path.suffix == ".csv":
                for line, row in enumerate(csv.DictReader(file), start=2):
                    yield line, row
                return
            for line, text in enumerate(file, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except ValueError:
                    report.skip("metadata row that is not JSON", f"{path.name} line {line}")
                    continue
                if isinstance(row, dict):
                    yield line, row
                else:
                    report.skip("metadata row that is not JSON", f"{path.name} line {line}")
    except (OSError, csv.Error) as error:
        raise SourceError(f"cannot read {path}: {error}") from error


def _read(path: Path, report: Optional[SkipReport], where: str) -> Optional[bytes]:
    try:
        return path.read_bytes()
    except OSError as error:
        if report is not None:
            report.skip("unreadable image", f"{where}: {error.strerror or error}")
        return None


def _walk_sorted(root: Path) -> Iterator[Path]:
    """Every file under `root`, depth first, names sorted within each folder."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            yield Path(folder) / name
