"""Audits and revocations without the network: the audit measurement is repeatable across torch
thread counts, independent audits order candidates and refuse a contradicted claim, and the record
policy accepts audits and revocations only from whom may sign them."""

import time

import pytest
import torch

from ddm_models.data import subset
from ddm_models.evaluation import audit_loss, audit_seed
from ddm_models.fingerprints import dhash, sample_fingerprint
from node.checkpoints.acceptance import rank
from node.checkpoints.audits import AGREEMENT_REL, Evidence
from protocol.encoding import canonical_encode
from protocol.errors import InvalidRecord, UntrustedSigner
from protocol.hashing import blob_ref_of, sha256_hex
from protocol.identity import Identity
from protocol.manifest import SwarmManifest
from protocol.policy import RecordPolicy, key_for_record
from protocol.keys import parse_key
from protocol.records import AuditRecord, CheckpointRecord, Revocation
from tests.ml_fixtures import random_expert, small_digits, text_encoder
from tests.protocol_fixtures import checkpoint_fields, manifest_dict

OPERATOR = Identity.generate()
MANIFEST = SwarmManifest.from_dict(manifest_dict(trust={"mode": "open", "operator": OPERATOR.signer_id}))


def with_threads(threads, measure):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure()
    finally:
        torch.set_num_threads(before)


def test_audit_loss_agrees_across_thread_counts_within_the_stated_tolerance():
    data, expert = subset(small_digits(), range(0, 1797, 13)), random_expert(0, width=64)
    seed = audit_seed("ab" * 32)
    one, two = (with_threads(t, lambda: audit_loss(expert, data, text_encoder(), seed=seed)) for t in (1, 2))
    assert abs(one - two) <= AGREEMENT_REL * abs(one)
    assert audit_loss(expert, data, text_encoder(), seed=seed + 1) != one  # the seed matters


def test_sample_fingerprints_agree_bit_for_bit_across_thread_counts():
    expert = random_expert(0, width=64)
    one, two = (with_threads(t, lambda: sample_fingerprint(expert, text_encoder(), seed=5)) for t in (1, 2))
    assert one == two and len(one) == 48
    assert sample_fingerprint(random_expert(0, width=64, seed=1), text_encoder(), seed=5) != one


def test_dhash_is_one_bit_per_adjacent_pixel_pair():
    ramp = torch.linspace(1, -1, 8).repeat(8, 1).unsqueeze(0).numpy()  # brighter on the left everywhere
    assert dhash(ramp) == "f" * 16 and dhash(-ramp) == "0" * 16


def checkpoint(signer, step, claimed=0.3, blob=b"weights"):
    record = CheckpointRecord(**checkpoint_fields(MANIFEST, step=step, heldout_loss=claimed, blob=blob_ref_of(blob)))
    return record.signed_by(signer)


def audit(record, auditor, loss, fingerprint="0123456789abcdef"):
    now = time.time()
    return AuditRecord(MANIFEST.swarm_id, record.cluster, record.blob.sha256, record.signer, record.step, loss,
                       audit_seed(record.blob.sha256), 64, "ef" * 32, fingerprint, now, now + 600).signed_by(auditor)


def test_audited_experts_rank_by_median_audited_loss_before_unaudited_higher_steps():
    honest, liar, auditors = Identity.generate(), Identity.generate(), [Identity.generate() for _ in range(3)]
    good, worse = checkpoint(honest, 40, blob=b"good"), checkpoint(honest, 80, blob=b"worse")
    fresh = checkpoint(liar, 10**6, blob=b"fresh")
    evidence = Evidence(audits={good.blob.sha256: [audit(good, a, 0.30) for a in auditors],
                                worse.blob.sha256: [audit(worse, a, 0.35) for a in auditors]})
    assert rank([fresh, worse, good], evidence) == [good, worse, fresh]
    assert rank([fresh, worse, good]) == [fresh, worse, good]  # by claimed step, as without audits


def test_a_checkpoint_whose_audits_contradict_its_claim_is_refused():
    liar, auditors = Identity.generate(), [Identity.generate() for _ in range(3)]
    garbage = checkpoint(liar, 10**6, claimed=0.001)
    evidence = Evidence(audits={garbage.blob.sha256: [audit(garbage, a, 1.9) for a in auditors]})
    assert evidence.verdict(garbage).contradicted
    assert rank([garbage], evidence) == []


def test_only_independent_auditors_count_one_vote_each():
    liar, honest_auditor = Identity.generate(), Identity.generate()
    garbage = checkpoint(liar, 10**6, claimed=0.001)
    sybil = Identity.generate()
    # the checkpoint's own signer cannot vouch for it, and one auditor's many records count once
    forged_self = AuditRecord(MANIFEST.swarm_id, garbage.cluster, garbage.blob.sha256, "aa" * 32, 1, 0.001, 1, 64,
                              "ef" * 32, "", time.time(), time.time() + 600).signed_by(liar)
    audits = [forged_self, audit(garbage, honest_auditor, 1.9), *[audit(garbage, sybil, 0.001) for _ in range(5)]]
    verdict = Evidence(audits={garbage.blob.sha256: audits}).verdict(garbage)
    assert verdict.auditors == 2


def test_auditors_whose_fingerprint_disagrees_with_the_majority_are_ignored():
    liar, honest = Identity.generate(), [Identity.generate() for _ in range(3)]
    garbage = checkpoint(liar, 10**6, claimed=0.001)
    liars = [Identity.generate() for _ in range(2)]
    audits = [*(audit(garbage, a, 1.9, "1111222233334444") for a in honest),
              *(audit(garbage, a, 0.001, "ffffeeeeddddcccc") for a in liars)]
    verdict = Evidence(audits={garbage.blob.sha256: audits}).verdict(garbage)
    assert verdict.auditors == 3 and verdict.contradicted


def test_revoked_signers_and_checkpoints_are_left_out_of_the_ranking():
    a, b = Identity.generate(), Identity.generate()
    first, second, third = checkpoint(a, 80, blob=b"a"), checkpoint(b, 40, blob=b"b"), checkpoint(b, 20, blob=b"c")
    evidence = Evidence(revoked={a.signer_id, third.blob.sha256})
    assert rank([first, second, third], evidence) == [second]


def test_policy_refuses_an_audit_by_the_checkpoints_own_signer():
    signer = Identity.generate()
    record = checkpoint(signer, 40)
    own = audit(record, signer, 0.3)
    with pytest.raises(InvalidRecord, match="own checkpoint"):
        RecordPolicy(MANIFEST).accept(key_for_record(own), own.signer, own.encode(), own.expires_at, time.time())
    other = audit(record, Identity.generate(), 0.3)
    assert RecordPolicy(MANIFEST).accept(key_for_record(other), other.signer, other.encode(), other.expires_at,
                                         time.time()) == other


def revocation(signer, target="cd" * 32, manifest=MANIFEST):
    now = time.time()
    return Revocation(manifest.swarm_id, "signer", target, "trained on stolen data", now, now + 3600).signed_by(signer)


def test_only_the_manifests_operator_may_revoke():
    policy, now = RecordPolicy(MANIFEST), time.time()
    good = revocation(OPERATOR)
    assert parse_key(key_for_record(good)).target == "cd" * 32
    assert policy.accept(key_for_record(good), good.signer, good.encode(), good.expires_at, now) == good
    forged = revocation(Identity.generate())
    with pytest.raises(UntrustedSigner, match="operator"):
        policy.accept(key_for_record(forged), forged.signer, forged.encode(), forged.expires_at, now)
    plain = SwarmManifest.from_dict(manifest_dict())  # names no operator: nobody may revoke
    anyone = revocation(OPERATOR, manifest=plain)
    with pytest.raises(UntrustedSigner, match="operator"):
        RecordPolicy(plain).accept(key_for_record(anyone), anyone.signer, anyone.encode(), anyone.expires_at, now)


def test_a_manifest_without_an_operator_keeps_its_swarm_id():
    manifest = SwarmManifest.from_dict(manifest_dict())
    legacy = {**manifest.to_dict(), "trust": {"mode": "open", "signers": []}}
    assert manifest.swarm_id == sha256_hex(canonical_encode(legacy))
    assert MANIFEST.swarm_id != manifest.swarm_id and MANIFEST.trust.operator == OPERATOR.signer_id


def test_a_node_refutes_a_strangers_claim_on_its_own_held_out_data_before_adopting_it():
    from node.checkpoints.acceptance import Refused
    from node.checkpoints.audits import check_claim

    data, expert = subset(small_digits(), range(0, 1797, 13)), random_expert(0, width=64)
    liar = checkpoint(Identity.generate(), 10**6, claimed=0.001)
    with pytest.raises(Refused, match="claims 0.0010"):
        check_claim(expert, liar, data, text_encoder())
    measured = audit_loss(expert, data, text_encoder(), seed=audit_seed(liar.blob.sha256))
    honest = checkpoint(Identity.generate(), 40, claimed=measured * 0.9)  # claims measured with other draws
    assert check_claim(expert, honest, data, text_encoder()) == measured
