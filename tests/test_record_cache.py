"""Decoding with a memory: a record's signature is checked once however often it is read again,
refusals are remembered as well, and the memory is bounded."""

import dataclasses
import time

import pytest

import protocol.records as records
from protocol.errors import BadSignature, InvalidRecord
from protocol.identity import Identity
from protocol.record_cache import RecordCache
from protocol.records import Claim, ProviderRecord
from tests.protocol_fixtures import PEER_ID


def claim(step=0):
    return Claim("a" * 64, "expert/0", "tiny-fm", PEER_ID, step, "training", time.time() + 60).signed_by(
        Identity.generate())


def test_a_record_read_again_is_not_verified_again(monkeypatch):
    cache, data = RecordCache(), claim().encode()
    first = cache.decode(data)
    calls = []
    monkeypatch.setattr(records, "verify_signature", lambda *args: calls.append(args))
    assert [cache.decode(data) for _ in range(100)] == [first] * 100
    assert calls == [] and (cache.hits, cache.misses) == (100, 1)


def test_a_refused_record_stays_refused_with_the_same_typed_error():
    cache = RecordCache()
    forged = dataclasses.replace(claim(), step=10**6).encode()  # the old signature no longer matches
    for _ in range(3):
        with pytest.raises(BadSignature):
            cache.decode(forged)
    assert cache.misses == 1


def test_a_record_of_another_kind_than_expected_is_refused():
    with pytest.raises(InvalidRecord, match="expected a provider record"):
        RecordCache().decode(claim().encode(), expected=ProviderRecord)


def test_the_cache_keeps_at_most_its_size_dropping_the_least_recently_used():
    cache = RecordCache(max_entries=3)
    data = [claim(step).encode() for step in range(4)]
    for item in data[:3]:
        cache.decode(item)
    cache.decode(data[0])  # used again: now the most recent
    cache.decode(data[3])
    assert len(cache) == 3
    cache.decode(data[0])
    cache.decode(data[1])  # was dropped: decoded afresh
    assert cache.misses == 5
