"""Decoding with a memory: the same record bytes are parsed and signature-checked once.

A peer sees the same records again and again (every read of a key returns all of its entries, and
hivemind validates each entry of every answer), and an open swarm's keys may be flooded with
thousands of valid-looking records. An ed25519 check costs ~0.1 ms; a cache hit costs one sha256
of at most `MAX_RECORD_BYTES`. Refusals are remembered too, so resent junk costs no signature
check either. Only the content-derived verdict is cached: time-dependent policy (expiration,
clock skew) is still applied by the caller on every use.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Optional, Type, TypeVar, Union

from protocol.errors import InvalidRecord, ProtocolError
from protocol.records import SignedRecord, decode_record

R = TypeVar("R", bound=SignedRecord)
DEFAULT_ENTRIES = 16384  # ~1 KiB each: at most ~16 MiB


class RecordCache:
    """A bounded LRU of `decode_record` verdicts keyed by the sha256 of the record bytes."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES):
        self.max_entries = max_entries
        self._verdicts: "OrderedDict[bytes, Union[SignedRecord, ProtocolError]]" = OrderedDict()
        self._lock = threading.Lock()  # a node reads the DHT from several threads
        self.hits = self.misses = 0

    def decode(self, data: bytes, expected: Optional[Type[R]] = None) -> R:
        """`decode_record(data, expected)`, remembered; raises the same typed errors."""
        key = hashlib.sha256(data).digest()
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self.hits += 1
                self._verdicts.move_to_end(key)
        if verdict is None:
            try:
                verdict = decode_record(data)
            except ProtocolError as error:
                verdict = error
            with self._lock:
                self.misses += 1
                self._verdicts[key] = verdict
                if len(self._verdicts) > self.max_entries:
                    self._verdicts.popitem(last=False)
        if isinstance(verdict, ProtocolError):
            raise type(verdict)(str(verdict))
        if expected is not None and not isinstance(verdict, expected):
            raise InvalidRecord(f"record: expected a {expected.KIND} record, got {verdict.KIND}")
        return verdict  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._verdicts)
