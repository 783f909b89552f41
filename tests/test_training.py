"""Trainers: learning happens, resume is bit-for-bit, exports load, DDPM -> FM conversion works."""

import pytest
import torch

from ddm_models.checkpoint import InvalidCheckpoint, load_expert, load_router, read_checkpoint
from ddm_models.clustering import cluster_images
from ddm_models.conversion import REINITIALISED, convert_ddpm_checkpoint
from ddm_models.sampling import EnsembleSampler
from ddm_models.training import ExpertTrainer
from ddm_models.router_training import RouterTrainer
from tests.ml_fixtures import small_digits, text_encoder, tiny_config, tiny_router_config


def _expert_trainer(objective="fm", seed=0, **kwargs):
    return ExpertTrainer(tiny_config(objective), small_digits(), text_encoder(), seed=seed, batch_size=32,
                         lr=2e-3, warmup_steps=5, **kwargs)


def _router_trainer(seed=0):
    data = small_digits()
    clusters = torch.from_numpy(cluster_images(data.images, 4, seed=0, fine=16).assignments.copy())
    return RouterTrainer(tiny_router_config(), data, clusters, text_encoder(), seed=seed, batch_size=64,
                         warmup_steps=5)


def _assert_same_state(a, b):
    for part in ("model", "ema"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert all(torch.equal(sa[name], sb[name]) for name in sa), part
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        qa, qb = a.optimizer.state[pa], b.optimizer.state[pb]
        assert torch.equal(qa["exp_avg"], qb["exp_avg"]) and torch.equal(qa["exp_avg_sq"], qb["exp_avg_sq"])


@pytest.mark.parametrize("objective", ["fm", "ddpm"])
def test_resumed_expert_training_replays_the_uninterrupted_run_bit_for_bit(tmp_path, objective):
    straight = _expert_trainer(objective)
    losses = straight.train_steps(8).losses

    first = _expert_trainer(objective)
    head = first.train_steps(4).losses
    first.save_state(tmp_path)
    second = _expert_trainer(objective)  # a new trainer, as after a crash
    second.load_state(tmp_path)
    tail = second.train_steps(4).losses

    assert head + tail == losses
    assert (second.step, second.samples_seen) == (straight.step, straight.samples_seen) == (8, 256)
    _assert_same_state(second, straight)


def test_resumed_router_training_replays_the_uninterrupted_run_bit_for_bit(tmp_path):
    straight = _router_trainer()
    losses = straight.train_steps(6).losses
    first = _router_trainer()
    head = first.train_steps(3).losses
    first.save_state(tmp_path)
    second = _router_trainer()
    second.load_state(tmp_path)
    assert head + second.train_steps(3).losses == losses
    _assert_same_state(second, straight)


def test_a_frozen_copy_keeps_the_step_it_was_taken_at_while_training_goes_on(tmp_path):
    trainer = _expert_trainer()
    trainer.train_steps(3)
    frozen = trainer.frozen_copy()
    trainer.save_state(tmp_path / "live")  # what a checkpoint at step 3 writes
    loss_at_three = trainer.heldout_loss()
    trainer.train_steps(2)
    assert frozen.heldout_loss() == loss_at_three
    frozen.save_state(tmp_path / "frozen")
    later = _expert_trainer()
    later.load_state(tmp_path / "frozen")
    at_three = _expert_trainer()
    at_three.load_state(tmp_path / "live")
    assert (frozen.step, later.step, trainer.step) == (3, 3, 5)
    _assert_same_state(later, at_three)
    assert later.train_steps(2).losses == at_three.train_steps(2).losses


def test_resume_with_another_seed_is_refused(tmp_path):
    trainer = _expert_trainer(seed=0)
    trainer.train_steps(1)
    trainer.save_state(tmp_path)
    with pytest.raises(InvalidCheckpoint, match="seed"):
        _expert_trainer(seed=1).load_state(tmp_path)


def test_a_checkpoint_of_another_architecture_is_refused_by_the_trainer(tmp_path):
    trainer = _expert_trainer("ddpm")
    trainer.save_state(tmp_path)
    with pytest.raises(InvalidCheckpoint, match="config"):
        _expert_trainer("fm").load_state(tmp_path)


def test_expert_training_lowers_the_heldout_loss():
    trainer = _expert_trainer("fm")
    before = trainer.heldout_loss(max_images=256)
    trainer.train_steps(60)
    assert trainer.heldout_loss(max_images=256) < 0.8 * before


def test_router_learns_clusters_from_barely_noised_images():
    trainer = _router_trainer()
    trainer.lr = 3e-3
    trainer.train_steps(80)
    evaluation = trainer.evaluate(num_bins=5, repeats=1)
    low_noise = evaluation.bins[0][2]
    assert low_noise > 0.6 and low_noise > evaluation.bins[-1][2] - 0.05  # chance is ~0.25


def test_exported_checkpoints_load_for_sampling_and_continue_training_elsewhere(tmp_path):
    trainer = _expert_trainer("fm")
    trainer.train_steps(3)
    path = trainer.export(tmp_path / "expert.safetensors")
    metadata, _ = read_checkpoint(path)
    assert (metadata.step, metadata.samples_seen, metadata.heldout_metric_name) == (3, 96, "loss")
    elsewhere = _expert_trainer("fm", seed=5)
    elsewhere.init_from_checkpoint(path)
    assert elsewhere.step == 3 and elsewhere.train_steps(1).step == 4

    router = _router_trainer()
    router.train_steps(2)
    router_path = router.export(tmp_path / "router.safetensors")
    assert read_checkpoint(router_path)[0].heldout_metric_name == "accuracy"
    sampler = EnsembleSampler([load_expert(path)], load_router(router_path), "top1", text_encoder=text_encoder())
    assert torch.isfinite(sampler.sample(["the digit 4"], num_steps=2).images).all()


def test_ddpm_checkpoint_converts_to_a_working_flow_matching_expert(tmp_path):
    ddpm = _expert_trainer("ddpm", cluster=2)
    ddpm.train_steps(20)
    source = ddpm.export(tmp_path / "ddpm.safetensors")
    converted_path = convert_ddpm_checkpoint(source, tmp_path / "fm.safetensors")
    converted = load_expert(converted_path)
    assert (converted.config.objective, converted.cluster, converted.metadata.step) == ("fm", 2, 0)

    kept = [name for name in converted.model.state_dict() if not name.startswith(REINITIALISED)]
    ddpm_state, fm_state = ddpm.ema.state_dict(), converted.model.state_dict()
    assert kept and all(torch.equal(ddpm_state[name], fm_state[name]) for name in kept)
    assert not fm_state["head.1.weight"].any()  # fresh zero output layer

    fm = _expert_trainer("fm")
    fm.init_from_checkpoint(converted_path)
    assert fm.step == 0
    start = fm.heldout_loss(max_images=256)
    fm.train_steps(30)
    assert fm.heldout_loss(max_images=256) < start
    images = EnsembleSampler([load_expert(fm.export(tmp_path / "fm2.safetensors"))], text_encoder=text_encoder()
                             ).sample(["the digit 1"], num_steps=3).images
    assert torch.isfinite(images).all()
