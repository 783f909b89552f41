"""A content-addressed blob cache on disk, with atomic writes and verification on read.

Layout under `root`:

    blobs/ab/<sha256>           the blob's bytes (visible only once complete and verified)
    blobs/ab/<sha256>.digests   its chunk digests: 32 bytes per `CHUNK_BYTES` chunk, concatenated
    partial/<sha256>-<size>-<chunks_sha256>/   a download in progress (see `node.blobs.partial`),
                                named by the whole reference, not the sha256 alone
    quarantine/<sha256>.<time>  blobs that failed verification, kept for inspection
    tmp/                        files being written; never read as blobs

Every file appears under its final name by `os.replace` after `fsync`, digests before data, so a
crash (even SIGKILL or power loss) never leaves a partial blob visible as complete: `has()` is true
only once both files are in place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from node.files import fsync_dir
from protocol.errors import HashMismatch
from protocol.hashing import DIGEST_BYTES, BlobHasher, BlobRef, digest_list_sha256, is_sha256_hex
from protocol.limits import CHUNK_BYTES

logger = logging.getLogger(__name__)

READ_PIECE_BYTES = CHUNK_BYTES
STALE_PARTIAL_AGE_S = 7 * 24 * 3600
CACHE_PARTIAL_AGE_S = 24 * 3600  # a cache's unfinished downloads are resumed within a day, or dropped


class BlobNotFound(KeyError):
    """The store holds no complete blob with this sha256."""

    def __str__(self) -> str:
        return f"blob {self.args[0][:12]}... is not in the local store"


class CorruptBlob(HashMismatch):
    """A stored blob no longer matches its sha256 or chunk digests; it was moved to quarantine."""


@dataclass
class GcReport:
    """What `BlobStore.gc` removed, by sha256, and the bytes it freed."""

    blobs: list[str] = field(default_factory=list)
    partials: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    bytes_freed: int = 0


def hash_file(path: Path) -> tuple[BlobRef, list[bytes]]:
    """`BlobRef` and chunk digests of a file, read in `CHUNK_BYTES` pieces."""
    hasher = BlobHasher()
    with open(path, "rb", buffering=0) as source:
        while piece := source.read(READ_PIECE_BYTES):
            hasher.update(piece)
    return hasher.finish(), hasher.digests


class BlobStore:
    """Blobs named by sha256 under `root`. Safe to share between threads of one process."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        for sub in ("blobs", "partial", "quarantine", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- naming -------------------------------------------------------------------------------------
    @classmethod
    def open_checked(cls, root: str | os.PathLike) -> "BlobStore":
        """The store at `root` after a start-up check (its owner holds it alone): temp files of writes a
        crash cut off removed, corrupt blobs quarantined (a crash or a bad disk must not leave it
        serving bad bytes)."""
        store = cls(root)
        store.remove_leftovers()
        corrupt = store.verify_all()
        if corrupt:
            logger.warning(f"quarantined {len(corrupt)} corrupt blob(s) found at start-up")
        return store

    def _data_path(self, sha256: str) -> Path:
        if not is_sha256_hex(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r:.80}")
        return self.root / "blobs" / sha256[:2] / sha256

    def _digests_path(self, sha256: str) -> Path:
        return self._data_path(sha256).with_suffix(".digests")

    def partial_dir(self, ref: BlobRef) -> Path:
        """Where a download of `ref` keeps its state. Named by the whole reference: a record with an
        honest blob's sha256 and a bogus digest list must not touch the honest download's partial."""
        self._data_path(ref.sha256)  # validates the name
        return self.root / "partial" / f"{ref.sha256}-{ref.size}-{ref.chunks_sha256}"

    def partial_dirs(self, sha256: str) -> list[Path]:
        """Partial downloads of any reference with this sha256."""
        self._data_path(sha256)
        return sorted((self.root / "partial").glob(f"{sha256}-*"))

    def temp_file(self, suffix: str = ".tmp") -> tuple[int, Path]:
        """A new file under `tmp/` (same file system as the blobs, so `os.replace` is atomic)."""
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=suffix)
        return fd, Path(name)

    # ---- queries ------------------------------------------------------------------------------------
    def has(self, sha256: str) -> bool:
        return self._data_path(sha256).is_file() and self._digests_path(sha256).is_file()

    def path(self, sha256: str) -> Path:
        """Path of a complete blob's bytes; raise `BlobNotFound`. Treat the file as read-only."""
        if not self.has(sha256):
            raise BlobNotFound(sha256)
        return self._data_path(sha256)

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def chunk_digests(self, sha256: str) -> list[bytes]:
        """The blob's chunk digests, as stored next to it (32 bytes each)."""
        try:
            raw = self._digests_path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None
        return [raw[i:i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)]

    def digest_bytes(self, sha256: str) -> bytes:
        """The chunk digests concatenated, exactly as the `digests` request of the blob protocol sends them."""
        try:
            return self._digests_path(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def ref(self, sha256: str) -> BlobRef:
        """The `BlobRef` of a stored blob (from its size and stored digests, without re-hashing)."""
        return BlobRef(sha256, self.size(sha256), digest_list_sha256(self.chunk_digests(sha256)))

    def read_range(self, sha256: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a stored blob; raise `ValueError` if the range leaves the blob."""
        size = self.size(sha256)
        if not 0 <= start <= end <= size:
            raise ValueError(f"range [{start}, {end}) is outside blob {sha256[:12]} of {size} bytes")
        with open(self._data_path(sha256), "rb", buffering=0) as source:
            return os.pread(source.fileno(), end - start, start)

    def list(self) -> list[str]:
        """sha256 of every complete blob, sorted."""
        return sorted(path.name for path in self._iter_data_files() if self.has(path.name))

    def _iter_data_files(self) -> Iterator[Path]:
        for shard in sorted((self.root / "blobs").iterdir()):
            for path in shard.iterdir():
                if is_sha256_hex(path.name):
                    yield path

    # ---- writing ------------------------------------------------------------------------------------
    def put_bytes(self, data: bytes) -> BlobRef:
        """Store `data` (idempotent) and return its `BlobRef`."""
        hasher = BlobHasher()
        hasher.update(data)
        ref = hasher.finish()
        if self.has(ref.sha256):
            return ref
        fd, tmp = self.temp_file()
        try:
            with os.fdopen(fd, "wb") as sink:
                sink.write(data)
                sink.flush()
                os.fsync(sink.fileno())
            self.commit(tmp, ref, hasher.digests)
        finally:
            tmp.unlink(missing_ok=True)
        return ref

    def put_file(self, source: str | os.PathLike) -> BlobRef:
        """Copy a file into the store, hashing it in the same pass; return its `BlobRef`."""
        hasher = BlobHasher()
        fd, tmp = self.temp_file()
        try:
            with open(source, "rb", buffering=0) as reader, os.fdopen(fd, "wb") as sink:
                while piece := reader.read(READ_PIECE_BYTES):
                    hasher.update(piece)
                    sink.write(piece)
                sink.flush()
                os.fsync(sink.fileno())
            ref = hasher.finish()
            if not self.has(ref.sha256):
                self.commit(tmp, ref, hasher.digests)
            return ref
        finally:
            tmp.unlink(missing_ok=True)

    def put_own_file(self, path: str | os.PathLike) -> BlobRef:
        """Move a complete, fsynced file from this store's `temp_file()` into the store, hashing it
        first (one read, no second copy as `put_file` makes); return its `BlobRef`."""
        ref, digests = hash_file(Path(path))
        if not self.has(ref.sha256):
            self.commit(Path(path), ref, digests)
        return ref

    def commit(self, complete_file: Path, ref: BlobRef, digests: list[bytes]) -> Path:
        """Make a complete, fsynced file under this store's root visible as blob `ref` (moves it).

        The caller vouches that the file's bytes hash to `ref`; `digests` are checked against it.
        """
        ref.check_digest_list(digests)
        if os.stat(complete_file).st_size != ref.size:
            raise HashMismatch(f"blob {ref.sha256[:12]}: file has the wrong size for its reference")
        data_path = self._data_path(ref.sha256)
        data_path.parent.mkdir(exist_ok=True)
        fd, tmp_digests = self.temp_file(".digests")
        try:
            with os.fdopen(fd, "wb") as sink:
                sink.write(b"".join(digests))
                sink.flush()
                os.fsync(sink.fileno())
            os.replace(tmp_digests, self._digests_path(ref.sha256))
        finally:
            tmp_digests.unlink(missing_ok=True)  # a full disk must not leave it behind
        os.replace(complete_file, data_path)
        fsync_dir(data_path.parent)
        return data_path

    # ---- verification -------------------------------------------------------------------------------
    def verify(self, sha256: str) -> BlobRef:
        """Re-hash a stored blob. If it no longer matches its name or its digests, move it to
        quarantine, log it and raise `CorruptBlob`; a later fetch can then restore it."""
        path = self.path(sha256)
        actual, digests = hash_file(path)
        if actual.sha256 != sha256 or digests != self.chunk_digests(sha256):
            where = self.quarantine(sha256)
            logger.warning("blob %s is corrupt (its bytes hash to %s); moved to %s", sha256[:12],
                           actual.sha256[:12], where)
            raise CorruptBlob(f"blob {sha256[:12]} is corrupt on disk and was quarantined at {where}; fetch it again")
        return actual

    def verify_all(self) -> list[str]:
        """Verify every stored blob; return the sha256 of those found corrupt (now quarantined)."""
        corrupt = []
        for sha256 in self.list():
            try:
                self.verify(sha256)
            except CorruptBlob:
                corrupt.append(sha256)
        return corrupt

    def quarantine(self, sha256: str) -> Path:
        """Move a blob out of the store (into `quarantine/`), so it is never served or used again."""
        target = self.root / "quarantine" / f"{sha256}.{time.time_ns()}"
        self._digests_path(sha256).unlink(missing_ok=True)  # first: `has()` turns false at once
        try:
            os.replace(self._data_path(sha256), target)
        except FileNotFoundError:
            pass
        return target

    # ---- removal ------------------------------------------------------------------------------------
    def delete(self, sha256: str) -> int:
        """Remove a blob (and any partial download of it); return the bytes freed."""
        freed = 0
        for path in (self._digests_path(sha256), self._data_path(sha256)):
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        for partial in self.partial_dirs(sha256):
            freed += _tree_bytes(partial)
            shutil.rmtree(partial, ignore_errors=True)
        return freed

    def gc(self, keep: Iterable[str], *, partial_max_age_s: float = STALE_PARTIAL_AGE_S,
           leftover_age_s: float = 3600.0, in_use: Optional[Iterable[str]] = None) -> GcReport:
        """Remove blobs not in `keep`, partial downloads not in `keep` or untouched for
        `partial_max_age_s`, and leftovers of interrupted writes older than `leftover_age_s` (a
        younger one may be a write in progress). `in_use` (sha256 of downloads in progress) are
        never touched; nor is a partial locked by a running download."""
        from node.blobs.partial import partial_is_locked  # the partial module builds on this one

        keep, in_use = set(keep), set(in_use or ())
        report = GcReport()
        for path in list(self._iter_data_files()):
            if path.name not in keep:
                report.bytes_freed += self.delete(path.name)
                report.blobs.append(path.name)
        now = time.time()
        for partial in (self.root / "partial").iterdir():
            sha = partial.name.split("-")[0]
            try:
                stale = sha not in keep or now - _newest_mtime(partial) > partial_max_age_s
                if stale and sha not in in_use and not partial_is_locked(partial):
                    report.bytes_freed += _tree_bytes(partial)
                    shutil.rmtree(partial, ignore_errors=True)
                    report.partials.append(sha)
            except FileNotFoundError:  # a download in another thread completed (and removed it) meanwhile
                continue
        self.remove_leftovers(older_than_s=leftover_age_s, report=report)
        return report

    def collect(self, max_bytes: int, keep: Iterable[str] = (), *,
                partial_max_age_s: float = CACHE_PARTIAL_AGE_S) -> GcReport:
        """A cache's garbage collection (a generator's store, which serves nobody): partial downloads
        untouched for `partial_max_age_s` go (not locked ones only), then the least recently used
        complete blobs not in `keep` until the blobs take at most `max_bytes`. `touch(sha256)` marks
        a blob as used."""
        from node.blobs.partial import partial_is_locked

        keep, report, now = set(keep), GcReport(), time.time()
        for partial in (self.root / "partial").iterdir():
            try:
                if now - _newest_mtime(partial) > partial_max_age_s and not partial_is_locked(partial):
                    report.bytes_freed += _tree_bytes(partial)
                    shutil.rmtree(partial, ignore_errors=True)
                    report.partials.append(partial.name.split("-")[0])
            except FileNotFoundError:
                continue
        blobs = []
        for path in self._iter_data_files():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            blobs.append((stat.st_mtime, stat.st_size, path.name))
        total = sum(size for _, size, _ in blobs)
        for _, size, sha in sorted(blobs):  # oldest use first
            if total <= max_bytes:
                break
            if sha in keep:
                continue
            report.bytes_freed += self.delete(sha)
            report.blobs.append(sha)
            total -= size
        self.remove_leftovers(older_than_s=3600.0, report=report)
        return report

    def touch(self, sha256: str) -> None:
        """Mark a complete blob as just used (for `collect`'s least-recently-used order)."""
        try:
            os.utime(self._data_path(sha256))
        except FileNotFoundError:
            pass

    def remove_leftovers(self, *, older_than_s: float = 0.0, report: Optional[GcReport] = None) -> GcReport:
        """Delete what interrupted writes left behind: digests of a commit that never finished and
        files under `tmp/` older than `older_than_s` (0 at start-up, when no write can be running).
        Complete blobs and partial downloads are not touched."""
        report = report or GcReport()
        for shard in (self.root / "blobs").iterdir():
            for path in shard.glob("*.digests"):
                if not self._data_path(path.stem).exists():
                    path.unlink(missing_ok=True)
                    report.leftovers.append(str(path.relative_to(self.root)))
        now = time.time()
        for leftover in (self.root / "tmp").iterdir():
            try:
                stat = leftover.stat()
            except FileNotFoundError:  # a write in progress just renamed it
                continue
            if now - stat.st_mtime >= older_than_s:
                report.bytes_freed += stat.st_size
                leftover.unlink(missing_ok=True)
                report.leftovers.append(str(leftover.relative_to(self.root)))
        return report


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _newest_mtime(path: Path) -> float:
    return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])

