"""Canonical msgpack: one byte string per value, so signatures and content ids are stable.

Canonical means: maps have string keys in sorted order, tuples are encoded as arrays, and the
decoder accepts a byte string only if re-encoding what it decoded gives back the very same bytes.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocol.errors import InvalidRecord, RecordTooLarge
from protocol.limits import MAX_RECORD_BYTES


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("canonical maps need string keys")
        return {key: _normalise(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise TypeError(f"cannot encode {type(value).__name__} canonically")


def canonical_encode(value: Any) -> bytes:
    """Encode `value` (maps, arrays, str, bytes, int, float, bool, None) canonically."""
    return msgpack.packb(_normalise(value), use_bin_type=True)


def canonical_decode(data: bytes, *, max_bytes: int = MAX_RECORD_BYTES, what: str = "record") -> Any:
    """Decode bytes that must be canonical msgpack of at most `max_bytes`; raise `InvalidRecord`."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRecord(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise RecordTooLarge(f"{what}: {len(data)} bytes is over the limit of {max_bytes}")
    try:
        value = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except Exception as error:  # msgpack raises a zoo of types on garbage; all mean the same here
        raise InvalidRecord(f"{what}: not valid msgpack ({type(error).__name__}: {error})") from None
    try:
        again = canonical_encode(value)
    except TypeError as error:
        raise InvalidRecord(f"{what}: {error}") from None
    if again != bytes(data):
        raise InvalidRecord(f"{what}: msgpack is not in canonical form")
    return value
