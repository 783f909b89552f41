"""Content ids: a two-level SHA-256 hash tree over fixed-size chunks.

A blob is cut into `CHUNK_BYTES` chunks; `chunks_sha256` is the sha256 of their concatenated 32-byte
digests, and the blob's id, the `sha256` of its `BlobRef`, is `blob_root(size, chunks_sha256)`, a
sha256 over both (the shape of BitTorrent v2's piece root, of iroh's BLAKE3 tree at two levels).
Signed records carry a `BlobRef`; a downloader that obtains the chunk digest list from any provider
checks the list against the signed `chunks_sha256` and then every chunk as it arrives, and once
every chunk matched, the whole blob is verified: no second pass over its bytes (protocol 3 also
hashed the whole file in order, which doubled a download's hashing and bounded its speed).

The id is not the `sha256sum` of the file: `blob_ref_of(data).sha256` (or `ddm-swarm`'s own
checks) computes it. A reference whose id is not the root of its size and digest list cannot be
built (`InvalidRecord`), so no record can pair an honest blob's id with another digest list.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from protocol.errors import HashMismatch, InvalidRecord
from protocol.limits import CHUNK_BYTES, MAX_BLOB_BYTES

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
DIGEST_BYTES = 32


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha256_hex(value: object) -> bool:
    # fullmatch, as everywhere in protocol/: `$` alone also accepts a trailing newline
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def chunk_count(size: int) -> int:
    """Number of `CHUNK_BYTES` chunks of a blob of `size` bytes (an empty blob has none)."""
    return -(-size // CHUNK_BYTES)


def chunk_span(index: int, size: int) -> tuple[int, int]:
    """Byte range [start, end) of chunk `index` in a blob of `size` bytes."""
    if not 0 <= index < chunk_count(size):
        raise ValueError(f"chunk {index} is outside a blob of {size} bytes")
    start = index * CHUNK_BYTES
    return start, min(start + CHUNK_BYTES, size)


def digest_list_sha256(digests: Sequence[bytes]) -> str:
    return hashlib.sha256(b"".join(digests)).hexdigest()


def blob_root(size: int, chunks_sha256: str) -> str:
    """A blob's id: the sha256 of its size and of its chunk digest list's sha256 (the tree's root)."""
    return hashlib.sha256(f"ddm-blob/{size}/{chunks_sha256}".encode()).hexdigest()


@dataclass(frozen=True)
class BlobRef:
    """What a signed record promises about a blob: its id (`sha256`, the root of `size` and
    `chunks_sha256`: see the module), its size and its chunk digest list's sha256. Lowercase hex."""

    sha256: str
    size: int
    chunks_sha256: str

    def __post_init__(self) -> None:
        if not is_sha256_hex(self.sha256) or not is_sha256_hex(self.chunks_sha256):
            raise InvalidRecord("blob reference: sha256 values must be 64 lowercase hex characters")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 0 <= self.size <= MAX_BLOB_BYTES:
            raise InvalidRecord(f"blob reference: size must be an integer in [0, {MAX_BLOB_BYTES}]")
        if self.sha256 != blob_root(self.size, self.chunks_sha256):
            raise InvalidRecord(f"blob reference {self.sha256[:12]}: its id is not the root of its size and "
                                f"chunk digest list (protocol 4 ids are hash-tree roots, not file sha256)")

    @classmethod
    def of(cls, size: int, chunks_sha256: str) -> "BlobRef":
        """The reference of a blob of `size` bytes whose chunk digest list hashes to `chunks_sha256`."""
        return cls(blob_root(size, chunks_sha256), size, chunks_sha256)

    @property
    def num_chunks(self) -> int:
        return chunk_count(self.size)

    @property
    def ref_id(self) -> str:
        """One digest of the whole reference: what provider records are filed under. Since protocol 4
        the id alone binds the digest list too; the key's shape is kept."""
        return hashlib.sha256(f"{self.sha256}-{self.size}-{self.chunks_sha256}".encode()).hexdigest()

    def check_digest_list(self, digests: Sequence[bytes]) -> None:
        """Raise `HashMismatch` unless `digests` is this blob's true chunk digest list."""
        if len(digests) != self.num_chunks or any(len(d) != DIGEST_BYTES for d in digests):
            raise HashMismatch(f"chunk digest list for blob {self.sha256[:12]} has the wrong shape")
        if digest_list_sha256(digests) != self.chunks_sha256:
            raise HashMismatch(f"chunk digest list for blob {self.sha256[:12]} does not match the signed record")

    def to_wire(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "chunks_sha256": self.chunks_sha256}


class BlobHasher:
    """Incremental hasher: feed the blob's bytes in order, get its `BlobRef` and chunk digests."""

    def __init__(self) -> None:
        self._chunk = hashlib.sha256()
        self._in_chunk = 0
        self._size = 0
        self.digests: list[bytes] = []

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._size += len(view)
        while len(view):
            take = min(CHUNK_BYTES - self._in_chunk, len(view))
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == CHUNK_BYTES:
                self.digests.append(self._chunk.digest())
                self._chunk, self._in_chunk = hashlib.sha256(), 0

    def finish(self) -> BlobRef:
        if self._in_chunk:
            self.digests.append(self._chunk.digest())
            self._chunk, self._in_chunk = hashlib.sha256(), 0
        return BlobRef.of(self._size, digest_list_sha256(self.digests))


def blob_ref_of(data: bytes) -> BlobRef:
    hasher = BlobHasher()
    hasher.update(data)
    return hasher.finish()


def blob_ref_of_chunks(chunks: Iterable[bytes]) -> tuple[BlobRef, list[bytes]]:
    """`BlobRef` and chunk digests of a blob given as consecutive pieces of any size."""
    hasher = BlobHasher()
    for piece in chunks:
        hasher.update(piece)
    return hasher.finish(), hasher.digests
