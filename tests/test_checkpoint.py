"""The checkpoint file: round trip, atomic write, and refusal of anything wrong."""

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddm_models.checkpoint import (CheckpointMetadata, InvalidCheckpoint, checkpoint_tensors, content_checksum,
                                   load_expert, load_router, read_checkpoint, write_checkpoint)
from tests.ml_fixtures import random_expert, random_router, text_encoder, tiny_config


def _write_expert(path, expert, **metadata):
    meta = CheckpointMetadata(kind="expert", config=expert.config, cluster=expert.cluster, step=7,
                              samples_seen=448, heldout_metric=0.25, **metadata)
    state = expert.model.state_dict()
    return write_checkpoint(path, meta, checkpoint_tensors(state, state))


def _rewrite(path, tensors=None, header=None):
    """Re-save a checkpoint file with changed tensors or header, its checksum made to match (what a
    hostile file holds: its author computes the checksum too)."""
    data = path.read_bytes()
    original_tensors = load_safetensors(data)
    length = int.from_bytes(data[:8], "little")
    original_header = json.loads(data[8:8 + length])["__metadata__"]
    new_tensors = tensors if tensors is not None else original_tensors
    new_header = dict(header if header is not None else original_header)
    if "checksum" in new_header:
        new_header["checksum"] = content_checksum(new_header, new_tensors)
    path.write_bytes(save_safetensors(new_tensors, metadata=new_header))
    return original_tensors, original_header


def test_expert_round_trips_with_metadata_and_identical_outputs(tmp_path):
    expert = random_expert(cluster=2, objective="ddpm")
    path = _write_expert(tmp_path / "e.safetensors", expert)
    loaded = load_expert(path)
    assert (loaded.cluster, loaded.config, loaded.objective.name) == (2, expert.config, "ddpm")
    assert (loaded.metadata.step, loaded.metadata.samples_seen, loaded.metadata.heldout_metric) == (7, 448, 0.25)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 300.0, 999.0])
    text = text_encoder().encode(["one", "two", "three"])
    torch.testing.assert_close(loaded.model(x, t, text), expert.model(x, t, text), rtol=0, atol=0)


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    expert = random_expert(cluster=0)
    _write_expert(tmp_path / "e.safetensors", expert)
    _write_expert(tmp_path / "e.safetensors", expert)  # replaces the old file in one rename
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


def test_router_round_trips(tmp_path):
    router = random_router()
    meta = CheckpointMetadata(kind="router", config=router.config, cluster=-1, step=3, samples_seen=10,
                              heldout_metric=0.9, heldout_metric_name="accuracy")
    path = write_checkpoint(tmp_path / "r.safetensors", meta, checkpoint_tensors(router.state_dict()))
    loaded = load_router(path)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 0.9])
    text = text_encoder().encode(["one", "two"])
    torch.testing.assert_close(loaded(x, t, text), router(x, t, text), rtol=0, atol=0)


def test_nan_weights_are_refused(tmp_path):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0))
    tensors = load_safetensors(path.read_bytes())
    tensors["ema/proj_out.weight"][0, 0] = float("nan")
    _rewrite(path, tensors=tensors)
    with pytest.raises(InvalidCheckpoint, match="NaN or infinite"):
        load_expert(path)


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0))
    bigger = random_expert(cluster=0, width=64, heads=4)
    tensors = checkpoint_tensors(bigger.model.state_dict())  # metadata still says width 32
    _rewrite(path, tensors=tensors)
    with pytest.raises(InvalidCheckpoint, match="architecture needs"):
        load_expert(path)


def test_missing_weights_are_refused(tmp_path):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0))
    tensors = load_safetensors(path.read_bytes())
    del tensors["ema/proj_out.bias"]
    _rewrite(path, tensors=tensors)
    with pytest.raises(InvalidCheckpoint, match="missing"):
        load_expert(path)


def test_config_that_does_not_match_its_recorded_hash_is_refused(tmp_path):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0))
    header = _rewrite(path)[1]
    header["config_hash"] = "0" * 64
    _rewrite(path, header=header)
    with pytest.raises(InvalidCheckpoint, match="hashes to"):
        read_checkpoint(path)


@pytest.mark.parametrize("change", [{"format": "other/1"}, {"kind": "optimizer"}, {"step": "-1"},
                                    {"step": "seven"}, {"config": "{not json"}, {"objective": "fm"},
                                    {"heldout_metric": "nan"}, {"extra": "[1]"}])
def test_bad_metadata_is_refused(tmp_path, change):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0, objective="ddpm"))
    header = _rewrite(path)[1]
    _rewrite(path, header={**header, **change})
    with pytest.raises(InvalidCheckpoint):
        read_checkpoint(path)


def test_a_config_field_the_architecture_does_not_know_is_refused(tmp_path):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0))
    header = _rewrite(path)[1]
    config = json.loads(header["config"])
    config["depth"] = "deep"
    _rewrite(path, header={**header, "config": json.dumps(config)})
    with pytest.raises(InvalidCheckpoint, match="bad metadata"):
        read_checkpoint(path)


def test_garbage_bytes_and_missing_metadata_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(100))
    with pytest.raises(InvalidCheckpoint, match="not a valid safetensors"):
        read_checkpoint(garbage)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(save_safetensors({"ema/x": torch.zeros(2)}))
    with pytest.raises(InvalidCheckpoint, match="no metadata"):
        read_checkpoint(bare)


def test_a_router_file_is_not_loaded_as_an_expert(tmp_path):
    router = random_router()
    meta = CheckpointMetadata(kind="router", config=router.config, cluster=-1, step=0, samples_seen=0)
    path = write_checkpoint(tmp_path / "r.safetensors", meta, checkpoint_tensors(router.state_dict()))
    with pytest.raises(InvalidCheckpoint, match="not an expert"):
        load_expert(path)


def test_a_checkpoint_reads_from_bytes_as_from_a_file(tmp_path):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=1, objective="fm"))
    assert load_expert(path.read_bytes()).config == tiny_config("fm")


def test_a_byte_that_rotted_on_disk_is_refused_as_corrupt(tmp_path):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # the low bit of a weight: still a finite number, so only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidCheckpoint, match="corrupt"):
        read_checkpoint(path)


def test_a_changed_metadata_value_is_refused_as_corrupt(tmp_path):
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0))
    path.write_bytes(path.read_bytes().replace(b'"step":"7"', b'"step":"9"'))
    with pytest.raises(InvalidCheckpoint, match="corrupt"):
        read_checkpoint(path)


@pytest.mark.parametrize("change", [
    {"config": "[1, 2]"}, {"config": "7"}, {"config": '"expert"'}, {"config": "[" * 100000 + "]" * 100000},
    {"config": '{"type": "ExpertConfig", "channels": ' + "[" * 5000 + "]" * 5000 + "}"},
    {"extra": "[" * 100000 + "]" * 100000}, {"config_hash": None}, {"objective": 7}, {"step": "9" * 5000},
    {"step": str(2**63)}, {"heldout_metric": "1e999"}, {"heldout_metric_name": "x" * 100000}, {"kind": ["expert"]}])
def test_hostile_metadata_of_any_type_size_or_nesting_is_refused_as_invalid_checkpoint(tmp_path, change):
    # a peer writes whatever header it likes; reading it may only ever raise InvalidCheckpoint
    path = _write_expert(tmp_path / "e.safetensors", random_expert(cluster=0))
    header = _rewrite(path)[1]
    with pytest.raises(InvalidCheckpoint):
        CheckpointMetadata.from_header({**header, **change}, "hostile")
    if all(isinstance(value, str) for value in change.values()):
        _rewrite(path, header={**header, **change})
        with pytest.raises(InvalidCheckpoint):
            read_checkpoint(path)


@pytest.mark.parametrize("header", [["format"], "format", 7, {"format": {"nested": 1}}, {1: "x"}])
def test_a_header_that_is_not_a_string_map_is_refused_as_invalid_checkpoint(header):
    with pytest.raises(InvalidCheckpoint):
        CheckpointMetadata.from_header(header, "hostile")
