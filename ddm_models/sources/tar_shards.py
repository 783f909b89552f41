"""Webdataset `.tar` shards (the LAION / img2dataset layout) as a stream of captioned samples.

A sample is the run of consecutive members sharing a key (the member path up to the first dot of
its file name): `<key>.jpg|jpeg|png|webp` plus `<key>.txt`, or `<key>.json` with a `caption` or
`text` field. Shards are read strictly front to back (`tarfile` stream mode), so a shard from an
`https://` URL is never written to disk or held in memory whole.

Why `tarfile` and not the `webdataset` package: webdataset opens URLs through a `curl`
subprocess and by default raises on the first bad sample, while `swarm create` must skip and count
each bad sample and each shard that breaks off part way, keep going, and name where it happened.
"""

from __future__ import annotations

import json
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from ddm_models.sources import RawSample, SkipReport, SourceError, clean_caption

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # a larger member is no image we can use
URL_TIMEOUT_S = 60.0


class TarShardSource:
    """The samples of `shards` (paths, `file://` or `https://` URLs), shard after shard, in order."""

    def __init__(self, shards: list[str]):
        if not shards:
            raise SourceError("no webdataset shards given")
        self.shards = list(shards)
        self.description = f"webdataset {self.shards[0]}" + (f" (+{len(self.shards) - 1} shards)"
                                                             if len(self.shards) > 1 else "")

    def size_hint(self) -> Optional[int]:
        return None

    def samples(self, report: SkipReport) -> Iterator[RawSample]:
        for shard in self.shards:
            yield from _shard_samples(shard, report)


@contextmanager
def _open_stream(shard: str):
    if shard.startswith(("https://", "http://")):
        try:
            response = urllib.request.urlopen(shard, timeout=URL_TIMEOUT_S)  # noqa: S310 (scheme checked)
        except (OSError, ValueError) as error:
            raise SourceError(f"cannot open {shard}: {error}") from error
        with response:
            yield response
        return
    path = urllib.parse.unquote(urllib.parse.urlparse(shard).path) if shard.startswith("file://") else shard
    try:
        file = open(path, "rb")
    except OSError as error:
        raise SourceError(f"cannot open shard {shard}: {error.strerror or error}") from error
    with file:
        yield file


class _EndCheckingReader:
    """Passes a shard's bytes to tarfile, remembering how many there were and how they ended.

    tarfile's stream mode ends quietly at a header that is cut off, so a shard truncated between
    two members would pass for a whole one; a whole tar is a multiple of 512 bytes that ends in
    at least two zero blocks (the end-of-archive marker).
    """

    def __init__(self, stream) -> None:
        self.stream, self.total, self.tail = stream, 0, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-2 * tarfile.BLOCKSIZE:]
        return data

    def ended_whole(self) -> bool:
        while self.read(1024 * 1024):
            pass
        return self.total % tarfile.BLOCKSIZE == 0 and self.tail == bytes(2 * tarfile.BLOCKSIZE)


def _shard_samples(shard: str, report: SkipReport) -> Iterator[RawSample]:
    name = shard.rsplit("/", 1)[-1]
    key, files = None, {}
    with _open_stream(shard) as stream:
        reader = _EndCheckingReader(stream)
        try:
            with tarfile.open(fileobj=reader, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, extension = _split_name(member.name)
                    if member_key != key:
                        if key is not None:
                            yield from _sample(key, files, name, report)
                        key, files = member_key, {}
                    if member.size > MAX_MEMBER_BYTES:
                        report.skip("oversized shard member", f"{name}:{member.name}")
                        continue
                    data = archive.extractfile(member).read()
                    if len(data) != member.size:  # tarfile returns what there is of a cut-off member
                        raise tarfile.ReadError(f"{member.name} is cut off after {len(data)} of "
                                                f"{member.size} bytes")
                    files[extension] = data
            if not reader.ended_whole():
                raise tarfile.ReadError(f"the shard ends after {reader.total} bytes without an end-of-archive "
                                        f"marker (cut off)")
        except (tarfile.TarError, EOFError, OSError) as error:
            # the samples read so far are kept; the one cut off and the rest of this shard are not
            report.skip("unreadable shard", f"{name}: {type(error).__name__}: {error}")
            return
    if key is not None:
        yield from _sample(key, files, name, report)


def _split_name(member_name: str) -> tuple[str, str]:
    """("dir/000123", "jpg") for "dir/000123.jpg": the key ends at the file name's first dot."""
    folder, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _sample(key: str, files: dict[str, bytes], shard: str, report: SkipReport) -> Iterator[RawSample]:
    where = f"{shard}:{key}"
    image = next((files[ext] for ext in IMAGE_EXTENSIONS if ext in files), None)
    if image is None:
        report.skip("sample without an image", where)
        return
    caption = clean_caption(files.get("txt"))
    if caption is None and "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            caption = clean_caption(meta.get("caption", meta.get("text")))
    if caption is None:
        report.skip("missing caption", where)
        return
    yield RawSample(where, image, caption)
