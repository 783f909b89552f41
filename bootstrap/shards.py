"""Writing a swarm's data shards: webdataset tars whose bytes depend only on their samples.

A shard is a plain ustar archive of `<key>.png` (the prepared RGB image), `<key>.txt` (its
caption, UTF-8) and `<key>.cls` (its cluster id, decimal), sample after sample in the order given.
Every header field that could vary between machines or runs is fixed (mtime 0, uid/gid 0, empty
user and group names, mode 0644), and PNGs are written without metadata at one zlib level, so the
same samples give the same bytes and hence the same sha256, which the manifest pins. (Pillow and
its zlib are the remaining dependency: another zlib may compress differently; see
`bootstrap.bundled_data`.)

Shards are closed before they would pass `max_bytes` and stored as `<sha256>.tar` in a
content-addressed folder beside the manifest (`shard_folder_beside`).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Optional

import numpy as np

from protocol.hashing import BlobHasher, BlobRef

DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
PNG_COMPRESS_LEVEL = 9
_BLOCK = tarfile.BLOCKSIZE


def shard_folder_beside(manifest_path: str | Path) -> Path:
    """The content-addressed shard folder of a manifest file: `swarm.yaml` -> `swarm.shards/`."""
    path = Path(manifest_path)
    return path.with_name(f"{path.stem}.shards")


def shard_path(folder: str | Path, sha256: str) -> Path:
    return Path(folder) / f"{sha256}.tar"


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes with no metadata chunks, the same bytes on every run."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="RGB").save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buffer.getvalue()


def sample_bytes(png: bytes, caption: bytes) -> int:
    """Bytes a sample adds to a shard: three members, each a header block plus padded content."""
    def member(size: int) -> int:
        return _BLOCK + -(-size // _BLOCK) * _BLOCK
    return member(len(png)) + member(len(caption)) + member(4)


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through it into a `BlobHasher`."""

    def __init__(self, file) -> None:
        super().__init__()
        self.file, self.hasher, self.written = file, BlobHasher(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:  # tarfile asks where it starts
        return self.written

    def write(self, data) -> int:
        self.file.write(data)
        self.hasher.update(data)
        self.written += len(data)
        return len(data)


class ShardWriter:
    """Writes one shard into `folder`: `add` samples, then `finish` names it by its sha256.

    The tar goes straight to a temporary file as it is written (hashed on the way), so memory
    stays at one sample whatever `max_bytes` is.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._temporary = self.folder / f".shard.{os.getpid()}.{id(self)}.tmp"
        self._file = open(self._temporary, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.bytes = 0

    def add(self, key: str, png: bytes, caption: str, cluster: int) -> None:
        """Append one sample; `key` is a dot-free name unique within the shard."""
        caption_bytes = caption.encode("utf-8")
        for extension, data in (("png", png), ("txt", caption_bytes), ("cls", str(cluster).encode())):
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.bytes += sample_bytes(png, caption_bytes)

    def finish(self) -> Optional[BlobRef]:
        """Close the shard and move it to `<sha256>.tar`; None (and nothing kept) if it is empty."""
        self._tar.close()  # writes the end-of-archive blocks, padded to tarfile's record size
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if not self.samples:
            self._temporary.unlink()
            return None
        ref = self._hashing.hasher.finish()
        os.replace(self._temporary, shard_path(self.folder, ref.sha256))
        return ref

    def abandon(self) -> None:
        """Drop a shard that will not be finished (after an error)."""
        if not self._file.closed:
            self._file.close()
        self._temporary.unlink(missing_ok=True)
