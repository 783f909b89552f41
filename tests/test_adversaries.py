"""Adversaries in an open swarm, with real processes on 127.0.0.1: a squatter that claims jobs it
never trains, peers that announce poisoned checkpoints (NaN weights, another architecture, a record
that claims a later step than its file), and a Sybil flood of valid-looking records. Honest nodes
still take the squatted jobs and train them, a node resuming a job skips every poisoned checkpoint,
and the honest ensemble still assembles. The tests run in order on one swarm.
"""

import json
import os
import sys
import time

import pytest
import yaml

from node.checkpoints.acceptance import STEP_SLACK
from node.identity_files import load_identity
from node.swarm.manifest_files import write_manifest_file
from protocol.identity import Identity
from protocol.manifest import SwarmManifest
from protocol.hashing import blob_ref_of
from protocol.limits import MAX_STEP, MAX_SUBKEYS_PER_KEY
from protocol.records import CheckpointRecord, Claim, RouterRecord, decode_record
from tests.checkpoint_fixtures import write_expert_checkpoint
from tests.swarm_harness import ROOT, BootstrapProcess, DhtPeer, LineProcess, NodeProcess, child_env, run_cli, wait_until

pytestmark = pytest.mark.timeout(420)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"
SQUATTED = ("expert/1", "router")
FLOOD = 1000
# checkpoint records flooded under expert/0's key: most of a key, not all of it. Past the cap a key keeps
# what it holds and refuses new signers (SECURITY.md), which would keep the resuming node's own first
# record off it; that cap is tested in test_swarm_dht.py, here the flood is what a resuming node and a
# generator must pass over
CHECKPOINT_FLOOD = MAX_SUBKEYS_PER_KEY - 64


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adversaries")
    manifest = SwarmManifest.from_dict(yaml.safe_load(TINY.read_text()))
    path = tmp / "open.yaml"
    write_manifest_file(manifest, path)
    boot = BootstrapProcess(path, tmp / "boot.key")
    peers = boot.maddrs
    # no audits (tests/test_audits_e2e.py has them): an audited honest checkpoint would rank before the
    # poison, which then is never fetched, and these refusals not exercised
    trainer = NodeProcess(path, tmp / "a", peers, "--job", "expert/0", "--no-audit")  # trains all along
    observer = DhtPeer(path, peers)
    state = {"tmp": tmp, "path": path, "manifest": manifest, "peers": peers, "observer": observer,
             "nodes": {"a": trainer}, "others": []}
    yield state
    for process in [*state["nodes"].values(), *state["others"], observer, boot]:
        process.kill()


def records(swarm, family, **extra):
    reply = swarm["observer"].call("read", family=family, **extra)
    return [decode_record(bytes.fromhex(hex_)) for hex_ in reply["records"]]


def signer_of(swarm, name):
    return wait_until(lambda: (swarm["tmp"] / name / "identity.pem").exists() and
                      load_identity(swarm["tmp"] / name / "identity.pem").signer_id, 120, f"node {name} to join")


def announced(swarm, cluster, signer):
    return [r for r in records(swarm, "checkpoints", cluster=cluster) if r.signer == signer]


def job_of(swarm, signer):
    jobs = [str(c.job) for c in records(swarm, "claims") if c.signer == signer and c.state == "training"]
    return jobs[0] if jobs else None


def _blobless_record(manifest, job, signer, now):
    """A checkpoint record of `job` whose blob nobody has: what a squatter signs to look proven."""
    blob = blob_ref_of(os.urandom(64))
    if job == "router":
        record = RouterRecord(manifest.swarm_id, manifest.router.name, manifest.router.spec_hash,
                              manifest.num_clusters, 10**6, 32 * 10**6, 0.99, blob, blob, "", now, now + 600)
    else:
        spec = manifest.expert_for_cluster(1)
        record = CheckpointRecord(manifest.swarm_id, 1, spec.name, spec.objective, spec.spec_hash, 10**6,
                                  32 * 10**6, 0.001, blob, blob, "", now, now + 600)
    return record.signed_by(signer)


def test_squatted_jobs_are_taken_by_an_honest_node_that_then_trains_one(swarm):
    now = time.time()
    for job in SQUATTED:  # three claims each, living the longest a claim may (15 min), never trained, and a
        for _ in range(3):  # checkpoint record each whose blob does not exist: "proof" of work never done
            squatter = Identity.generate()
            claim = Claim(swarm["manifest"].swarm_id, job, "tiny-fm", swarm["observer"].peer_id, 10**6, "training",
                          now + 800).signed_by(squatter)
            swarm["observer"].call("publish", record=claim.encode().hex())
            record = _blobless_record(swarm["manifest"], job, squatter, now)
            swarm["observer"].call("publish", record=record.encode().hex())
    a = signer_of(swarm, "a")
    wait_until(lambda: announced(swarm, 0, a), 180, "the trainer of expert/0 to checkpoint")
    # expert/0 has one claim (a proven trainer), the squatted jobs three each: by claim counts alone,
    # or counting every signer of a record as proven, a newcomer would join expert/0
    b_node = NodeProcess(swarm["path"], swarm["tmp"] / "b", swarm["peers"], "--max-steps", "40", "--no-audit")
    swarm["nodes"]["b"] = b_node
    b = signer_of(swarm, "b")
    job = wait_until(lambda: job_of(swarm, b), 120, "the newcomer's claim")
    assert job in SQUATTED
    cluster = 1 if job == "expert/1" else None
    wait_until(lambda: (announced(swarm, cluster, b) if cluster is not None else
                        [r for r in records(swarm, "router") if r.signer == b]), 180, f"a checkpoint of {job}")
    swarm["b_job"] = job


def test_node_resuming_a_job_skips_poisoned_doctored_and_flooded_checkpoints(swarm):
    tmp, manifest = swarm["tmp"], swarm["manifest"]
    # Poison at steps a resuming node still finds plausible (within STEP_SLACK of the trainer's
    # verified progress), so that it fetches and refuses each for what it is; and one real checkpoint
    # at a step no training reaches, which it passes over unfetched (adopted, every trainer of the job
    # would count on from there).
    top = max(r.step for r in announced(swarm, 0, signer_of(swarm, "a"))) + STEP_SLACK // 2
    steps = [top + 2, top + 1, top, MAX_STEP - 1]
    poisoned = [write_expert_checkpoint(manifest, "tiny-fm", 0, steps[0], tmp / "nan.safetensors", poison="nan"),
                write_expert_checkpoint(manifest, "tiny-fm", 0, steps[1], tmp / "narrow.safetensors",
                                        poison="wrong-architecture"),
                write_expert_checkpoint(manifest, "tiny-fm", 0, 5, tmp / "old.safetensors"),  # claims `top`
                write_expert_checkpoint(manifest, "tiny-fm", 0, steps[3], tmp / "far.safetensors")]
    liar = LineProcess([sys.executable, "-m", "tests.peers.lying_node", "--manifest", str(swarm["path"]),
                        "--initial-peers", *swarm["peers"], "--identity", str(tmp / "liar" / "identity.pem"),
                        "--cluster", "0", "--behaviour", "file", "--file", *map(str, poisoned),
                        "--step", *map(str, steps),
                        "--store", str(tmp / "liar-store")],
                       env=child_env())
    swarm["others"].append(liar)
    announced_line = json.loads(liar.wait_for(lambda line: line.startswith("{"), timeout=90))
    swarm["liar_shas"], swarm["liar_exports"] = announced_line["sha256s"], announced_line["inference_sha256s"]
    swarm["liar_refs"], swarm["liar_export_refs"] = announced_line["refs"], announced_line["inference_refs"]
    adversary = DhtPeer(swarm["path"], swarm["peers"], adversary=True)
    swarm["others"].append(adversary)
    adversary.call("flood", timeout=300, family="checkpoints", count=CHECKPOINT_FLOOD, options={"cluster": 0})
    assert adversary.call("flood", timeout=300, family="claims", count=FLOOD)["stored"]
    liars = set(swarm["liar_shas"])
    wait_until(lambda: (lambda found: len(found) > MAX_SUBKEYS_PER_KEY // 2 and
                        liars <= {r.blob.sha256 for r in found})(records(swarm, "checkpoints", cluster=0)),
               60, "the poison and the flood")
    # and its provider records (published after the checkpoint records): a poison nobody provides is
    # passed over unfetched, which would leave the refusals below unexercised
    served = [*swarm["liar_refs"][:3], *swarm["liar_export_refs"][:3]]
    wait_until(lambda: all(swarm["observer"].call("read", family="providers", ref=ref)["records"]
                           for ref in served), 90, "the liar's provider records")

    a = signer_of(swarm, "a")
    d = NodeProcess(swarm["path"], tmp / "d", swarm["peers"], "--job", "expert/0", "--no-audit")
    swarm["nodes"]["d"] = d
    line = d.wait_for(lambda text: "resumed orphaned expert/0" in text, timeout=180)
    step = int(line.split("at step")[1].split()[0])
    every = swarm["manifest"].timing.checkpoint_every_steps
    assert 40 <= step <= announced(swarm, 0, a)[0].step and step % every == 0  # one of the trainer's own
    output = "".join(d.output)
    assert output.count("skipping checkpoint") >= 3, output[-6000:]  # NaN weights, another architecture, an older file
    assert f"step {MAX_STEP - 1}" not in output  # the far-ahead one is passed over, never even fetched
    assert "claiming a step beyond what their job can have reached" in output
    first = wait_until(lambda: announced(swarm, 0, signer_of(swarm, "d")), 180, "the resumed node's checkpoint")
    assert first[0].step > step


def test_honest_ensemble_assembles_despite_every_adversary(swarm):
    started = time.monotonic()
    out = swarm["tmp"] / "ensemble"
    result = run_cli("fetch", "--swarm", str(swarm["path"]), "--out", str(out), "--cache-dir",
                     str(swarm["tmp"] / "fetch-cache"), *sum([["--initial-peers", p] for p in swarm["peers"]], []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 150
    index = json.loads((out / "ensemble.json").read_text())
    used = [decode_record(bytes.fromhex(entry["record"])) for entry in index["checkpoints"]]
    honest = {signer_of(swarm, name) for name in ("a", "b", "d")}
    assert {r.signer for r in used} <= honest
    assert not {r.blob.sha256 for r in used} & set(swarm["liar_shas"])
    assert not {r.inference.sha256 for r in used} & set(swarm["liar_exports"])
    # the generator too downloaded the poisoned exports (the highest steps) and refused each for what it is
    output = " ".join((result.stdout + result.stderr).split())
    nan_sha, narrow_sha, _, _ = swarm["liar_exports"]
    for sha, reason in ((nan_sha, "NaN"), (narrow_sha, "another architecture")):
        said = output.find(f"not used {sha[:16]}")
        assert said >= 0 and reason in output[said:said + 400], output[-3000:]
    jobs = {"router" if r.KIND == "router" else f"expert/{r.cluster}" for r in used}
    assert jobs == {"expert/0", swarm["b_job"]}
    for process in [*swarm["nodes"].values(), swarm["observer"]]:
        assert process.alive()
