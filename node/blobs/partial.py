"""A download in progress, kept on disk so that a killed download resumes where it stopped.

    partial/<ref>/ref        the `BlobRef` being fetched (canonical msgpack); <ref> names all of it
    partial/<ref>/digests    its chunk digest list, once obtained and checked against the ref
    partial/<ref>/data       the blob's bytes, written at their offsets; created (and its blocks
                             reserved) only once the digest list checks out, so a record whose
                             providers never deliver costs no disk (review finding 8)
    partial/<ref>/verified   append-only log of verified chunk indices (4 bytes each, big-endian)
    partial/<ref>/lock       flock'ed while a process downloads, so two never write one partial

The log is appended right after a verified chunk is written, so it survives SIGKILL. It is still
only a hint: on resume every chunk it names is hashed again from disk against its digest (power
loss may persist the log before the data). Once every chunk is verified the blob is (its id is the
root of the digest list, see `protocol.hashing`), and `complete()` moves it into the store.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from protocol.encoding import canonical_decode, canonical_encode
from protocol.errors import HashMismatch, ProtocolError
from protocol.hashing import DIGEST_BYTES, BlobRef, chunk_span
from node.blobs.store import BlobStore
from node.files import fsync_dir

_INDEX_BYTES = 4


class DownloadInProgress(RuntimeError):
    """Another process (or task) holds the partial download of this blob."""


def partial_is_locked(directory: Path) -> bool:
    """Whether some open `PartialDownload` holds the lock of this partial directory."""
    try:
        fd = os.open(directory / "lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have just taken
    return False


class PartialDownload:
    """The on-disk state of one blob's download. Methods that touch the disk block: call them
    from a worker thread inside an event loop. `write_chunk`/`read_chunk` are thread-safe."""

    def __init__(self, store: BlobStore, ref: BlobRef) -> None:
        self.store, self.ref = store, ref
        self.directory = store.partial_dir(ref)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DownloadInProgress(f"blob {ref.sha256[:12]} is already being downloaded into {self.directory}")
        self._data_fd = self._log_fd = -1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        ref_path = self.directory / "ref"
        if self._stored_ref() != self.ref:  # a new download, or one of a different ref: start over
            for name in ("data", "digests", "verified"):
                (self.directory / name).unlink(missing_ok=True)
            _write_atomically(ref_path, canonical_encode(self.ref.to_wire()))
        self._log_fd = os.open(self.directory / "verified", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.digests: Optional[list[bytes]] = self._stored_digests()
        if self.digests is not None:
            self._open_data()

    def _open_data(self) -> None:
        if self._data_fd >= 0:
            return
        self._data_fd = os.open(self.directory / "data", os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._data_fd).st_size != self.ref.size:
            os.ftruncate(self._data_fd, self.ref.size)
        self._reserve_space()

    def _reserve_space(self) -> None:
        # Blocks reserved up front: a full disk fails here, clearly, not half way through a download.
        if self.ref.size == 0:
            return
        try:
            os.posix_fallocate(self._data_fd, 0, self.ref.size)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"not enough free disk space for blob {self.ref.sha256[:12]} "
                                            f"({self.ref.size} bytes) under {self.directory}; free some space or "
                                            f"run the store's gc") from None
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without fallocate
                raise

    def _stored_ref(self) -> Optional[BlobRef]:
        try:
            wire = canonical_decode((self.directory / "ref").read_bytes(), what="partial download ref")
            return BlobRef(wire["sha256"], wire["size"], wire["chunks_sha256"])
        except (FileNotFoundError, ProtocolError, KeyError, TypeError):
            return None

    def _stored_digests(self) -> Optional[list[bytes]]:
        try:
            raw = (self.directory / "digests").read_bytes()
        except FileNotFoundError:
            return None
        digests = [raw[i:i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)]
        try:
            self.ref.check_digest_list(digests)
        except HashMismatch:
            return None
        return digests

    @property
    def data_path(self) -> Path:
        return self.directory / "data"

    def set_digests(self, digests: list[bytes]) -> None:
        """Keep a digest list that has been checked against the ref (raises `HashMismatch` otherwise);
        only now is the data file created and its space reserved."""
        self.ref.check_digest_list(digests)
        _write_atomically(self.directory / "digests", b"".join(digests))
        self.digests = list(digests)
        self._open_data()

    def logged_chunks(self) -> list[int]:
        """Chunk indices a previous run recorded as verified (to be checked again: see `recheck`)."""
        raw = (self.directory / "verified").read_bytes()
        raw = raw[: len(raw) - len(raw) % _INDEX_BYTES]  # a torn last entry is ignored
        count = self.ref.num_chunks
        indices = {int.from_bytes(raw[i:i + _INDEX_BYTES], "big") for i in range(0, len(raw), _INDEX_BYTES)}
        return sorted(i for i in indices if i < count)

    def recheck(self, indices: Iterable[int]) -> list[int]:
        """Of `indices`, those whose bytes on disk match their digest (needs `digests`)."""
        assert self.digests is not None, "recheck needs the digest list"
        good = []
        for index in indices:
            if hashlib.sha256(self.read_chunk(index)).digest() == self.digests[index]:
                good.append(index)
        return good

    def write_chunk(self, index: int, data: bytes | memoryview) -> None:
        start, end = chunk_span(index, self.ref.size)
        if len(data) != end - start:
            raise ValueError(f"chunk {index} must be {end - start} bytes, got {len(data)}")
        view = memoryview(data)
        while len(view):
            written = os.pwrite(self._data_fd, view, start)
            view, start = view[written:], start + written

    def read_chunk(self, index: int) -> bytes:
        start, end = chunk_span(index, self.ref.size)
        return os.pread(self._data_fd, end - start, start)

    def record_verified(self, index: int) -> None:
        """Log a chunk as verified; call only after its bytes were written by `write_chunk`."""
        os.write(self._log_fd, index.to_bytes(_INDEX_BYTES, "big"))

    def complete(self) -> Path:
        """Move the finished file into the store. The caller has verified every chunk."""
        assert self.digests is not None, "complete needs the digest list"
        os.fsync(self._data_fd)
        path = self.store.commit(self.data_path, self.ref, self.digests)
        self.discard()
        return path

    def discard(self) -> None:
        """Forget this download: close it and delete its directory."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.close()

    def close(self) -> None:
        """Release the files and the lock, keeping what is on disk for a later resume."""
        for name in ("_data_fd", "_log_fd", "_lock_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)  # closing the lock file releases the flock
                setattr(self, name, -1)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as sink:
        sink.write(data)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
