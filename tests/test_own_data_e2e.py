"""Your own captioned images, end to end, as a user runs it: a folder of captioned coloured shapes
-> `ddm-swarm swarm create` -> `ddm-swarm bootstrap` (it seeds the shards beside the
manifest) -> a node per job, each fetching only its own job's shards -> `ddm-swarm generate` of
free-text prompts -> an RGB PNG. One shard is offered by a peer that corrupts its bytes: the node
bans it and takes the shard from the manifest's mirror URL instead."""

import json
import shutil
import sys

import pytest
from PIL import Image

from node.data.shards import expert_shards, router_shards
from node.swarm.manifest_files import read_manifest_file
from protocol.records import decode_record
from tests.captioned_data import write_image_folder
from tests.swarm_harness import BootstrapProcess, DhtPeer, LineProcess, NodeProcess, child_env, run_cli, wait_until

pytestmark = pytest.mark.timeout(600)
@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own-data")
    folder = write_image_folder(tmp / "photos", 48)
    mirror = tmp / "mirror"
    manifest_path = tmp / "shapes.yaml"
    created = run_cli("swarm", "create", "--data", str(folder), "--clusters", "2", "--image-size", "16",
                      "--out", str(manifest_path), "--router-samples", "32", "--expert-size", "tiny",
                      "--lease-s", "3", "--shard-url", mirror.as_uri())
    assert created.returncode == 0, created.stderr
    manifest = read_manifest_file(manifest_path)
    shards = manifest_path.with_name("shapes.shards")
    shutil.copytree(shards, mirror)  # the mirror URL serves every shard
    victim = expert_shards(manifest, 0).train[0][0].blob.sha256
    corrupt_source = tmp / f"{victim}.tar"
    (shards / f"{victim}.tar").rename(corrupt_source)  # the operator does not seed this one
    state = {"tmp": tmp, "path": manifest_path, "manifest": manifest, "created": created, "victim": victim,
             "processes": []}
    boot = BootstrapProcess(manifest_path, tmp / "boot.key")
    state["processes"].append(boot)
    state["peers"] = boot.maddrs
    liar = LineProcess([sys.executable, "-m", "tests.peers.corrupt_seeder", str(manifest_path), str(corrupt_source),
                        boot.maddrs[0]], env=child_env())
    state["processes"].append(liar)
    state["liar"] = json.loads(liar.wait_for(lambda line: line.startswith("{"), timeout=120))["peer_id"]
    state["nodes"] = {job: NodeProcess(manifest_path, tmp / job.replace("/", "-"), boot.maddrs, "--job", job,
                                       "--max-steps", "30") for job in ("expert/0", "expert/1", "router")}
    state["processes"] += list(state["nodes"].values())
    state["observer"] = DhtPeer(manifest_path, boot.maddrs)
    state["processes"].append(state["observer"])
    yield state
    for process in state["processes"]:
        process.kill()


def records(swarm, family, **extra):
    reply = swarm["observer"].call("read", family=family, **extra)
    return [decode_record(bytes.fromhex(hex_)) for hex_ in reply["records"]]


def test_swarm_create_reports_the_clusters_and_the_shards_it_wrote(swarm):
    out = swarm["created"].stdout
    assert "48 images in 2 clusters" in out and "shards" in out, out
    assert swarm["manifest"].dataset.kind == "shards" and len(swarm["manifest"].dataset.clusters) == 2


def test_every_job_trains_on_its_shards_and_announces_a_checkpoint(swarm):
    wait_until(lambda: records(swarm, "checkpoints", cluster=0) and records(swarm, "checkpoints", cluster=1)
               and records(swarm, "router"), 420, "a checkpoint of every job")


def test_each_node_holds_only_its_own_jobs_shards(swarm):
    manifest = swarm["manifest"]
    every_shard = {s.blob.sha256 for s in manifest.dataset.all_shards()}
    wanted = {"expert/0": expert_shards(manifest, 0), "expert/1": expert_shards(manifest, 1),
              "router": router_shards(manifest)}
    for job, node in swarm["nodes"].items():
        held = {p.name for p in (node.data_dir / "blobs" / "blobs").rglob("*") if p.is_file()} & every_shard
        assert held == {blob.sha256 for blob in wanted[job].blobs}, job
        assert wanted[job].bytes < sum(s.blob.size for s in manifest.dataset.all_shards())


def test_a_provider_of_corrupt_shard_bytes_is_banned_and_the_mirror_url_serves_the_shard(swarm):
    log = "".join(swarm["nodes"]["expert/0"].output)
    assert swarm["liar"] in log and "does not match" in log, log[-3000:]
    assert "trying the mirror URLs" in log


def test_generate_draws_rgb_images_for_free_text_prompts(swarm):
    out = swarm["tmp"] / "shapes.png"
    result = run_cli("generate", "a red circle", "a large blue square on white", "--num", "2", "--steps", "4",
                     "--out", str(out), "--swarm", str(swarm["path"]), "--initial-peers", swarm["peers"][0],
                     "--cache-dir", str(swarm["tmp"] / "gen-cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(out) as image:
        assert image.mode == "RGB" and image.width > 32
