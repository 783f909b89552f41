"""Network faults, with real processes on 127.0.0.1: a bootstrap peer that is down while an
alternate is up, every bootstrap down (a clear error, and nothing written to the data folder), and
a provider that stalls in the middle of a checkpoint download.
"""

import json
import sys

import pytest
import yaml

from node.identity_files import load_identity
from node.swarm.manifest_files import write_manifest_file
from node.swarm.peer_cache import PeerCache
from protocol.hashing import blob_ref_of
from protocol.limits import CHUNK_BYTES
from protocol.manifest import SwarmManifest
from protocol.records import decode_record
from tests.checkpoint_fixtures import write_expert_checkpoint, write_export_as_is
from tests.swarm_harness import (ROOT, BootstrapProcess, DhtPeer, LineProcess, NodeProcess, child_env, run_cli,
                                 wait_until)

pytestmark = pytest.mark.timeout(300)
TINY = ROOT / "tests" / "manifests" / "tiny.yaml"
NOBODY = [f"/ip4/127.0.0.1/tcp/{port}/p2p/12D3KooWPMGeYauVRuNQLfQFUzhUUDMG1bjoY8GwNhmrMBM28Hk5" for port in (1, 2)]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """The tiny swarm plus a wide expert model (its checkpoints span ~9 blob chunks); two bootstrap
    peers, the second joined through the first; an observer joined through the second."""
    tmp = tmp_path_factory.mktemp("faults")
    data = yaml.safe_load(TINY.read_text())
    data["experts"].append({"name": "wide-fm", "objective": "fm",
                            "architecture": {"size": "digits-8x8", "width": 256, "depth": 5, "heads": 4}})
    manifest = SwarmManifest.from_dict(data)
    path = tmp / "faults.yaml"
    write_manifest_file(manifest, path)
    first = BootstrapProcess(path, tmp / "first.key")
    second = BootstrapProcess(path, tmp / "second.key", initial_peers=first.maddrs)
    observer = DhtPeer(path, second.maddrs)
    state = {"tmp": tmp, "path": path, "manifest": manifest, "first": first, "second": second,
             "observer": observer, "others": []}
    yield state
    for process in [*state["others"], observer, second, first]:
        process.kill()


def peer_args(addresses):
    return sum([["--initial-peers", address] for address in addresses], [])


def records(swarm, family, **extra):
    reply = swarm["observer"].call("read", family=family, **extra)
    return [decode_record(bytes.fromhex(hex_)) for hex_ in reply["records"]]


def folder_snapshot(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_node_with_every_bootstrap_down_exits_naming_them_and_writes_nothing(swarm):
    data_dir = swarm["tmp"] / "never-joined"
    result = run_cli("node", "--swarm", str(swarm["path"]), "--data-dir", str(data_dir), "--host", "127.0.0.1",
                     *peer_args(NOBODY), timeout=120)
    assert result.returncode == 1
    output = (result.stdout + result.stderr).replace("\n", "")
    assert "none of the initial peers answered" in output
    assert all(address in output for address in NOBODY)
    assert not data_dir.exists()


def test_node_joins_through_an_alternate_when_the_first_bootstrap_is_down(swarm):
    addresses = swarm["first"].maddrs + swarm["second"].maddrs
    swarm["first"].kill()
    data_dir = swarm["tmp"] / "alternate"
    node = NodeProcess(swarm["path"], data_dir, addresses, "--job", "expert/0", "--max-steps", "1",
                       "--exit-when-done", "--no-mirror")
    swarm["others"].append(node)
    assert node.proc.wait(180) == 0, "".join(node.output)[-3000:]
    signer = load_identity(data_dir / "identity.pem").signer_id
    announced = wait_until(lambda: [r for r in records(swarm, "checkpoints", cluster=0) if r.signer == signer], 30,
                           "the node's checkpoint, seen by a peer of the alternate bootstrap")
    assert announced[0].step == 1


def test_known_node_with_every_bootstrap_and_cached_peer_down_fails_clearly_and_changes_nothing(swarm):
    data_dir = swarm["tmp"] / "alternate"  # joined and trained in the test above
    # the peers it met are live here (rejoining through them is tests/test_peer_cache.py's): make them gone too
    PeerCache(data_dir / "peers.json").save(NOBODY[::-1])
    before = folder_snapshot(data_dir)
    assert "identity.pem" in before and "p2p.key" in before
    result = run_cli("node", "--swarm", str(swarm["path"]), "--data-dir", str(data_dir), "--host", "127.0.0.1",
                     *peer_args(NOBODY[:1]), timeout=180)
    assert result.returncode == 1
    assert "none of the initial peers answered" in (result.stdout + result.stderr).replace("\n", "")
    assert folder_snapshot(data_dir) == before


def test_client_fetch_switches_provider_when_one_stalls_mid_checkpoint(swarm):
    tmp, peers = swarm["tmp"], swarm["second"].maddrs
    checkpoint = write_expert_checkpoint(swarm["manifest"], "wide-fm", 1, 7, tmp / "wide.safetensors")
    export = write_export_as_is(checkpoint, tmp / "wide-export.safetensors")  # one export both providers serve
    # a generator fetches the export (EMA weights in bfloat16: a quarter of this state of two float32 copies)
    assert checkpoint.stat().st_size > 8 * CHUNK_BYTES  # enough chunks that both providers are asked for some

    def announcer(name, *extra):
        process = LineProcess([sys.executable, "-m", "tests.peers.lying_node", "--manifest", str(swarm["path"]),
                               "--initial-peers", *peers, "--identity", str(tmp / name / "identity.pem"),
                               "--cluster", "1", "--model", "wide-fm", "--step", "7", "--behaviour", "file",
                               "--file", str(checkpoint), "--export", str(export), "--store", str(tmp / f"store-{name}"), *extra],
                              env=child_env())
        swarm["others"].append(process)
        return json.loads(process.wait_for(lambda line: line.startswith("{"), timeout=90))

    honest = announcer("honest")
    staller = announcer("staller", "--provide-only", "--stall-after-bytes", str(CHUNK_BYTES // 2))
    assert honest["inference_sha256s"] == staller["inference_sha256s"]
    sha256, export = honest["inference_sha256s"][0], honest["inference_refs"][0]
    wait_until(lambda: len(swarm["observer"].call("read", family="providers", ref=export)["records"]) == 2,
               30, "both providers of the checkpoint")
    out = tmp / "fetched"
    result = run_cli("fetch", "--swarm", str(swarm["path"]), "--out", str(out), "--cache-dir", str(tmp / "cache"),
                     *peer_args(peers), timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    flat = " ".join(output.split())
    # timed out, or outrun in the endgame when the honest provider delivered its chunk first
    assert "dropped for blob" in output and ("no bytes for" in flat or "outrun in the endgame" in flat)
    saved = json.loads((out / "ensemble.json").read_text())["checkpoints"]
    assert [entry["file"] for entry in saved] == ["expert_1/diffusion_pytorch_model.safetensors"]
    assert blob_ref_of((out / saved[0]["file"]).read_bytes()).sha256 == sha256
