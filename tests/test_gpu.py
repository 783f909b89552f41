"""GPU paths, run only where CUDA is present (skipped on the CPU-only machine): bf16 training with
fused AdamW and resume, offloaded sampling, bf16 experts, the VAE on the GPU."""

import pytest
import torch

from ddm_models.checkpoint import load_expert
from ddm_models.devices import inference_dtype, resolve_device
from ddm_models.latents import LatentCodec
from ddm_models.sampling import EnsembleSampler
from ddm_models.training import ExpertTrainer
from tests.latent_fixtures import tiny_vae
from tests.ml_fixtures import random_expert, random_router, small_digits, text_encoder, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["the digit 0", "the digit 3", "a handwritten seven", "number 9"]


def _trainer(**kwargs):
    return ExpertTrainer(tiny_config(), small_digits(), text_encoder(), batch_size=32, warmup_steps=1,
                         device="auto", **kwargs)


def test_auto_trains_on_the_gpu_with_fused_adamw_and_resumes_from_its_state(tmp_path):
    trainer = _trainer()
    assert trainer.device.type == "cuda" and trainer.optimizer.defaults["fused"]
    trainer.train_steps(3)
    trainer.save_state(tmp_path)
    expected = trainer.train_steps(2).losses
    resumed = _trainer()
    resumed.load_state(tmp_path)
    assert resumed.train_steps(2).losses == pytest.approx(expected, rel=1e-3)


def test_compiled_training_runs_on_the_gpu():
    assert all(loss == loss for loss in _trainer(compile_model=True).train_steps(2).losses)


def _ensemble(device):
    experts = [random_expert(k, objective, seed=k, width=32, heads=2)
               for k, objective in enumerate(("fm", "ddpm", "fm", "ddpm"))]
    for expert in experts:
        expert.model.to(device)
    return experts, random_router().to(device)


def test_offloaded_sampling_on_the_gpu_matches_resident_experts_and_keeps_few_on_it():
    device = resolve_device("cuda")
    experts, router = _ensemble(device)
    plain = EnsembleSampler(experts, router, "top2", text_encoder=text_encoder()).sample(PROMPTS, num_steps=4)
    experts, router = _ensemble(device)
    sampler = EnsembleSampler(experts, router, "top2", text_encoder=text_encoder(), device=device, offload=True,
                              max_resident=2)
    offloaded = sampler.sample(PROMPTS, num_steps=4)
    torch.testing.assert_close(offloaded.images, plain.images, atol=1e-4, rtol=0)
    on_gpu = [e for e in experts if next(e.model.parameters()).is_cuda]
    assert offloaded.moves > 0 and len(on_gpu) <= 2
    assert all(next(e.model.parameters()).is_pinned() for e in experts if e not in on_gpu)


def test_experts_load_in_bf16_on_the_gpu_and_sample(tmp_path):
    trainer = ExpertTrainer(tiny_config(), small_digits(), text_encoder(), batch_size=16)
    path = trainer.export(tmp_path / "e.safetensors", heldout_loss=0.0)
    device = resolve_device("auto")
    expert = load_expert(path, device=device, dtype=inference_dtype(device))
    assert next(expert.model.parameters()).dtype == torch.bfloat16
    images = EnsembleSampler([expert], None, "top1", text_encoder=text_encoder()).sample(PROMPTS, num_steps=3).images
    assert images.is_cuda and images.dtype == torch.float32 and torch.isfinite(images).all()


def test_the_vae_encodes_on_the_gpu_as_on_the_cpu():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    cpu = LatentCodec(tiny_vae(), "tiny").encode(x)
    gpu = LatentCodec(tiny_vae().to("cuda"), "tiny").encode(x)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=1e-3)
