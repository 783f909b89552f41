"""`ddm-swarm fetch`'s folder: a layout a diffusers user recognises, that `generate --from` reads and
checks again (signatures, hashes, architectures) before it samples from it."""

import json

import pytest
from PIL import Image

from ddm_models.checkpoint import write_inference_export
from node.checkpoints.acceptance import check_expert
from node.generator.assembly import Ensemble
from node.generator.saved import NotASavedEnsemble
from protocol.errors import BadSignature, HashMismatch
from protocol.identity import Identity
from tests.checkpoint_fixtures import write_expert_checkpoint
from tests.swarm_harness import ROOT, run_cli
from tests.test_inference_export import MANIFEST, record_of

SIGNER = Identity.generate()


@pytest.fixture()
def saved(tmp_path):
    state = write_expert_checkpoint(MANIFEST, "tiny-fm", 0, 40, tmp_path / "state.safetensors")
    export = write_inference_export(state, tmp_path / "export.safetensors")
    record = record_of(state, export).signed_by(SIGNER)
    expert = check_expert(export, record, MANIFEST, blob="inference")
    ensemble = Ensemble(MANIFEST, [expert], None, [record], {record.inference.sha256: export})
    return ensemble.save(tmp_path / "ensemble"), record


def test_saved_ensemble_has_model_index_and_a_folder_per_component(saved):
    out, record = saved
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DdmSwarmEnsemble" and index["expert_0"] == ["ddm_swarm", "Expert"]
    config = json.loads((out / "expert_0" / "config.json").read_text())
    assert config["_class_name"] == "Expert" and config["step"] == 40 and config["sha256"] == record.inference.sha256
    weights = out / "expert_0" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size == record.inference.size  # the export as fetched, not the training state


def test_saved_ensemble_loads_back_checked(saved):
    ensemble = Ensemble.load(saved[0])
    assert [(e.cluster, e.metadata.step) for e in ensemble.experts] == [(0, 40)]


def test_saved_weights_changed_on_disk_are_refused(saved):
    weights = saved[0] / "expert_0" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(HashMismatch, match="re-fetch"):
        Ensemble.load(saved[0])


def test_saved_record_changed_by_one_bit_is_refused(saved):
    index_path = saved[0] / "ensemble.json"
    index = json.loads(index_path.read_text())
    raw = bytearray(bytes.fromhex(index["checkpoints"][0]["record"]))
    raw[-5] ^= 0x01
    index["checkpoints"][0]["record"] = raw.hex()
    index_path.write_text(json.dumps(index))
    with pytest.raises((BadSignature, NotASavedEnsemble)):
        Ensemble.load(saved[0])


def test_saved_record_put_in_another_components_folder_is_refused(saved):
    index_path = saved[0] / "ensemble.json"
    index = json.loads(index_path.read_text())
    index["checkpoints"][0]["folder"] = "expert_1"
    index_path.write_text(json.dumps(index))
    with pytest.raises(NotASavedEnsemble, match="in folder 'expert_1'"):
        Ensemble.load(saved[0])


def test_generate_from_a_saved_folder_samples_with_no_network(saved, tmp_path):
    out = tmp_path / "digits.png"
    result = run_cli("generate", "the digit 3", "--num", "2", "--steps", "4", "--from", str(saved[0]), "--out", str(out),
                     "--swarm", str(ROOT / "tests" / "manifests" / "tiny.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert Image.open(out).size == (2 * (8 * 4 + 1) + 1, 8 * 4 + 2)
