"""Latent experts: a VAE named by a manifest, loaded only from local files, encoding images to
scaled latents and back; latents cached once per input; an expert trained on latents samples RGB."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddm_models.data import ImageDataset
from ddm_models.latents import LatentCodec, LatentShapeError, VaeUnavailable, cached_latents, encode_dataset
from ddm_models.objectives import objective_for
from ddm_models.sampling import EnsembleSampler, LoadedExpert
from ddm_models.configs import router_config
from ddm_models.training import ExpertTrainer
from ddm_models.router_training import RouterTrainer
from protocol.manifest import VaeSpec
from tests.latent_fixtures import TINY_VAE_ID, save_in_folder, save_in_hub_cache, tiny_vae
from tests.ml_fixtures import small_digits, text_encoder, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _images(n=6, seed=0):
    return torch.rand((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_a_vae_loads_from_a_folder_and_encodes_16x16_rgb_to_4x8x8_scaled_latents(tmp_path):
    vae = tiny_vae()
    codec = LatentCodec.from_pretrained(str(save_in_folder(vae, tmp_path / "vae")))
    x = _images()
    z = codec.encode(x, batch_size=4)
    assert codec.latent_shape((3, 16, 16)) == (4, 8, 8) and z.shape == (6, 4, 8, 8)
    with torch.no_grad():
        raw = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, raw * vae.config.scaling_factor)
    images = codec.decode(z)
    assert images.shape == x.shape and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(images, vae.decode(raw).sample.clamp(-1, 1))


def test_a_vae_loads_from_the_local_hub_cache_by_model_id_with_the_manifests_scale(tmp_path):
    cache = save_in_hub_cache(tiny_vae(), tmp_path / "hub")
    codec = LatentCodec.from_manifest_spec(VaeSpec(TINY_VAE_ID, scaling_factor=0.5), cache_dir=cache)
    assert codec.scaling_factor == 0.5 and codec.model_id == TINY_VAE_ID
    assert LatentCodec.from_manifest_spec(None) is None


def test_a_vae_found_through_hf_hub_cache_in_the_environment(tmp_path):
    # what a node does: no cache_dir given, HF_HUB_CACHE says where the cache is
    cache = save_in_hub_cache(tiny_vae(), tmp_path / "hub")
    code = (f"from ddm_models.latents import LatentCodec; c = LatentCodec.from_pretrained({TINY_VAE_ID!r}); "
            "print(c.latent_shape((3, 32, 32)))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("(4, 16, 16)")


def test_an_absent_vae_is_a_clear_error_naming_the_model_id(tmp_path):
    with pytest.raises(VaeUnavailable, match="stabilityai/sd-vae-ft-mse"):
        LatentCodec.from_pretrained("stabilityai/sd-vae-ft-mse", cache_dir=tmp_path / "empty-cache")


def test_images_the_vae_cannot_encode_are_refused(tmp_path):
    codec = LatentCodec(tiny_vae(), "tiny")
    with pytest.raises(LatentShapeError):
        codec.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(LatentShapeError):
        codec.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(LatentShapeError):
        codec.decode(torch.zeros(1, 3, 8, 8))


def test_latents_are_computed_once_and_read_back_from_the_cache(tmp_path, monkeypatch):
    codec, x = LatentCodec(tiny_vae(), "tiny"), _images()
    first = cached_latents(codec, x, tmp_path, name="shard-0")
    calls = []
    monkeypatch.setattr(codec, "encode", lambda *a, **k: calls.append(1))
    again = cached_latents(codec, x, tmp_path, name="shard-0")
    assert not calls and torch.equal(first, again) and len(list(tmp_path.glob("shard-0-*.safetensors"))) == 1


def test_other_images_or_another_vae_never_reuse_cached_latents(tmp_path):
    x = _images()
    a = cached_latents(LatentCodec(tiny_vae(0), "tiny"), x, tmp_path)
    b = cached_latents(LatentCodec(tiny_vae(1), "tiny"), x, tmp_path)  # same name, other weights
    c = cached_latents(LatentCodec(tiny_vae(0), "tiny"), _images(seed=1), tmp_path)
    assert not torch.equal(a, b) and not torch.equal(a, c) and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_a_corrupt_cache_file_is_recomputed_not_trusted(tmp_path):
    codec, x = LatentCodec(tiny_vae(), "tiny"), _images()
    first = cached_latents(codec, x, tmp_path, inputs_sha256="shard-sha")
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    assert torch.equal(cached_latents(codec, x, tmp_path, inputs_sha256="shard-sha"), first)


def _rgb_digits(n=256):
    """The 8x8 digits as 16x16 RGB: a stand-in for a real captioned image set."""
    data = small_digits()
    images = F.interpolate(data.images[:n], size=16, mode="nearest").repeat(1, 3, 1, 1)
    return ImageDataset(images.contiguous(), data.labels[:n], "rgb-digits", data.class_names)


def test_an_expert_trains_on_latents_and_its_samples_decode_to_rgb(tmp_path):
    torch.manual_seed(0)
    codec = LatentCodec.from_pretrained(str(save_in_folder(tiny_vae(), tmp_path / "vae")))
    latents = encode_dataset(codec, _rgb_digits(), tmp_path / "latents")
    assert latents.image_shape == (4, 8, 8) and torch.equal(latents.labels, _rgb_digits().labels)
    config = tiny_config(in_channels=4)
    trainer = ExpertTrainer(config, latents, text_encoder(), batch_size=32, warmup_steps=1, lr=3e-3)
    losses = trainer.train_steps(12).losses
    assert all(map(math.isfinite, losses)) and sum(losses[-4:]) < sum(losses[:4])
    expert = LoadedExpert(0, config, objective_for(config), trainer.ema.eval())
    result = EnsembleSampler([expert], None, "top1", text_encoder=text_encoder(), codec=codec).sample(
        ["the digit 3", "the digit 7"], num_steps=3)
    assert result.latents.shape == (2, 4, 8, 8) and result.images.shape == (2, 3, 16, 16)
    assert result.images.min() >= -1 and result.images.max() <= 1


def test_a_dit_router_trains_on_latents(tmp_path):
    latents = encode_dataset(LatentCodec(tiny_vae(), "tiny"), _rgb_digits(128), tmp_path)
    config = router_config("DiT-S/2", num_clusters=2, sample_size=8, width=32, depth=2, heads=2)
    clusters = (latents.labels >= 5).long()
    trainer = RouterTrainer(config, latents, clusters, batch_size=32, warmup_steps=1, lr=3e-3)
    assert all(map(math.isfinite, trainer.train_steps(4).losses)) and 0 <= trainer.evaluate().accuracy <= 1
