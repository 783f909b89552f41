"""A checkpoint is used only if its file is what its signed record says: the acceptance checks that
generation, mirroring and a node resuming a job all apply (no network here; the swarm tests show
them applied by real peers)."""

import dataclasses
import time
from pathlib import Path

import pytest
import yaml

from ddm_models.checkpoint import InvalidCheckpoint
from node.checkpoints.acceptance import check_expert, check_header
from protocol.hashing import BlobHasher
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord
from tests.checkpoint_fixtures import write_expert_checkpoint
from tests.swarm_harness import ROOT

MANIFEST = SwarmManifest.from_dict(yaml.safe_load((ROOT / "tests" / "manifests" / "tiny.yaml").read_text()))


def record_for(path, *, cluster=0, step=40, model="tiny-fm"):
    hasher = BlobHasher()
    hasher.update(path.read_bytes())
    spec = MANIFEST.expert_spec(model)
    now = time.time()
    return CheckpointRecord(MANIFEST.swarm_id, cluster, spec.name, spec.objective, spec.spec_hash, step, 32 * step,
                            0.1, hasher.finish(), hasher.finish(), "", now, now + 600)


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    return write_expert_checkpoint(MANIFEST, "tiny-fm", 0, 40, tmp_path_factory.mktemp("ckpt") / "honest.safetensors")


def test_checkpoint_matching_its_record_is_accepted(honest):
    expert = check_expert(honest, record_for(honest), MANIFEST)
    assert (expert.cluster, expert.metadata.step) == (0, 40)


def test_record_claiming_a_later_step_than_its_file_is_refused(honest):
    # a replayed old blob under a doctored, newer-looking record would roll the job back
    with pytest.raises(InvalidCheckpoint, match="step 40, its record claims cluster 0 step 1000000"):
        check_header(honest, record_for(honest, step=10**6), MANIFEST)


def test_record_claiming_another_cluster_than_its_file_is_refused(honest):
    with pytest.raises(InvalidCheckpoint, match="its record claims cluster 1"):
        check_header(honest, record_for(honest, cluster=1), MANIFEST)


def test_record_claiming_another_model_than_its_file_is_refused(honest):
    with pytest.raises(InvalidCheckpoint, match="another architecture than model 'tiny-ddpm'"):
        check_header(honest, record_for(honest, model="tiny-ddpm"), MANIFEST)


def test_checkpoint_of_a_wrong_architecture_is_refused(tmp_path):
    path = write_expert_checkpoint(MANIFEST, "tiny-fm", 0, 40, tmp_path / "narrow.safetensors",
                                   poison="wrong-architecture")
    with pytest.raises(InvalidCheckpoint, match="another architecture"):
        check_expert(path, record_for(path), MANIFEST)


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    path = write_expert_checkpoint(MANIFEST, "tiny-fm", 0, 40, tmp_path / "nan.safetensors", poison="nan")
    with pytest.raises(InvalidCheckpoint, match="NaN"):
        check_expert(path, record_for(path), MANIFEST)


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "garbage.bin"
    path.write_bytes(bytes(4096))
    with pytest.raises(InvalidCheckpoint):
        check_header(path, record_for(path), MANIFEST)


def _claim(step, created_at=None, signer="a" * 64):
    record = record_for(Path(__file__), step=step)
    return dataclasses.replace(record, created_at=time.time() if created_at is None else created_at, signer=signer)


def test_a_claimed_step_beyond_what_the_job_can_have_reached_since_it_was_verified_is_passed_over():
    from node.checkpoints.acceptance import STEP_SLACK, STEPS_PER_S_BOUND, Verified, trusted_order
    verified = Verified()
    now = time.time()
    verified.add(_claim(1000, created_at=now - 60), now=now)  # we checked step 1000, made a minute ago
    reachable = 1000 + STEP_SLACK + int(STEPS_PER_S_BOUND * 60) - 100
    honest, liar = _claim(reachable), _claim(10**9, signer="b" * 64)
    assert trusted_order([liar, honest], verified, now=now) == [honest]
    # later the same claim can have been reached: the bound grows with time, at the bound's rate
    assert trusted_order([liar], verified, now=now + 10**6)[0] is liar


def test_a_verified_record_with_an_old_creation_time_does_not_loosen_the_bound():
    from node.checkpoints.acceptance import Verified
    verified, now = Verified(), time.time()
    verified.add(_claim(5000, created_at=now), now=now)
    tight = verified.step_bound(MANIFEST.jobs[0], now)
    verified.add(_claim(10, created_at=0.0), now=now)  # "made in 1970": would allow any step
    assert verified.step_bound(MANIFEST.jobs[0], now) == tight


def test_without_anything_verified_only_steps_well_below_the_protocol_bound_are_considered():
    from node.checkpoints.acceptance import trusted_order
    from protocol.limits import MAX_STEP
    near_limit, ordinary = _claim(MAX_STEP - 1), _claim(10**6)
    assert trusted_order([near_limit, ordinary]) == [ordinary]


def test_a_record_claiming_a_step_near_the_int64_limit_is_refused_by_the_protocol():
    from protocol.errors import InvalidRecord
    from protocol.identity import Identity
    with pytest.raises(InvalidRecord, match="'step' must be in"):
        record_for(Path(__file__), step=2**63 - 1).signed_by(Identity.generate())
