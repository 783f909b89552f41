"""Fuzzing every decoder of protocol/ (bounded here; `benchmarks/fuzz.py` runs the same targets for
minutes): hostile input is refused with a `ProtocolError` and nothing else, and whatever a decoder
accepts is the one canonical spelling of what it means. Round trips of valid records and frames live
in test_protocol_records.py and test_blob_wire.py; the targets are in tests/fuzz_targets.py.
"""

import base64
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings

from protocol.errors import InvalidIdentity, InvalidManifest, InvalidRecord
from protocol.hashing import BlobRef, is_sha256_hex
from protocol.identity import Identity, is_signer_id
from protocol.keys import parse_key
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, Claim
from tests import fuzz_targets as t
from tests.protocol_fixtures import PEER_ID, checkpoint_fields, manifest_dict

fuzz = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@fuzz
@given(t.TARGETS["canonical_decode/round-trip"].strategy)
def test_canonical_msgpack_of_any_value_decodes_back_to_it(value):
    t.check_canonical_round_trip(value)


@fuzz
@given(t.TARGETS["canonical_decode/bytes"].strategy)
def test_canonical_decode_accepts_only_canonical_bytes_and_refuses_the_rest_typed(data):
    t.check_canonical_bytes(data)


@pytest.mark.parametrize("kind", sorted(t.RECORDS))
def test_a_signed_record_with_changed_added_or_dropped_fields_is_refused_typed_or_exact(kind):
    fuzz(given(t.near_record_wire(kind))(t.check_record_bytes))()


@fuzz
@given(t.valid_keys)
def test_every_key_built_by_protocol_keys_parses_back_to_its_parts(key):
    t.check_valid_key_parses(key)


@fuzz
@given(t.key_inputs)
def test_parse_key_accepts_only_the_canonical_spelling_of_a_key(key):
    t.check_parse_key(key)


@fuzz
@given(t.dht_entries())
def test_the_record_policy_refuses_malformed_dht_entries_typed(entry):
    t.check_policy_accept(entry)


@settings(fuzz, max_examples=60)
@given(t.valid_manifest_dicts())
def test_a_valid_manifest_reads_back_from_its_file_form_with_the_same_swarm_id(data):
    t.check_manifest_round_trip(data)


@settings(fuzz, max_examples=250)
@given(t.manifest_inputs)
def test_a_mutated_manifest_is_refused_with_invalid_manifest_or_is_a_valid_swarm(data):
    t.check_manifest_from_dict(data)


@fuzz
@given(t.request_frames)
def test_blob_request_frames_are_refused_typed_or_canonical(frame):
    t.check_request_frame(frame)


@fuzz
@given(t.response_frames)
def test_blob_response_frames_are_refused_typed_or_canonical(frame):
    t.check_response_frame(frame)


@fuzz
@given(t.pem_inputs)
def test_a_damaged_identity_key_is_refused_as_invalid_identity(data):
    t.check_identity_pem(data)


# --- what the fuzzer found, pinned ------------------------------------------------------------------
def test_a_trailing_newline_makes_a_hash_a_signer_or_a_key_invalid():
    assert not is_sha256_hex("ab" * 32 + "\n") and not is_signer_id("ab" * 32 + "\n")
    with pytest.raises(InvalidRecord):
        parse_key("ab" * 32 + "/claims\n")
    with pytest.raises(InvalidRecord):
        BlobRef("ab" * 32 + "\n", 1, "cd" * 32)


def test_a_cluster_has_one_spelling_in_keys_and_jobs():
    with pytest.raises(InvalidRecord):
        parse_key("ab" * 32 + "/ckpt/01")
    with pytest.raises(InvalidRecord, match="job"):
        Claim("ab" * 32, "expert/01", "tiny-fm", PEER_ID, 0, "training", time.time() + 60)


@pytest.mark.parametrize("expiration", [math.nan, math.inf, None, "soon"])
def test_a_dht_entry_with_a_non_finite_or_non_numeric_expiration_is_refused(expiration):
    now = time.time()
    record = CheckpointRecord(**checkpoint_fields(t.POLICY_MANIFEST, created_at=now, expires_at=now + 600))
    signed = record.signed_by(t.SIGNER)
    with pytest.raises(InvalidRecord, match="expiration"):
        t.POLICY.accept(f"{record.swarm_id}/ckpt/{record.cluster}", t.SIGNER.signer_id, signed.encode(), expiration, now)


@pytest.mark.parametrize("field", ["router", "dataset", "trust", "cluster_experts"])
def test_a_manifest_section_that_is_not_a_mapping_is_named_in_the_error(field):
    with pytest.raises(InvalidManifest, match=field):
        SwarmManifest.from_dict(manifest_dict(**{field: 5}))


@pytest.mark.parametrize("key", [math.inf, 1.5, True, "01", " 1", None])
def test_a_cluster_experts_key_that_is_not_plainly_a_cluster_number_is_refused(key):
    with pytest.raises(InvalidManifest, match="cluster_experts"):
        SwarmManifest.from_dict(manifest_dict(cluster_experts={key: "tiny-fm"}))


@pytest.mark.parametrize("key", [1, "1"])
def test_a_cluster_experts_key_may_be_written_as_yaml_or_json_writes_it(key):
    assert SwarmManifest.from_dict(manifest_dict(cluster_experts={key: "tiny-ddpm"})).cluster_experts == ((1, "tiny-ddpm"),)


def test_a_pem_key_of_an_unknown_algorithm_is_an_invalid_identity():
    der = bytearray(base64.b64decode(Identity.generate().to_pem().split(b"\n")[1]))
    der[9] ^= 1  # the algorithm identifier now names an algorithm cryptography does not know
    pem = b"-----BEGIN PRIVATE KEY-----\n" + base64.b64encode(bytes(der)) + b"\n-----END PRIVATE KEY-----\n"
    with pytest.raises(InvalidIdentity, match="Unknown key type"):
        Identity.from_pem(pem)


def test_a_pem_key_that_openssl_cannot_set_up_is_an_invalid_identity():
    # found by the fuzzer: an X448 identifier with a mangled body makes OpenSSL fail with an InternalError
    pem = (b"-----BEGIN PRIVATE KEY-----MC4CAQAwBQYDK2VvBCIEIC67ADEEFGGKLMMOPPSZ111cdegjklmno001122suvwz"
           b"-----END PRIVATE KEY-----")
    with pytest.raises(InvalidIdentity):
        Identity.from_pem(pem)


def test_fuzz_targets_cover_every_record_kind_and_decoder():
    names = set(t.TARGETS)
    assert {f"decode_record/{kind}/mutated" for kind in t.RECORDS} <= names
    assert {"canonical_decode/bytes", "parse_key/mutated", "RecordPolicy.accept", "SwarmManifest.from_dict/mutated",
            "blob_wire/request", "blob_wire/response", "Identity.from_pem"} <= names


@settings(fuzz, max_examples=300)
@given(t.header_inputs)
def test_a_hostile_checkpoint_header_is_refused_as_invalid_checkpoint_or_parsed_exactly(header):
    t.check_checkpoint_header(header)
