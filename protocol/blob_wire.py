"""Framing of the blob protocol: what a downloader asks a provider, and the header of each answer.

One stream carries any number of request/answer pairs, in order:

    downloader -> provider:  frame(BlobRequest)
    provider -> downloader:  frame(BlobResponse), then exactly `response.length` raw bytes

A frame is a 4-byte big-endian length followed by that many bytes of canonical msgpack. Both sides
check the length against a small maximum *before* reading the body, so a peer never buffers more
than `MAX_BLOB_REQUEST_BYTES` (or `MAX_BLOB_RESPONSE_HEADER_BYTES`) for a frame it has not checked.
Requests:

- `digests`: the blob's chunk digest list, `32 * num_chunks` bytes, which the downloader checks
  against the `chunks_sha256` of a signed `BlobRef`;
- `range`: bytes [start, end) of the blob, at most `MAX_RANGE_BYTES` of them;
- `has`: a probe, answered "ok" with no bytes when the provider holds the blob, "not-found" when
  not. The libp2p stream is authenticated, so an "ok" proves that the peer id a provider record
  names really serves the blob (a record naming somebody else's peer id earns "not-found").

Decoding any malformed, non-canonical, oversized or out-of-range input raises
`InvalidBlobRequest` / `InvalidBlobResponse`; nothing else escapes the decoders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.encoding import canonical_decode, canonical_encode
from protocol.errors import InvalidBlobRequest, InvalidBlobResponse, InvalidRecord
from protocol.hashing import is_sha256_hex
from protocol.limits import (MAX_BLOB_BYTES, MAX_BLOB_REQUEST_BYTES, MAX_BLOB_RESPONSE_HEADER_BYTES,
                             MAX_RANGE_BYTES, MAX_STRING_CHARS, PROTOCOL_VERSION)

# libp2p protocol name of the blob stream handler; peers of another protocol version never meet on it.
BLOB_STREAM_PROTOCOL = f"/ddm-swarm/blob/{PROTOCOL_VERSION}"

FRAME_PREFIX_BYTES = 4
OPS = ("digests", "range", "has")
STATUSES = ("ok", "not-found", "bad-request", "busy")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BlobRequest:
    """Ask for a blob's chunk digests or whether it is held (`start == end == 0`), or for bytes [start, end)."""

    op: str
    sha256: str
    start: int = 0
    end: int = 0

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise InvalidBlobRequest(f"blob request: op must be one of {list(OPS)}, got {self.op!r:.40}")
        if not is_sha256_hex(self.sha256):
            raise InvalidBlobRequest("blob request: sha256 must be 64 lowercase hex characters")
        if not _is_int(self.start) or not _is_int(self.end):
            raise InvalidBlobRequest("blob request: start and end must be integers")
        if self.op in ("digests", "has"):
            if self.start != 0 or self.end != 0:
                raise InvalidBlobRequest(f"blob request: a {self.op} request has start = end = 0")
            return
        if not 0 <= self.start < self.end <= MAX_BLOB_BYTES:
            raise InvalidBlobRequest(
                f"blob request: range [{self.start}, {self.end}) must satisfy 0 <= start < end <= {MAX_BLOB_BYTES}")
        if self.end - self.start > MAX_RANGE_BYTES:
            raise InvalidBlobRequest(
                f"blob request: range of {self.end - self.start} bytes is over the limit of {MAX_RANGE_BYTES}")

    @classmethod
    def digests(cls, sha256: str) -> "BlobRequest":
        return cls("digests", sha256)

    @classmethod
    def has(cls, sha256: str) -> "BlobRequest":
        return cls("has", sha256)

    @classmethod
    def range(cls, sha256: str, start: int, end: int) -> "BlobRequest":
        return cls("range", sha256, start, end)

    @property
    def length(self) -> int:
        """Bytes a range request asks for (0 for a digests or has request)."""
        return self.end - self.start

    def encode(self) -> bytes:
        """The whole frame: length prefix and canonical msgpack body."""
        return _frame(canonical_encode({"op": self.op, "sha256": self.sha256, "start": self.start, "end": self.end}))


@dataclass(frozen=True)
class BlobResponse:
    """Header of an answer: `status`, then `length` raw bytes follow (only when status is "ok")."""

    status: str
    length: int = 0
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise InvalidBlobResponse(f"blob response: status must be one of {list(STATUSES)}, got {self.status!r:.40}")
        if not _is_int(self.length) or not 0 <= self.length <= MAX_RANGE_BYTES:
            raise InvalidBlobResponse(f"blob response: length must be an integer in [0, {MAX_RANGE_BYTES}]")
        if self.status != "ok" and self.length != 0:
            raise InvalidBlobResponse(f"blob response: a '{self.status}' answer carries no bytes")
        if not isinstance(self.detail, str) or len(self.detail) > MAX_STRING_CHARS:
            raise InvalidBlobResponse(f"blob response: detail must be a string of at most {MAX_STRING_CHARS} characters")

    @classmethod
    def ok(cls, length: int) -> "BlobResponse":
        return cls("ok", length)

    @classmethod
    def refuse(cls, status: str, detail: str) -> "BlobResponse":
        return cls(status, 0, detail[:MAX_STRING_CHARS])

    def encode(self) -> bytes:
        return _frame(canonical_encode({"status": self.status, "length": self.length, "detail": self.detail}))


def _frame(body: bytes) -> bytes:
    return len(body).to_bytes(FRAME_PREFIX_BYTES, "big") + body


def _body_length(prefix: bytes, limit: int, error: type[Exception], what: str) -> int:
    if not isinstance(prefix, (bytes, bytearray)) or len(prefix) != FRAME_PREFIX_BYTES:
        raise error(f"{what}: a frame starts with a {FRAME_PREFIX_BYTES}-byte length prefix")
    length = int.from_bytes(prefix, "big")
    if not 0 < length <= limit:
        raise error(f"{what}: frame body of {length} bytes is outside (0, {limit}]")
    return length


def _decode_map(body: bytes, limit: int, keys: tuple[str, ...], error: type[Exception], what: str) -> dict:
    try:
        value = canonical_decode(body, max_bytes=limit, what=what)
    except InvalidRecord as problem:
        raise error(str(problem)) from None
    if not isinstance(value, dict) or sorted(value) != sorted(keys):
        raise error(f"{what}: expected a map with exactly the keys {sorted(keys)}")
    return value


def request_body_length(prefix: bytes) -> int:
    """Length of the request body announced by a 4-byte prefix; raise `InvalidBlobRequest` if oversized."""
    return _body_length(prefix, MAX_BLOB_REQUEST_BYTES, InvalidBlobRequest, "blob request")


def decode_request(body: bytes) -> BlobRequest:
    """Decode a request body (the bytes after the prefix); raise `InvalidBlobRequest` on anything else."""
    fields = _decode_map(body, MAX_BLOB_REQUEST_BYTES, ("op", "sha256", "start", "end"), InvalidBlobRequest,
                         "blob request")
    return BlobRequest(fields["op"], fields["sha256"], fields["start"], fields["end"])


def decode_request_frame(frame: bytes) -> BlobRequest:
    """Decode one whole request frame (prefix and body, nothing more)."""
    length = request_body_length(bytes(frame[:FRAME_PREFIX_BYTES]))
    if len(frame) != FRAME_PREFIX_BYTES + length:
        raise InvalidBlobRequest(f"blob request: frame of {len(frame)} bytes does not match its prefix ({length})")
    return decode_request(bytes(frame[FRAME_PREFIX_BYTES:]))


def response_body_length(prefix: bytes) -> int:
    """Length of a response header body announced by a 4-byte prefix; raise `InvalidBlobResponse`."""
    return _body_length(prefix, MAX_BLOB_RESPONSE_HEADER_BYTES, InvalidBlobResponse, "blob response")


def decode_response(body: bytes) -> BlobResponse:
    """Decode a response header body; raise `InvalidBlobResponse` on anything malformed."""
    fields = _decode_map(body, MAX_BLOB_RESPONSE_HEADER_BYTES, ("status", "length", "detail"), InvalidBlobResponse,
                         "blob response")
    return BlobResponse(fields["status"], fields["length"], fields["detail"])


def decode_response_frame(frame: bytes) -> BlobResponse:
    """Decode one whole response header frame (prefix and body, nothing more)."""
    length = response_body_length(bytes(frame[:FRAME_PREFIX_BYTES]))
    if len(frame) != FRAME_PREFIX_BYTES + length:
        raise InvalidBlobResponse(f"blob response: frame of {len(frame)} bytes does not match its prefix ({length})")
    return decode_response(bytes(frame[FRAME_PREFIX_BYTES:]))
