"""Parquet files of images and captions, as Hugging Face `datasets` exports them (`to_parquet`, the
Hub's parquet conversion): an image column of `{bytes, path}` structs (or plain binary) and a text
caption column. Read a row group's batch at a time with pyarrow, so memory stays at one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

from ddm_models.sources import RawSample, SkipReport, SourceError, clean_caption

BATCH_ROWS = 256


class ParquetSource:
    """The rows of `files`, file after file, in row order."""

    def __init__(self, files: list[Path], *, caption_column: str = "text", image_column: str = "image"):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as error:
            raise SourceError("reading parquet needs pyarrow (pip install pyarrow)") from error
        self.files, self.caption_column, self.image_column = [Path(f) for f in files], caption_column, image_column
        self.description = f"parquet {self.files[0]}" + (f" (+{len(self.files) - 1} files)"
                                                         if len(self.files) > 1 else "")

    def size_hint(self) -> Optional[int]:
        import pyarrow.parquet as pq

        try:
            return sum(pq.ParquetFile(path).metadata.num_rows for path in self.files)
        except (OSError, ValueError):
            return None  # the error is reported, with its file, when the rows are read

    def samples(self, report: SkipReport) -> Iterator[RawSample]:
        for path in self.files:
            yield from self._file_samples(path, report)

    def _file_samples(self, path: Path, report: SkipReport) -> Iterator[RawSample]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as error:
            raise SourceError(f"{path} is not a readable parquet file: {error}") from error
        names = file.schema_arrow.names
        for column in (self.image_column, self.caption_column):
            if column not in names:
                raise SourceError(f"{path} has no column '{column}'; its columns are {names[:20]} "
                                  f"(choose them with --image-column / --caption-column)")
        row = 0
        try:
            for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=[self.image_column, self.caption_column]):
                images = batch.column(self.image_column).to_pylist()
                captions = batch.column(self.caption_column).to_pylist()
                for image, caption in zip(images, captions):
                    where = f"{path.name} row {row}"
                    row += 1
                    data = image.get("bytes") if isinstance(image, dict) else image
                    caption = clean_caption(caption)
                    if caption is None:
                        report.skip("missing caption", where)
                    elif not isinstance(data, bytes) or not data:
                        report.skip("unreadable image", f"{where}: no image bytes")
                    else:
                        yield RawSample(where, data, caption)
        except (OSError, pa.ArrowException) as error:
            report.skip("unreadable parquet row group", f"{path.name} after row {row}: {error}")
