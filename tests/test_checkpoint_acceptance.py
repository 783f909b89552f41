"""A checkpoint is used only if its file is what its signed record says: the acceptance checks that
generation, mirroring and a node resuming a job all apply (no network here; the swarm tests show
them applied by real peers)."""

import time

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
