"""`generate --from DIR` reads a folder someone else may have written: the records in it pass the
swarm's record policy (but for expiry: a saved ensemble outlives its records' TTL), the swarm id
and the allow-list; its checkpoints are regular files inside the folder (no symlink out of it, no
FIFO that would hang the hash)."""

import json
import os
import time

import pytest
import yaml

from ddm_models.checkpoint import write_inference_export
from node.checkpoints.acceptance import check_expert
from node.errors import NodeError
from node.generator.assembly import Ensemble
from node.generator.saved import WEIGHTS_FILE, save_ensemble
from protocol.errors import ProtocolError, SwarmVersionMismatch, UntrustedSigner
from protocol.hashing import blob_ref_of
from protocol.identity import Identity
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord
from tests.checkpoint_fixtures import write_expert_checkpoint
from tests.swarm_harness import ROOT

pytestmark = pytest.mark.timeout(120)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"
ALICE, MALLORY = Identity.generate(), Identity.generate()


def _manifest(**changes) -> SwarmManifest:
    return SwarmManifest.from_dict({**yaml.safe_load(TINY.read_text()), **changes})


def _save(folder, manifest, *, signer=ALICE, swarm_id=None):
    """A folder as `ddm-swarm fetch` writes it (`save_ensemble`), with one expert of cluster 0 whose
    record expired a month ago."""
    state = write_expert_checkpoint(manifest, manifest.expert_for_cluster(0).name, 0, 40,
                                    folder.parent / f"{folder.name}-state.safetensors")
    export = write_inference_export(state, folder.parent / f"{folder.name}-export.safetensors")
    spec = manifest.expert_for_cluster(0)
    long_ago = time.time() - 30 * 24 * 3600
    record = CheckpointRecord(swarm_id or manifest.swarm_id, 0, spec.name, spec.objective, spec.spec_hash, 40, 1280,
                              0.01, blob_ref_of(state.read_bytes()), blob_ref_of(export.read_bytes()), "", long_ago,
                              long_ago + 600).signed_by(signer)
    expert = check_expert(export, record, manifest, blob="inference")
    return save_ensemble(Ensemble(manifest, [expert], None, [record], {record.inference.sha256: export}), folder)


def _weights(folder):
    return folder / "expert_0" / WEIGHTS_FILE


def test_a_saved_ensemble_loads_after_its_records_expired(tmp_path):
    ensemble = Ensemble.load(_save(tmp_path / "ok", _manifest()))
    assert len(ensemble.experts) == 1 and ensemble.records[0].cluster == 0


def test_a_saved_record_of_another_swarm_is_refused(tmp_path):
    with pytest.raises(SwarmVersionMismatch):
        Ensemble.load(_save(tmp_path / "foreign", _manifest(), swarm_id="e" * 64))


def test_a_saved_record_of_a_signer_outside_the_allowlist_is_refused(tmp_path):
    manifest = _manifest(trust={"mode": "allowlist", "signers": [ALICE.signer_id]})
    assert Ensemble.load(_save(tmp_path / "trusted", manifest)).experts
    with pytest.raises(UntrustedSigner):
        Ensemble.load(_save(tmp_path / "untrusted", manifest, signer=MALLORY))


@pytest.mark.parametrize("name", ["../outside", "/etc", "expert_1", ""])
def test_a_saved_index_that_names_another_folder_is_refused(tmp_path, name):
    folder = _save(tmp_path / "escape", _manifest())
    index = json.loads((folder / "ensemble.json").read_text())
    index["checkpoints"][0]["folder"] = name
    (folder / "ensemble.json").write_text(json.dumps(index))
    with pytest.raises(NodeError, match="in folder"):
        Ensemble.load(folder)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = _save(tmp_path / "link", _manifest())
    real = _weights(folder)
    os.replace(real, tmp_path / "elsewhere.safetensors")
    real.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(NodeError, match="regular file"):
        Ensemble.load(folder)


def test_a_fifo_in_place_of_a_checkpoint_is_refused_without_hanging(tmp_path):
    folder = _save(tmp_path / "fifo", _manifest())
    _weights(folder).unlink()
    os.mkfifo(_weights(folder))
    started = time.monotonic()
    with pytest.raises(NodeError, match="regular file"):
        Ensemble.load(folder)
    assert time.monotonic() - started < 10


def test_a_malformed_index_is_one_clear_error(tmp_path):
    folder = _save(tmp_path / "bad", _manifest())
    for index in ([1, 2], {"swarm_id": _manifest().swarm_id, "checkpoints": [{"folder": 7, "record": "zz"}]},
                  {"swarm_id": _manifest().swarm_id, "checkpoints": "x"}):
        (folder / "ensemble.json").write_text(json.dumps(index))
        with pytest.raises((NodeError, ProtocolError)):
            Ensemble.load(folder)


def test_a_component_folder_that_is_a_symlink_is_refused(tmp_path):
    folder = _save(tmp_path / "dirlink", _manifest())
    os.replace(folder / "expert_0", tmp_path / "elsewhere")
    (folder / "expert_0").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NodeError, match="regular folder"):
        Ensemble.load(folder)
