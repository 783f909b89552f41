"""Manifest parsing and the swarm's acceptance policy for DHT entries."""

import dataclasses
import time

import pytest

from protocol.errors import (ExpirationTooFar, InvalidManifest, InvalidRecord, RecordExpired, SwarmVersionMismatch,
                             UntrustedSigner)
from protocol.hashing import BlobRef
from protocol.identity import Identity
from protocol.keys import beacon_key, checkpoint_key, claims_key, parse_key, providers_key
from protocol.limits import MAX_EXPIRATION_AHEAD_S, PROTOCOL_VERSION
from protocol.policy import RecordPolicy
from protocol.records import CheckpointRecord, Claim, ProviderRecord, SwarmBeacon
from protocol.manifest import SwarmManifest
from tests.protocol_fixtures import PEER_ID, checkpoint_fields, manifest, manifest_dict

ALICE = Identity.generate()
MALLORY = Identity.generate()


def test_swarm_id_is_stable_and_changes_with_any_field():
    assert manifest().swarm_id == manifest().swarm_id
    assert manifest().swarm_id != manifest(description="other").swarm_id
    assert manifest().swarm_id != manifest(clustering={"num_clusters": 5, "fine_clusters": 16}).swarm_id


def test_integer_and_float_spellings_of_a_float_field_give_one_swarm_id():
    assert manifest(timing={"lease_s": 20}).swarm_id == manifest(timing={"lease_s": 20.0}).swarm_id


@pytest.mark.parametrize("overrides, field", [
    ({"dataset": {"kind": "imagenet", "image_size": 8, "channels": 1}}, "dataset.kind"),
    ({"clustering": {"num_clusters": 0}}, "clustering.num_clusters"),
    ({"trust": {"mode": "allowlist", "signers": ["nope"]}}, "trust.signers"),
    ({"timing": {"lease_s": -1}}, "timing.lease_s"),
    ({"default_expert": "missing"}, "missing"),
    ({"colour": "blue"}, "colour"),
    ({"experts": []}, "experts"),
])
def test_malformed_manifest_names_the_bad_field(overrides, field):
    with pytest.raises(InvalidManifest, match=field.replace(".", r"\.")):
        SwarmManifest.from_dict(manifest_dict(**overrides))


def test_manifest_of_another_protocol_version_is_refused_clearly():
    with pytest.raises(SwarmVersionMismatch, match=f"version {PROTOCOL_VERSION + 1}"):
        SwarmManifest.from_dict(manifest_dict(protocol_version=PROTOCOL_VERSION + 1))


def test_manifest_round_trips_through_its_dict():
    m = manifest(cluster_experts={"2": "tiny-ddpm"})
    assert SwarmManifest.from_dict(m.to_dict()) == m
    assert m.expert_for_cluster(2).objective == "ddpm" and m.expert_for_cluster(0).name == "tiny-fm"


def test_keys_parse_back_to_their_parts():
    sid = manifest().swarm_id
    assert parse_key(checkpoint_key(sid, 3)).cluster == 3
    blob = BlobRef.of(10, "d" * 64)
    assert parse_key(providers_key(sid, blob)).ref_id == blob.ref_id != blob.sha256
    with pytest.raises(InvalidRecord):
        parse_key("some/other/key")


def _store(policy, key, record, expiration=None, now=None):
    now = time.time() if now is None else now
    return policy.accept(key, record.signer, record.encode(), expiration or record.expires_at, now)


def test_valid_checkpoint_record_is_accepted():
    m = manifest()
    record = CheckpointRecord(**checkpoint_fields(m)).signed_by(ALICE)
    assert _store(RecordPolicy(m), checkpoint_key(m.swarm_id, 1), record) == record


def test_record_stored_under_another_signers_subkey_is_refused():
    m = manifest()
    record = CheckpointRecord(**checkpoint_fields(m)).signed_by(MALLORY)
    with pytest.raises(InvalidRecord, match="subkey"):
        RecordPolicy(m).accept(checkpoint_key(m.swarm_id, 1), ALICE.signer_id, record.encode(), record.expires_at,
                               time.time())


def test_far_future_expiration_is_refused_as_squatting():
    m = manifest()
    far = time.time() + MAX_EXPIRATION_AHEAD_S["claim"] * 10
    claim = Claim(m.swarm_id, "expert/0", "tiny-fm", PEER_ID, 0, "training", far).signed_by(MALLORY)
    with pytest.raises(ExpirationTooFar):
        _store(RecordPolicy(m), claims_key(m.swarm_id), claim)


def test_dht_entry_may_not_outlive_the_signed_expiration():
    m = manifest()
    record = CheckpointRecord(**checkpoint_fields(m)).signed_by(ALICE)
    with pytest.raises(InvalidRecord, match="outlive"):
        _store(RecordPolicy(m), checkpoint_key(m.swarm_id, 1), record, expiration=record.expires_at + 3600)


def test_expired_record_is_refused():
    m = manifest()
    old = time.time() - 3600
    record = CheckpointRecord(**checkpoint_fields(m, created_at=old - 10, expires_at=old)).signed_by(ALICE)
    with pytest.raises(RecordExpired):
        _store(RecordPolicy(m), checkpoint_key(m.swarm_id, 1), record, now=time.time())


def test_signer_outside_the_allowlist_is_refused():
    m = manifest(trust={"mode": "allowlist", "signers": [ALICE.signer_id]})
    record = CheckpointRecord(**checkpoint_fields(m)).signed_by(MALLORY)
    with pytest.raises(UntrustedSigner):
        _store(RecordPolicy(m), checkpoint_key(m.swarm_id, 1), record)
    assert _store(RecordPolicy(m), checkpoint_key(m.swarm_id, 1), record.signed_by(ALICE))


def test_checkpoint_of_a_model_the_swarm_does_not_allow_is_refused():
    m = manifest()
    record = CheckpointRecord(**checkpoint_fields(m, spec_hash="d" * 64)).signed_by(ALICE)
    with pytest.raises(InvalidRecord, match="not an expert this swarm allows"):
        _store(RecordPolicy(m), checkpoint_key(m.swarm_id, 1), record)


def test_checkpoint_stored_under_another_cluster_is_refused():
    m = manifest()
    record = CheckpointRecord(**checkpoint_fields(m)).signed_by(ALICE)
    with pytest.raises(InvalidRecord, match="cluster"):
        _store(RecordPolicy(m), checkpoint_key(m.swarm_id, 2), record)


def test_record_of_another_swarm_is_refused():
    m, other = manifest(), manifest(description="a different swarm")
    record = CheckpointRecord(**checkpoint_fields(other)).signed_by(ALICE)
    with pytest.raises(SwarmVersionMismatch):
        _store(RecordPolicy(m), checkpoint_key(other.swarm_id, 1), record)


def test_provider_record_under_another_blob_references_key_is_refused():
    """Filed under the whole reference: another digest list or size is another key."""
    m = manifest()
    blob = BlobRef.of(10, "1" * 64)
    record = ProviderRecord(m.swarm_id, blob, PEER_ID, (), time.time() + 60).signed_by(ALICE)
    for other in (BlobRef.of(10, "2" * 64), BlobRef.of(11, "1" * 64)):
        with pytest.raises(InvalidRecord):
            _store(RecordPolicy(m), providers_key(m.swarm_id, other), record)
    assert _store(RecordPolicy(m), providers_key(m.swarm_id, blob), record)


def test_created_time_in_the_future_is_refused():
    m = manifest()
    record = CheckpointRecord(**checkpoint_fields(m, created_at=time.time() + 3600)).signed_by(ALICE)
    with pytest.raises(InvalidRecord, match="future"):
        _store(RecordPolicy(m), checkpoint_key(m.swarm_id, 1), record)


def test_a_beacon_from_a_signer_outside_the_allowlist_is_refused():
    # a stranger's beacon would make every peer of the swarm warn "peers run another manifest"
    m = manifest(trust={"mode": "allowlist", "signers": [ALICE.signer_id]})
    beacon = SwarmBeacon(m.swarm_id, m.name, PROTOCOL_VERSION, time.time() + 600)
    with pytest.raises(UntrustedSigner):
        _store(RecordPolicy(m), beacon_key(m.name), beacon.signed_by(MALLORY))
    assert _store(RecordPolicy(m), beacon_key(m.name), beacon.signed_by(ALICE))
    stranger = SwarmBeacon("f" * 64, m.name, PROTOCOL_VERSION + 1, time.time() + 600).signed_by(MALLORY)
    assert _store(RecordPolicy(manifest()), beacon_key(m.name), stranger)  # open swarms: informative from anyone
