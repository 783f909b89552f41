"""`ddm-swarm node --init-from`: a node whose job has nothing to resume starts its FM expert from a
DDPM checkpoint of its cluster (a file, or the swarm's best record) or from a facebookresearch DiT
file, and announces ordinary checkpoints of the swarm's FM spec that other peers accept. Real nodes
against a real bootstrap peer on 127.0.0.1; the sources are tiny checkpoints made here. A wrong
source is a typed error, and `ddm-swarm node` refuses it in one line before it joins. Each node
test takes 20-50 s on a loaded machine."""

import argparse
import dataclasses
import time

import pytest
import torch

from ddm_models.checkpoint import (CheckpointMetadata, checkpoint_tensors, read_checkpoint, state_dict_part,
                                   write_checkpoint)
from ddm_models.experts import build_expert
from node.blobs.store import BlobStore
from node.checkpoints.acceptance import check_expert
from node.checkpoints.specs import expert_config
from node.identity_files import load_or_create_identity
from node.swarm.manifest_files import load_manifest
from node.trainer.initialisation import InvalidInitSource, read_init_source
from protocol.jobs import Job
from protocol.records import decode_record
from tests.checkpoint_fixtures import write_expert_checkpoint
from tests.swarm_harness import ROOT, BootstrapProcess, DhtPeer, NodeProcess, run_cli, wait_until

pytestmark = pytest.mark.timeout(180)
MANIFEST_PATH = ROOT / "tests" / "manifests" / "pretrained.yaml"
MANIFEST = load_manifest(str(MANIFEST_PATH))
FM, DDPM = "init-fm", "init-ddpm"
STEPS = 3  # the node's first (and only) save: its weights are still close to where training started
BLOCK = "transformer_blocks.0.attn1.to_q.weight"  # a trunk weight every source provides
# a peer that is not there: a refused source must fail before the node tries to join
NOWHERE = "/ip4/127.0.0.1/tcp/9/p2p/QmaCpDMGvV2BGHeYERUEnRQAwe3N8SzbUtfsmvsqQLuvuJ"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("init-from")
    boot = BootstrapProcess(MANIFEST_PATH, tmp / "boot.key")
    observer = DhtPeer(MANIFEST_PATH, boot.maddrs)
    started = []
    yield {"tmp": tmp, "peers": boot.maddrs, "observer": observer, "started": started}
    for process in [*started, observer, boot]:
        process.kill()


def start_node(swarm, name: str, *extra: str) -> NodeProcess:
    node = NodeProcess(MANIFEST_PATH, swarm["tmp"] / name, swarm["peers"], "--max-steps", str(STEPS), "--threads", "1",
                       "--device", "cpu", "--no-mirror", *extra)
    swarm["started"].append(node)
    return node


def announced(swarm, node: NodeProcess, cluster: int, model: str):
    """The checkpoint record `node` announced for `cluster` and `model`, as another peer reads it."""
    signer = load_or_create_identity(node.data_dir / "identity.pem").signer_id

    def read():
        reply = swarm["observer"].call("read", family="checkpoints", cluster=cluster)
        records = [decode_record(bytes.fromhex(hex_)) for hex_ in reply["records"]]
        return [r for r in records if r.signer == signer and r.model == model]
    try:
        return wait_until(lambda: read() or not node.alive(), 90, f"{model}'s checkpoint of cluster {cluster}")[0]
    except (AssertionError, TypeError):  # timed out, or the node exited
        raise AssertionError("no checkpoint announced; the node's output:\n" + "".join(node.output)[-3000:]) from None


def accepted_weights(swarm, node: NodeProcess, record) -> dict:
    """The weights of `record`'s checkpoint once another peer fetched it and the swarm's acceptance
    check (header against the signed record and the manifest's spec, then load) passed."""
    reply = swarm["observer"].call("fetch", store=str(swarm["tmp"] / "observer-blobs"), sha256=record.blob.sha256,
                                   size=record.blob.size, chunks_sha256=record.blob.chunks_sha256)
    assert reply["ok"], reply
    path = BlobStore(node.data_dir / "blobs").path(record.blob.sha256)  # the bytes the observer just verified
    return check_expert(path, record, MANIFEST).model.state_dict()


def stop(node: NodeProcess) -> str:
    """Ctrl-C once the budget is spent; the node's log with its line wraps undone."""
    node.wait_for(lambda line: "still serving" in line, timeout=60)
    node.interrupt()
    assert node.proc.wait(60) == 0, "".join(node.output)[-3000:]
    return " ".join("".join(node.output).split())


def fresh_block(model: str, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return build_expert(expert_config(MANIFEST.expert_spec(model), MANIFEST)).state_dict()[BLOCK]


def write_dit_file(path, seed: int = 5):
    """A facebookresearch DiT-shaped state dict (learned sigma: 2 x 1 output channels) for the FM
    spec's trunk, saved with torch.save as DiT releases its weights."""
    config = expert_config(MANIFEST.expert_spec(FM), MANIFEST)
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    d, p, out, hidden = config.width, config.patch_size, 2 * config.in_channels, int(config.mlp_ratio * config.width)
    state = {"x_embedder.proj.weight": r(d, config.in_channels, p, p), "x_embedder.proj.bias": r(d),
             "pos_embed": build_expert(config).pos_embed.pos_embed.clone(),
             "t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d),
             "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
             "y_embedder.embedding_table.weight": r(11, d),
             "final_layer.linear.weight": r(p * p * out, d), "final_layer.linear.bias": r(p * p * out)}
    for i in range(config.depth):
        state.update({f"blocks.{i}.attn.qkv.weight": r(3 * d, d), f"blocks.{i}.attn.qkv.bias": r(3 * d),
                      f"blocks.{i}.attn.proj.weight": r(d, d), f"blocks.{i}.attn.proj.bias": r(d),
                      f"blocks.{i}.mlp.fc1.weight": r(hidden, d), f"blocks.{i}.mlp.fc1.bias": r(hidden),
                      f"blocks.{i}.mlp.fc2.weight": r(d, hidden), f"blocks.{i}.mlp.fc2.bias": r(d),
                      f"blocks.{i}.adaLN_modulation.1.weight": r(6 * d, d),
                      f"blocks.{i}.adaLN_modulation.1.bias": r(6 * d)})
    torch.save(state, path)
    return state


def assert_started_from(weights: torch.Tensor, source: torch.Tensor, fresh: torch.Tensor) -> None:
    """A few steps moved the weights a little from the source; a random start is far from it."""
    moved, random = (weights - source).abs().max().item(), (fresh - source).abs().max().item()
    assert moved < 0.1 * random, (moved, random)


def test_a_node_initialised_from_a_ddpm_file_announces_an_accepted_fm_checkpoint_of_its_cluster(swarm):
    source = write_expert_checkpoint(MANIFEST, DDPM, cluster=0, step=500, path=swarm["tmp"] / "ddpm.safetensors",
                                     seed=123)
    node = start_node(swarm, "from-ddpm", "--init-from", str(source))  # no --job: the checkpoint's cluster
    record = announced(swarm, node, cluster=0, model=FM)
    assert (record.step, record.spec_hash) == (STEPS, MANIFEST.expert_spec(FM).spec_hash)
    weights = accepted_weights(swarm, node, record)
    ddpm = state_dict_part(read_checkpoint(source)[1], "ema")
    assert_started_from(weights[BLOCK], ddpm[BLOCK], fresh_block(FM, seed=0))
    assert f"initialised expert/0 (model '{FM}') from DDPM checkpoint" in stop(node)

    again = start_node(swarm, "from-ddpm", "--init-from", str(source), "--max-steps", str(2 * STEPS))
    output = stop(again)  # its own state wins over --init-from
    assert f"--init-from DDPM checkpoint {source} ignored: expert/0 resumed from this node's own state" in output
    assert announced(swarm, again, cluster=0, model=FM).step == 2 * STEPS


def test_a_node_initialised_from_a_dit_file_keeps_dits_trunk(swarm):
    dit = write_dit_file(swarm["tmp"] / "DiT-tiny.pt")
    node = start_node(swarm, "from-dit", "--job", "expert/1", "--init-from", str(swarm["tmp"] / "DiT-tiny.pt"))
    record = announced(swarm, node, cluster=1, model=FM)
    weights = accepted_weights(swarm, node, record)
    q = dit["blocks.0.attn.qkv.weight"].chunk(3)[0]
    assert_started_from(weights[BLOCK], q, fresh_block(FM, seed=0))
    assert "from DiT checkpoint" in stop(node)


def test_a_node_initialised_from_the_swarm_converts_its_clusters_best_ddpm_record(swarm):
    trainer = start_node(swarm, "ddpm-trainer", "--job", "expert/2", "--model", DDPM, "--seed", "7")
    ddpm_record = announced(swarm, trainer, cluster=2, model=DDPM)
    node = start_node(swarm, "from-swarm", "--job", "expert/2", "--init-from", "swarm")
    record = announced(swarm, node, cluster=2, model=FM)
    assert record.parent == ddpm_record.blob.sha256  # its lineage names the DDPM checkpoint it came from
    weights = accepted_weights(swarm, node, record)
    ddpm = accepted_weights(swarm, trainer, ddpm_record)
    assert_started_from(weights[BLOCK], ddpm[BLOCK], fresh_block(FM, seed=0))
    assert "from the swarm's DDPM checkpoint of model" in stop(node)
    stop(trainer)


def _not_a_checkpoint(tmp):
    (tmp / "notes.txt").write_text("not weights")
    return ["--init-from", str(tmp / "notes.txt")], "not a file torch.save wrote"


def _fm_checkpoint(tmp):
    path = write_expert_checkpoint(MANIFEST, FM, cluster=0, step=10, path=tmp / "fm.safetensors")
    return ["--init-from", str(path)], "is a fm expert checkpoint"


def _ddpm_of_another_cluster(tmp):
    path = write_expert_checkpoint(MANIFEST, DDPM, cluster=0, step=10, path=tmp / "ddpm0.safetensors")
    return ["--init-from", str(path), "--job", "expert/1"], "cluster 0, --job is expert/1"


def _ddpm_of_a_ddpm_cluster(tmp):
    path = write_expert_checkpoint(MANIFEST, DDPM, cluster=3, step=10, path=tmp / "ddpm3.safetensors")
    return ["--init-from", str(path)], "expert/3 trains the ddpm model"


def _ddpm_of_another_width(tmp):
    path = write_expert_checkpoint(MANIFEST, DDPM, cluster=0, step=10, path=tmp / "narrow.safetensors",
                                   poison="wrong-architecture")
    return ["--init-from", str(path)], "they differ in width (16 vs 32)"


def _ddpm_whose_tensors_belie_its_header(tmp):
    config = expert_config(MANIFEST.expert_spec(DDPM), MANIFEST)
    narrow = build_expert(dataclasses.replace(config, width=16)).state_dict()
    path = write_checkpoint(tmp / "lying.safetensors", CheckpointMetadata(kind="expert", config=config, cluster=0,
                                                                          step=10, samples_seen=0),
                            checkpoint_tensors(narrow, narrow))
    return ["--init-from", str(path)], "its tensors do not fit the architecture its header names"


def _dit_with_pickled_objects(tmp):
    torch.save({"model": write_dit_file(tmp / "dit.pt"), "args": argparse.Namespace(model="DiT-XL/2")}, tmp / "dit.pt")
    return ["--init-from", str(tmp / "dit.pt")], "holds pickled objects other than tensors; it is refused unread"


def _dit_of_another_width(tmp):
    state = write_dit_file(tmp / "dit.pt")
    state["x_embedder.proj.weight"] = torch.zeros(48, 1, 2, 2)
    torch.save(state, tmp / "dit.pt")
    return ["--init-from", str(tmp / "dit.pt")], "width: DiT has 48"


BAD_SOURCES = [_not_a_checkpoint, _fm_checkpoint, _ddpm_of_another_cluster, _ddpm_of_a_ddpm_cluster,
               _ddpm_of_another_width, _ddpm_whose_tensors_belie_its_header, _dit_with_pickled_objects, _dit_of_another_width]


@pytest.mark.parametrize("bad", BAD_SOURCES)
def test_a_source_that_cannot_initialise_the_expert_is_a_typed_error_saying_why(tmp_path, bad):
    args, reason = bad(tmp_path)
    job = Job.parse(args[args.index("--job") + 1]) if "--job" in args else None
    with pytest.raises(InvalidInitSource) as refused:
        read_init_source(args[1], MANIFEST, job)
    assert reason in str(refused.value)


@pytest.mark.parametrize("bad", [_not_a_checkpoint, _ddpm_of_another_cluster, _dit_of_another_width])
def test_a_source_that_cannot_initialise_the_expert_is_refused_before_joining(tmp_path, bad):
    args, reason = bad(tmp_path)
    started = time.monotonic()
    result = run_cli("node", "--swarm", str(MANIFEST_PATH), "--data-dir", str(tmp_path / "node"),
                     "--initial-peers", NOWHERE, *args, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error:" in result.stderr and reason in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "node").exists()  # it never joined
    assert time.monotonic() - started < 45


def _dit_position_table(width: int, grid: int) -> torch.Tensor:
    """DiT's fixed position table as its models.py computes it (MAE's 2D sin-cos, w first): (1, T, D)."""
    def one_axis(dim, positions):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        angles = positions.reshape(-1, 1).double() * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    w, h = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                          indexing="xy")
    return torch.cat([one_axis(width // 2, w), one_axis(width // 2, h)], dim=1).float()[None]


def test_the_released_dit_xl_2_256_shapes_and_position_table_fit_the_laion_swarms_fm_spec():
    from ddm_models.pretrained_dit import check_dit_fits, check_dit_position_embedding
    laion = load_manifest("laion-aesthetics")
    target = expert_config(laion.expert_spec(laion.default_expert), laion)
    # DiT-XL-2-256x256.pt's shapes (the checks read shapes, and the position table's values)
    state = {"x_embedder.proj.weight": torch.empty(1152, 4, 2, 2), "pos_embed": _dit_position_table(1152, 16),
             "blocks.27.attn.qkv.weight": torch.empty(1), "blocks.0.mlp.fc1.weight": torch.empty(4608, 1)}
    check_dit_fits(state, target, "DiT-XL-2-256x256.pt")
    check_dit_position_embedding(state, target, "DiT-XL-2-256x256.pt")
