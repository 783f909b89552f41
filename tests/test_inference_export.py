"""The inference export: the EMA weights alone in 16 bits, what a generator downloads instead of the
training state; checked against its record like the state, and against the state where both meet."""

import time

import pytest
import torch
import yaml

from ddm_models.checkpoint import (InvalidCheckpoint, check_same_weights, load_expert, read_checkpoint,
                                   state_dict_part, write_checkpoint, write_inference_export)
from node.checkpoints.acceptance import check_expert, check_header, size_limit
from protocol.hashing import BlobHasher
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord
from tests.checkpoint_fixtures import write_export_as_is, write_expert_checkpoint
from tests.swarm_harness import ROOT

MANIFEST = SwarmManifest.from_dict(yaml.safe_load((ROOT / "tests" / "manifests" / "tiny.yaml").read_text()))


def ref_of(path):
    hasher = BlobHasher()
    hasher.update(path.read_bytes())
    return hasher.finish()


def record_of(state, export, *, step=40):
    spec = MANIFEST.expert_spec("tiny-fm")
    now = time.time()
    return CheckpointRecord(MANIFEST.swarm_id, 0, spec.name, spec.objective, spec.spec_hash, step, 32 * step, 0.1,
                            ref_of(state), ref_of(export), "", now, now + 600)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    state = write_expert_checkpoint(MANIFEST, "tiny-fm", 0, 40, folder / "state.safetensors")
    return state, write_inference_export(state, folder / "export.safetensors")


def test_export_holds_only_the_ema_weights_in_bfloat16_about_an_eighth_of_the_state(pair):
    state, export = pair
    metadata, tensors = read_checkpoint(export)
    _, state_tensors = read_checkpoint(state)
    assert metadata.contents == "inference" and metadata.step == 40
    assert set(tensors) == set(state_dict_part(state_tensors, "ema"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    weight_bytes = sum(t.numel() * 2 for t in tensors.values())
    assert export.stat().st_size < 1.05 * weight_bytes + 16384  # the header is small


def test_export_loads_into_float32_or_the_asked_dtype_with_the_states_outputs(pair):
    state, export = pair
    full, light = load_expert(state), load_expert(export)
    assert next(light.model.parameters()).dtype == torch.float32
    assert next(load_expert(export, dtype=torch.bfloat16).model.parameters()).dtype == torch.bfloat16
    for name, value in full.model.state_dict().items():
        assert torch.equal(light.model.state_dict()[name], value.to(torch.bfloat16).float())


def test_export_holds_no_training_weights_to_resume_from(pair):
    with pytest.raises(InvalidCheckpoint, match="EMA weights only"):
        load_expert(pair[1], weights="train")


def test_export_of_the_states_ema_passes_the_mirrors_comparison(pair):
    check_same_weights(*pair)


def test_export_with_one_weight_changed_fails_the_mirrors_comparison(pair, tmp_path):
    state, export = pair
    metadata, tensors = read_checkpoint(export)
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    doctored = write_checkpoint(tmp_path / "doctored.safetensors", metadata, tensors)
    with pytest.raises(InvalidCheckpoint, match=f"{name} is not the state file's EMA weight"):
        check_same_weights(state, doctored)


def test_export_of_another_step_fails_the_mirrors_comparison(pair, tmp_path):
    other = write_expert_checkpoint(MANIFEST, "tiny-fm", 0, 41, tmp_path / "other.safetensors")
    with pytest.raises(InvalidCheckpoint, match="metadata differs"):
        check_same_weights(pair[0], write_inference_export(other, tmp_path / "other-export.safetensors"))


def test_generator_accepts_the_export_its_record_names_as_inference(pair):
    state, export = pair
    expert = check_expert(export, record_of(state, export), MANIFEST, blob="inference")
    assert (expert.cluster, expert.metadata.step, expert.metadata.contents) == (0, 40, "inference")


def test_state_file_named_as_the_inference_blob_is_refused(pair):
    state, _ = pair
    with pytest.raises(InvalidCheckpoint, match="holds training contents, its record names it as the inference"):
        check_header(state, record_of(state, state), MANIFEST, blob="inference")


def test_export_named_as_the_state_blob_is_refused(pair):
    _, export = pair
    with pytest.raises(InvalidCheckpoint, match="holds inference contents, its record names it as the state"):
        check_header(export, record_of(export, export), MANIFEST)


def test_export_with_nan_weights_is_refused_by_the_generator(tmp_path):
    state = write_expert_checkpoint(MANIFEST, "tiny-fm", 0, 40, tmp_path / "nan.safetensors", poison="nan")
    export = write_export_as_is(state, tmp_path / "nan-export.safetensors")
    with pytest.raises(InvalidCheckpoint, match="NaN"):
        check_expert(export, record_of(state, export), MANIFEST, blob="inference")


def test_export_for_a_later_step_than_its_record_is_refused(pair):
    state, export = pair
    with pytest.raises(InvalidCheckpoint, match="its record claims cluster 0 step 41"):
        check_header(export, record_of(state, export, step=41), MANIFEST, blob="inference")


def test_inference_blobs_may_be_an_eighth_of_the_size_a_state_blob_may_be(pair):
    record = record_of(*pair)
    state_limit, export_limit = size_limit(record, MANIFEST), size_limit(record, MANIFEST, "inference")
    assert pair[0].stat().st_size <= state_limit and pair[1].stat().st_size <= export_limit
    assert export_limit - (1 << 20) == (state_limit - (1 << 20)) // 8
