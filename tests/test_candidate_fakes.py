"""Fake candidates do not deny a job (issue 15, finding 2), with real processes on 127.0.0.1: a
dozen signed checkpoint records of higher steps from fresh signers, each with a provider record that
names a real peer not holding the blob, or a peer that does not exist. A node resuming the job still
adopts the one honest checkpoint behind them, instead of training from scratch."""

import json
import os
import sys
import time

import pytest
import yaml

from node.swarm.manifest_files import write_manifest_file
from protocol.hashing import BlobRef, blob_ref_of
from protocol.identity import Identity
from protocol.manifest import SwarmManifest
from protocol.records import CheckpointRecord, ProviderRecord
from tests.checkpoint_fixtures import write_expert_checkpoint
from tests.peers.flood import random_peer_id
from tests.swarm_harness import ROOT, BootstrapProcess, DhtPeer, LineProcess, NodeProcess, child_env

pytestmark = pytest.mark.timeout(420)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"
FAKES = 12  # more than the old global budget of 8 failures


def fake_records(manifest: SwarmManifest, honest_peer: str, index: int):
    """A checkpoint record of a high step whose blob nobody serves, and a provider record for it naming
    `honest_peer` (which answers "not-found") or, every other time, a peer id nobody has."""
    spec, now, signer = manifest.expert_for_cluster(0), time.time(), Identity.generate()
    blob = BlobRef.of(300_000, os.urandom(32).hex())
    step = 10**6 + index
    record = CheckpointRecord(manifest.swarm_id, 0, spec.name, spec.objective, spec.spec_hash, step, 32 * step, 0.001,
                              blob, blob, "", now, now + 600).signed_by(signer)
    named = honest_peer if index % 2 == 0 else random_peer_id()
    provider = ProviderRecord(manifest.swarm_id, blob, named, (), now + 600).signed_by(signer)
    return record, provider


def test_a_resuming_node_adopts_the_honest_checkpoint_behind_a_dozen_fake_candidates(tmp_path):
    manifest = SwarmManifest.from_dict(yaml.safe_load(TINY.read_text()))
    path = tmp_path / "open.yaml"
    write_manifest_file(manifest, path)
    processes = []
    try:
        boot = BootstrapProcess(path, tmp_path / "boot.key")
        processes.append(boot)
        honest_file = write_expert_checkpoint(manifest, "tiny-fm", 0, 40, tmp_path / "honest.safetensors")
        honest = LineProcess([sys.executable, "-m", "tests.peers.lying_node", "--manifest", str(path),
                              "--initial-peers", *boot.maddrs, "--identity", str(tmp_path / "honest.pem"),
                              "--cluster", "0", "--behaviour", "file", "--file", str(honest_file), "--step", "40",
                              "--heldout-loss", "10",  # an untrained file's honest claim: audits cannot refute it
                              "--store", str(tmp_path / "honest-store")], env=child_env())
        processes.append(honest)
        announced = json.loads(honest.wait_for(lambda line: line.startswith("{"), timeout=90))
        attacker = DhtPeer(path, boot.maddrs)
        processes.append(attacker)
        for index in range(FAKES):
            for record in fake_records(manifest, announced["peer_id"], index):
                assert attacker.call("publish", record=record.encode().hex()).get("ok", True)
        node = NodeProcess(path, tmp_path / "d", boot.maddrs, "--job", "expert/0")
        processes.append(node)
        line = node.wait_for(lambda text: "resumed orphaned expert/0" in text or "gave up on this job" in text, timeout=240)
        assert "resumed orphaned expert/0" in line and "at step 40" in line, "".join(node.output)[-3000:]
    finally:
        for process in reversed(processes):
            process.kill()


def hand_over_result(path, peers, blob, tmp_path, name: str) -> dict:
    leaving = LineProcess([sys.executable, "-m", "tests.peers.handover_peer", "--manifest", str(path),
                           "--initial-peers", *peers, "--file", str(blob), "--timeout", "12",
                           "--store", str(tmp_path / name)], env=child_env())
    try:
        line = leaving.wait_for(lambda text: '"handed-over"' in text, timeout=120)
        return json.loads(line)
    finally:
        leaving.kill()


def test_a_leaving_nodes_hand_over_waits_past_fake_provider_records_until_a_real_peer_holds_the_blob(tmp_path):
    manifest = SwarmManifest.from_dict(yaml.safe_load(TINY.read_text()))
    path = tmp_path / "open.yaml"
    write_manifest_file(manifest, path)
    blob = tmp_path / "last.safetensors"
    blob.write_bytes(os.urandom(2_000_000))
    ref = blob_ref_of(blob.read_bytes())  # what fake provider records of the real blob must name to be found
    processes = []
    try:
        boot = BootstrapProcess(path, tmp_path / "boot.key")
        processes.append(boot)
        attacker = DhtPeer(path, boot.maddrs)
        processes.append(attacker)
        now = time.time()
        for named in (boot.peer_id, attacker.peer_id, random_peer_id()):  # real peers without the blob, and nobody
            fake = ProviderRecord(manifest.swarm_id, ref, named, (), now + 600).signed_by(Identity.generate())
            attacker.call("publish", record=fake.encode().hex())
        alone = hand_over_result(path, boot.maddrs, blob, tmp_path, "alone")
        assert alone["result"] is False and alone["seconds"] >= 11, alone  # not fooled: it waited it out

        mirror = LineProcess([sys.executable, "-m", "tests.peers.lying_node", "--manifest", str(path),
                              "--initial-peers", *boot.maddrs, "--identity", str(tmp_path / "mirror.pem"),
                              "--behaviour", "file", "--file", str(blob), "--provide-only",
                              "--store", str(tmp_path / "mirror-store")], env=child_env())
        processes.append(mirror)
        mirror.wait_for(lambda line: line.startswith("{"), timeout=90)
        mirrored = hand_over_result(path, boot.maddrs, blob, tmp_path, "mirrored")
        assert mirrored["result"] is True, mirrored
    finally:
        for process in reversed(processes):
            process.kill()
