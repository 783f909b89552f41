"""The swarm end to end, with real processes on 127.0.0.1: a bootstrap peer, trainer nodes for
every job of a small swarm, `ddm-swarm generate`/`fetch` as a user runs them, a node killed with
SIGKILL whose job is taken over, and peers that lie. The tests run in order on one swarm.
"""

import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from node.identity_files import load_or_create_identity
from node.swarm.manifest_files import write_manifest_file
from protocol.hashing import BlobRef
from protocol.manifest import SwarmManifest
from protocol.records import decode_record
from tests.swarm_harness import (ROOT, BootstrapProcess, DhtPeer, LineProcess, NodeProcess, child_env, run_cli,
                                 wait_until)

pytestmark = pytest.mark.timeout(420)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    names = ["a", "b", "r", "c", "liar", "liar2"]
    signers = {name: load_or_create_identity(tmp / name / "identity.pem").signer_id for name in names}
    outsider = load_or_create_identity(tmp / "outsider" / "identity.pem").signer_id
    data = yaml.safe_load(TINY.read_text())
    data["trust"] = {"mode": "allowlist", "signers": list(signers.values())}
    manifest = SwarmManifest.from_dict(data)
    path = tmp / "tiny-allowlist.yaml"
    write_manifest_file(manifest, path)
    boot = BootstrapProcess(path, tmp / "boot.key")
    peers = boot.maddrs
    # no audits here (tests/test_audits_e2e.py has them): an audited honest checkpoint ranks before every
    # unaudited one, and the liars below would then never be tried, nor reported
    nodes = {"a": NodeProcess(path, tmp / "a", peers, "--job", "expert/0", "--no-audit"),
             "b": NodeProcess(path, tmp / "b", peers, "--job", "expert/1", "--no-audit"),
             "r": NodeProcess(path, tmp / "r", peers, "--job", "router", "--no-audit")}
    observer = DhtPeer(path, peers)
    state = {"tmp": tmp, "path": path, "manifest": manifest, "peers": peers, "signers": signers,
             "outsider": outsider, "nodes": nodes, "observer": observer, "others": []}
    yield state
    for process in [*nodes.values(), *state["others"], observer, boot]:
        process.kill()


def records(swarm, family, **extra):
    reply = swarm["observer"].call("read", family=family, **extra)
    return [decode_record(bytes.fromhex(hex_)) for hex_ in reply["records"]]


def latest_by(swarm, cluster, signer):
    mine = [r for r in records(swarm, "checkpoints", cluster=cluster) if r.signer == signer]
    return mine[0] if mine else None


def fetch_ensemble(swarm, out: Path) -> dict:
    result = run_cli("fetch", "--swarm", str(swarm["path"]), "--out", str(out), "--cache-dir",
                     str(out.parent / f"{out.name}-cache"), *sum([["--initial-peers", p] for p in swarm["peers"]], []))
    assert result.returncode == 0, result.stdout + result.stderr
    index = json.loads((out / "ensemble.json").read_text())
    return {"output": result.stdout + result.stderr,
            "records": [decode_record(bytes.fromhex(e["record"])) for e in index["checkpoints"]]}


def test_nodes_claim_every_job_train_and_announce_checkpoints(swarm):
    s = swarm["signers"]
    wait_until(lambda: latest_by(swarm, 0, s["a"]) and latest_by(swarm, 1, s["b"]) and
               [r for r in records(swarm, "router") if r.signer == s["r"]], 240, "a checkpoint of every job")
    claims = {str(c.job): c.signer for c in records(swarm, "claims") if c.state == "training"}
    assert claims == {"expert/0": s["a"], "expert/1": s["b"], "router": s["r"]}


def test_generate_mixes_a_ddpm_and_a_flow_matching_expert_and_writes_a_png(swarm):
    out = swarm["tmp"] / "digits.png"
    result = run_cli("generate", "the digit 3", "a handwritten seven", "--num", "3", "--out", str(out),
                     "--batch-size", "2", "--offload", "--device", "auto",  # in batches, experts moved in as routed
                     "--swarm", str(swarm["path"]), "--cache-dir", str(swarm["tmp"] / "gen-cache"),
                     *sum([["--initial-peers", p] for p in swarm["peers"]], []))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[1]: line.split() for line in result.stdout.splitlines() if line.startswith("│ ")}
    assert set(rows) >= {"expert/0", "expert/1", "router"}
    assert (rows["expert/0"][5], rows["expert/1"][5]) == ("fm", "ddpm")  # heterogeneous experts, mixed
    image = Image.open(out)
    assert image.size == (3 * (8 * 4 + 1) + 1, 2 * (8 * 4 + 1) + 1)
    assert len(set(image.get_flattened_data())) > 10  # real samples, not a blank grid


def test_untrusted_signer_and_lying_checkpoints_are_never_used(swarm):
    tmp, peers = swarm["tmp"], swarm["peers"]
    starting = []
    for identity, behaviour in (("outsider", "garbage"), ("liar", "corrupt"), ("liar2", "garbage")):
        key = tmp / identity / "identity.pem"
        process = LineProcess([sys.executable, "-m", "tests.peers.lying_node", "--manifest", str(swarm["path"]),
                               "--initial-peers", *peers, "--identity", str(key), "--cluster", "1",
                               "--behaviour", behaviour, "--store", str(tmp / f"store-{identity}")], env=child_env())
        swarm["others"].append(process)
        starting.append(process)
    # the three start side by side (DHT join, records signed and stored): under a full suite on a
    # slowed machine one start took more than 90 s
    liars = [json.loads(process.wait_for(lambda line: line.startswith("{"), timeout=180))["sha256"]
             for process in starting]
    outsider_sha, *allowed_liar_shas = liars
    # the allowed liars' records are in the swarm (their signatures are fine), the outsider's is not
    wait_until(lambda: {r.blob.sha256 for r in records(swarm, "checkpoints", cluster=1)} >= set(allowed_liar_shas),
               60, "the allowed liar's record")
    assert outsider_sha not in {r.blob.sha256 for r in records(swarm, "checkpoints", cluster=1)}
    fetched = fetch_ensemble(swarm, tmp / "with-liars")
    used = {r.blob.sha256 for r in fetched["records"]}
    assert not used & set(liars)
    assert [r.signer for r in fetched["records"] if getattr(r, "cluster", None) == 1] == [swarm["signers"]["b"]]
    for sha in allowed_liar_shas:
        assert sha[:16] in fetched["output"], fetched["output"][-4000:]  # reported as not used, with the reason


def test_checkpoint_survives_its_only_original_provider_through_a_mirror(swarm):
    a, signer = swarm["nodes"]["a"], swarm["signers"]["a"]

    def mirrored_and_frozen():
        latest = latest_by(swarm, 0, signer)
        providers = len(swarm["observer"].call("read", family="providers", ref=latest.blob.to_wire())["records"])
        if providers < 2:
            return None
        a.freeze()
        if latest_by(swarm, 0, signer) == latest:
            return latest
        a.thaw()  # a newer checkpoint slipped out before the freeze: wait for its mirror
        return None

    last = wait_until(mirrored_and_frozen, 120, "node A's latest checkpoint to be mirrored", every=0.5)
    a.kill()
    swarm["killed_step"] = last.step
    fetched = fetch_ensemble(swarm, swarm["tmp"] / "after-kill")
    expert0 = [r for r in fetched["records"] if getattr(r, "cluster", None) == 0]
    assert expert0 and expert0[0].blob.sha256 == last.blob.sha256


def test_killed_nodes_job_is_taken_over_from_its_last_checkpoint_after_the_lease_expires(swarm):
    time.sleep(3 * swarm["manifest"].timing.lease_s + 1)  # the dead node's lease runs out
    c = NodeProcess(swarm["path"], swarm["tmp"] / "c", swarm["peers"], "--no-audit")
    swarm["others"].append(c)
    killed_step, signer = swarm["killed_step"], swarm["signers"]["c"]
    first = wait_until(lambda: latest_by(swarm, 0, signer), 180, "the new node's first checkpoint of expert/0")
    assert first.step > killed_step
    assert f"resumed orphaned expert/0 from the swarm's checkpoint at step {killed_step}" in "".join(c.output)


def test_a_stopped_node_serves_its_last_checkpoint_until_a_mirror_holds_it(swarm):
    b = swarm["nodes"]["b"]
    b.proc.terminate()  # SIGTERM, as `kill` or a service manager stops a node
    assert b.proc.wait(90) == 0, "".join(b.output)[-3000:]
    output = " ".join("".join(b.output).split())
    step = int(output.split("handing checkpoint step ")[1].split()[0])
    assert f"another peer holds checkpoint step {step} now: leaving" in output
    last = latest_by(swarm, 1, swarm["signers"]["b"])
    assert last.step == step  # the checkpoint written on stopping, after the last periodic one
    providers = swarm["observer"].call("read", family="providers", ref=last.blob.to_wire())["records"]
    assert len({decode_record(bytes.fromhex(h)).peer_id for h in providers}) >= 2
    # filed under the whole reference: a made-up one (the honest size, another digest list) names no provider
    bogus = BlobRef.of(last.blob.size, "0" * 64).to_wire()
    assert swarm["observer"].call("read", family="providers", ref=bogus)["records"] == []
