"""Field checkers for wire records: each returns the checked value or raises `InvalidRecord`.

A checker is called with `wire=True` on values decoded from the network (types must be exact, so
the canonical bytes are unique) and with `wire=False` on values built locally (ints are accepted
where floats are meant, for convenience).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

from protocol.errors import InvalidRecord
from protocol.hashing import BlobRef, is_sha256_hex
from protocol.jobs import Job
from protocol.limits import MAX_MADDRS, MAX_STRING_CHARS

Checker = Callable[[str, Any, bool], Any]

_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{32,128}$")  # base58btc, as libp2p peer ids are written
_MADDR = re.compile(r"^/[\x21-\x7e]{1,255}$")


def text(*, max_chars: int = MAX_STRING_CHARS, pattern: Optional[str] = None,
         choices: Optional[Sequence[str]] = None, allow_empty: bool = False) -> Checker:
    compiled = re.compile(pattern) if pattern else None

    def check(name: str, value: Any, wire: bool) -> str:
        if not isinstance(value, str):
            raise InvalidRecord(f"field '{name}' must be a string, got {type(value).__name__}")
        if not value and not allow_empty:
            raise InvalidRecord(f"field '{name}' must not be empty")
        if len(value) > max_chars:
            raise InvalidRecord(f"field '{name}' is longer than {max_chars} characters")
        if choices is not None and value not in choices:
            raise InvalidRecord(f"field '{name}' must be one of {list(choices)}, got {value!r}")
        if compiled is not None and value and not compiled.fullmatch(value):
            raise InvalidRecord(f"field '{name}' has an invalid format: {value[:64]!r}")
        return value

    return check


def integer(low: int = 0, high: int = 2**63 - 1) -> Checker:
    def check(name: str, value: Any, wire: bool) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRecord(f"field '{name}' must be an integer, got {type(value).__name__}")
        if not low <= value <= high:
            raise InvalidRecord(f"field '{name}' must be in [{low}, {high}], got {value}")
        return value

    return check


def real(low: float = -math.inf, high: float = math.inf) -> Checker:
    def check(name: str, value: Any, wire: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, (float,) if wire else (float, int)):
            raise InvalidRecord(f"field '{name}' must be a float, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidRecord(f"field '{name}' must be a finite number in [{low}, {high}], got {value}")
        return value

    return check


def sha256_hex(*, allow_empty: bool = False) -> Checker:
    def check(name: str, value: Any, wire: bool) -> str:
        if allow_empty and value == "":
            return value
        if not is_sha256_hex(value):
            raise InvalidRecord(f"field '{name}' must be a sha256 as 64 lowercase hex characters")
        return value

    return check


def peer_id() -> Checker:
    def check(name: str, value: Any, wire: bool) -> str:
        if not isinstance(value, str) or not _PEER_ID.fullmatch(value):
            raise InvalidRecord(f"field '{name}' must be a base58 libp2p peer id")
        return value

    return check


def maddrs() -> Checker:
    def check(name: str, value: Any, wire: bool) -> tuple:
        if not isinstance(value, (list, tuple)) or len(value) > MAX_MADDRS:
            raise InvalidRecord(f"field '{name}' must be a list of at most {MAX_MADDRS} multiaddrs")
        for item in value:
            if not isinstance(item, str) or not _MADDR.fullmatch(item):
                raise InvalidRecord(f"field '{name}' holds an invalid multiaddr: {str(item)[:64]!r}")
        return tuple(value)

    return check


def blob_ref() -> Checker:
    def check(name: str, value: Any, wire: bool) -> BlobRef:
        if isinstance(value, BlobRef) and not wire:
            return value
        if not isinstance(value, dict) or set(value) != {"sha256", "size", "chunks_sha256"}:
            raise InvalidRecord(f"field '{name}' must be a blob reference {{sha256, size, chunks_sha256}}")
        return BlobRef(value["sha256"], value["size"], value["chunks_sha256"])

    return check


def signature() -> Checker:
    def check(name: str, value: Any, wire: bool) -> bytes:
        if not isinstance(value, bytes) or len(value) not in (0, 64):
            raise InvalidRecord(f"field '{name}' must be a 64-byte ed25519 signature")
        return value

    return check


def job(*, allow_empty: bool = False) -> Checker:
    """A `Job`, written on the wire as its one spelling ('router', 'expert/<k>'); with `allow_empty`,
    None is written as ''."""

    def check(name: str, value: Any, wire: bool) -> Optional[Job]:
        if isinstance(value, Job):
            if wire:
                raise InvalidRecord(f"field '{name}' must be a string on the wire")
            return value
        if value is None and allow_empty and not wire:
            return None
        if not isinstance(value, str):
            raise InvalidRecord(f"field '{name}' must be a string, got {type(value).__name__}")
        if value == "" and allow_empty:
            return None
        try:
            return Job.parse(value)
        except InvalidRecord as error:
            raise InvalidRecord(f"field '{name}': {error}") from None

    return check
