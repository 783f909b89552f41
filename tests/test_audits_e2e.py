"""Audits and revocation end to end, with real processes on 127.0.0.1: two honest trainers (expert/0
and expert/1; each audits and mirrors the other's job) and a lying peer that announces a
well-formed, finite checkpoint of random weights for expert/0 at a far higher step with a near-zero
claimed loss. The auditor's measurement contradicts the liar, so `fetch` (the assembly a default
`generate` runs; generate itself needs a router for two experts) uses the honest expert; then the
operator revokes that trainer's signer, the mirror stops serving its checkpoint and the ensemble
re-forms without expert/0. The tests run in order on one swarm.
"""

import json
import sys

import pytest
import yaml

from node.identity_files import load_or_create_identity
from node.swarm.manifest_files import write_manifest_file
from protocol.manifest import SwarmManifest
from protocol.records import decode_record
from tests.checkpoint_fixtures import write_expert_checkpoint
from tests.swarm_harness import ROOT, BootstrapProcess, DhtPeer, LineProcess, NodeProcess, child_env, run_cli, wait_until

pytestmark = pytest.mark.timeout(300)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audits")
    operator = load_or_create_identity(tmp / "operator.pem")
    data = yaml.safe_load(TINY.read_text())
    data["trust"] = {"mode": "open", "operator": operator.signer_id}
    manifest = SwarmManifest.from_dict(data)
    path = tmp / "audited.yaml"
    write_manifest_file(manifest, path)
    boot = BootstrapProcess(path, tmp / "boot.key")
    peers = boot.maddrs
    state = {"tmp": tmp, "path": path, "manifest": manifest, "peers": peers, "processes": [boot]}
    # the honest trainer joins first: its own resume check (tests/test_audits.py) is not under test here
    state["a"] = NodeProcess(path, tmp / "a", peers, "--job", "expert/0", "--max-steps", "40")
    state["a"].wait_for(lambda line: "[training]" in line, timeout=120)
    state["b"] = NodeProcess(path, tmp / "b", peers, "--job", "expert/1", "--max-steps", "40")
    garbage = write_expert_checkpoint(manifest, "tiny-fm", 0, 10**6, tmp / "garbage.safetensors", seed=7)
    liar = LineProcess([sys.executable, "-m", "tests.peers.lying_node", "--manifest", str(path), "--initial-peers",
                        *peers, "--identity", str(tmp / "liar.pem"), "--cluster", "0", "--behaviour", "file",
                        "--file", str(garbage), "--step", str(10**6), "--store", str(tmp / "liar-store")],
                       env=child_env())
    state["liar"] = json.loads(liar.wait_for(lambda line: line.startswith("{"), timeout=90))
    state["observer"] = DhtPeer(path, peers)
    state["processes"] += [state["a"], state["b"], liar, state["observer"]]
    yield state
    for process in reversed(state["processes"]):
        process.kill()
    for name in ("a", "b"):  # kept for whoever reads a failure
        (tmp / f"{name}.log").write_text("".join(state[name].output))


def records(swarm, family, **extra):
    reply = swarm["observer"].call("read", family=family, **extra)
    return [decode_record(bytes.fromhex(hex_)) for hex_ in reply["records"]]


def signer(swarm, name):
    key = swarm["tmp"] / name / "identity.pem"
    return wait_until(lambda: key.exists() and load_or_create_identity(key).signer_id, 120, f"node {name} to join")


def lie_claim(swarm):
    return next(r for r in records(swarm, "checkpoints", cluster=0) if r.signer == swarm["liar"]["signer"]).heldout_loss


def fetch(swarm, name):
    """`ddm-swarm fetch`: the ensemble a default `generate` would use, saved to a folder; its records."""
    out = swarm["tmp"] / name
    result = run_cli("fetch", "--swarm", str(swarm["path"]), "--out", str(out), "--cache-dir",
                     str(swarm["tmp"] / f"{name}-cache"), *sum([["--initial-peers", p] for p in swarm["peers"]], []))
    assert result.returncode == 0, result.stdout + result.stderr
    index = json.loads((out / "ensemble.json").read_text())
    return [decode_record(bytes.fromhex(entry["record"])) for entry in index["checkpoints"]]


def test_finite_garbage_at_a_higher_step_is_contradicted_by_audits_and_generate_uses_the_honest_expert(swarm):
    a, b, liar = signer(swarm, "a"), signer(swarm, "b"), swarm["liar"]
    honest = wait_until(lambda: [r for r in records(swarm, "checkpoints", cluster=0) if r.signer == a], 180,
                        "the honest trainer's checkpoint")[0]
    swarm["honest_sha"], swarm["honest_ref"] = honest.blob.sha256, honest.blob.to_wire()
    for sha, what in ((liar["sha256"], "the liar's"), (honest.blob.sha256, "the honest")):
        wait_until(lambda: [r for r in records(swarm, "audits", sha256=sha) if r.signer == b], 180,
                   f"the auditor's audit of {what} checkpoint")
    lie = next(r for r in records(swarm, "audits", sha256=liar["sha256"]) if r.signer == b)
    truth = next(r for r in records(swarm, "audits", sha256=honest.blob.sha256) if r.signer == b)
    assert lie.loss > 10 * lie_claim(swarm)  # the audit contradicts the liar's claim
    assert truth.loss <= honest.heldout_loss * 1.5 + 0.02  # an honest claim survives its audit

    used = {r.job.slug: r for r in fetch(swarm, "before")}
    assert used["expert-0"].signer == a and used["expert-0"].blob.sha256 != liar["sha256"]


def test_a_revoked_signer_is_refused_by_generators_and_no_longer_served_by_mirrors(swarm):
    a = signer(swarm, "a")
    wait_until(lambda: "mirroring expert/0" in "".join(swarm["b"].output), 120, "the mirror to hold expert/0")
    result = run_cli("revoke", "--signer", a, "--key", str(swarm["tmp"] / "operator.pem"), "--reason", "test",
                     "--swarm", str(swarm["path"]), *sum([["--initial-peers", p] for p in swarm["peers"]], []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"revoked signer {a}" in result.stdout
    swarm["b"].wait_for(lambda line: "stopped mirroring expert/0" in line, timeout=60)
    wait_until(lambda: not [p for p in records(swarm, "providers", ref=swarm["honest_ref"])
                            if p.signer == signer(swarm, "b")], 60, "the mirror's provider record to lapse")

    used = fetch(swarm, "after")
    assert [str(r.job) for r in used] == ["expert/1"] and a not in {r.signer for r in used}


def test_only_the_operator_key_can_revoke(swarm):
    stranger = swarm["tmp"] / "stranger.pem"
    load_or_create_identity(stranger)
    result = run_cli("revoke", "--checkpoint", swarm["liar"]["sha256"], "--key", str(stranger),
                     "--swarm", str(swarm["path"]), *sum([["--initial-peers", p] for p in swarm["peers"]], []))
    assert result.returncode != 0 and "operator" in result.stdout + result.stderr
