"""Records: canonical encoding, signatures, and refusal of anything malformed."""

import dataclasses
import time

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from protocol.encoding import canonical_decode, canonical_encode
from protocol.errors import BadSignature, InvalidRecord, ProtocolError, RecordTooLarge, SwarmVersionMismatch
from protocol.identity import Identity
from protocol.limits import MAX_RECORD_BYTES, PROTOCOL_VERSION
from protocol.records import CheckpointRecord, Claim, SwarmBeacon, decode_record
from tests import fuzz_targets
from tests.protocol_fixtures import PEER_ID

SIGNER = Identity.generate()
OTHER = Identity.generate()

records = fuzz_targets.records  # shared with the fuzz targets


@settings(max_examples=300, deadline=None)
@given(records)
def test_every_record_type_round_trips_through_encode_and_decode(record):
    signed = record.signed_by(SIGNER)
    assert decode_record(signed.encode()) == signed


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=2 * MAX_RECORD_BYTES))
def test_random_bytes_never_decode_to_a_valid_record(data):
    with pytest.raises(ProtocolError):
        decode_record(data)


@settings(max_examples=300, deadline=None)
@given(records, st.data())
def test_any_single_byte_change_of_a_signed_record_is_refused(record, data):
    wire = bytearray(record.signed_by(SIGNER).encode())
    index = data.draw(st.integers(0, len(wire) - 1))
    wire[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        decode_record(bytes(wire))


def _claim(**overrides):
    fields = dict(swarm_id="a" * 64, job="expert/1", model="tiny-fm", peer_id=PEER_ID, step=5, state="training",
                  expires_at=time.time() + 60)
    fields.update(overrides)
    return Claim(**fields)


def test_record_signed_by_one_key_but_naming_another_signer_is_refused():
    signed = _claim().signed_by(SIGNER)
    forged = dataclasses.replace(signed, signer=OTHER.signer_id)
    with pytest.raises(BadSignature):
        decode_record(forged.encode())


def test_changed_field_under_an_old_signature_is_refused():
    signed = _claim().signed_by(SIGNER)
    tampered = dataclasses.replace(signed, expires_at=signed.expires_at + 3600)
    with pytest.raises(BadSignature):
        decode_record(tampered.encode())


def test_unsigned_record_cannot_be_encoded():
    with pytest.raises(InvalidRecord, match="not signed"):
        _claim().encode()


def test_record_of_another_protocol_version_names_both_versions():
    payload = _claim().signed_by(SIGNER)._payload()
    payload["v"] = PROTOCOL_VERSION + 1
    wire = canonical_encode({**payload, "sig": SIGNER.sign(canonical_encode(payload))})
    with pytest.raises(SwarmVersionMismatch, match=f"version {PROTOCOL_VERSION + 1}.*speaks {PROTOCOL_VERSION}"):
        decode_record(wire)


def test_beacon_of_another_protocol_version_still_decodes():
    beacon = SwarmBeacon("b" * 64, "local", PROTOCOL_VERSION + 1, time.time() + 60).signed_by(SIGNER)
    assert decode_record(beacon.encode()).protocol_version == PROTOCOL_VERSION + 1


def test_oversized_record_is_refused_before_parsing():
    with pytest.raises(RecordTooLarge):
        decode_record(b"\x00" * (MAX_RECORD_BYTES + 1))


def test_non_canonical_msgpack_is_refused():
    payload = _claim().signed_by(SIGNER)._payload()
    wire = canonical_encode({**payload, "sig": SIGNER.sign(canonical_encode(payload))})
    unsorted = msgpack.packb(dict(reversed(list(msgpack.unpackb(wire).items()))), use_bin_type=True)
    assert canonical_decode(wire)
    with pytest.raises(InvalidRecord, match="canonical"):
        decode_record(unsorted)


def test_integer_where_a_float_is_signed_is_refused():
    payload = _claim().signed_by(SIGNER)._payload()
    payload["expires_at"] = int(payload["expires_at"])
    wire = canonical_encode({**payload, "sig": SIGNER.sign(canonical_encode(payload))})
    with pytest.raises(InvalidRecord, match="expires_at"):
        decode_record(wire)


def test_record_with_an_extra_field_is_refused():
    payload = {**_claim().signed_by(SIGNER)._payload(), "extra": 1}
    wire = canonical_encode({**payload, "sig": SIGNER.sign(canonical_encode(payload))})
    with pytest.raises(InvalidRecord, match="unknown fields"):
        decode_record(wire)


@pytest.mark.parametrize("overrides, message", [
    ({"job": "expert/x"}, "job"), ({"peer_id": "not a peer id"}, "peer_id"), ({"step": -1}, "step"),
    ({"state": "sleeping"}, "state"), ({"expires_at": float("nan")}, "expires_at"), ({"swarm_id": "A" * 64}, "swarm_id"),
])
def test_out_of_range_field_names_the_field(overrides, message):
    with pytest.raises(InvalidRecord, match=message):
        _claim(**overrides)


def test_record_expecting_one_kind_refuses_another():
    with pytest.raises(InvalidRecord, match="expected a checkpoint"):
        decode_record(_claim().signed_by(SIGNER).encode(), expected=CheckpointRecord)
