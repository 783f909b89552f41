"""Small captioned image collections on disk, in each layout `swarm create` reads.

Samples are `ddm_models.sources.shapes.shape_sample(i)`: coloured shapes captioned with colour
and shape ("a small red circle"), so a test can check what went where.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

from ddm_models.sources.shapes import shape_sample


def write_image_folder(root: Path, count: int, *, layout: str = "jsonl", seed: int = 0) -> Path:
    """`count` PNGs in `root/images/`, captioned by layout "jsonl" (metadata.jsonl), "csv"
    (metadata.csv) or "sidecar" (`<image>.txt`)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        png, caption = shape_sample(index, seed)
        name = f"images/{index:04d}.png"
        (root / name).write_bytes(png)
        rows.append({"file_name": name, "text": caption})
        if layout == "sidecar":
            (root / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    if layout == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif layout == "csv":
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def write_tar_shard(path: Path, start: int, count: int, *, caption_as: str = "txt", seed: int = 0) -> Path:
    """A webdataset shard of samples start..start+count-1: `<key>.png` + `<key>.txt` (or `.json`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for index in range(start, start + count):
            png, caption = shape_sample(index, seed)
            text = caption.encode() if caption_as == "txt" else json.dumps({"caption": caption}).encode()
            for name, data in ((f"{index:06d}.png", png), (f"{index:06d}.{caption_as}", text)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def write_parquet(path: Path, count: int, *, seed: int = 0) -> Path:
    """A parquet file as `datasets.Dataset.to_parquet` writes an image data set: `image` is a
    struct of {bytes, path}, `text` the caption."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = [shape_sample(index, seed) for index in range(count)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": png, "path": None} for png, _ in samples], type=image_type),
                      "text": pa.array([caption for _, caption in samples])})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=16)
    return path
