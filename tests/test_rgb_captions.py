"""RGB end to end on captioned data: shards of coloured shapes -> a tiny RGB expert per cluster and
a router trained on their captions -> RGB samples for free-text prompts -> a PNG grid of prompts."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddm_models.captioned_data import ShardFile, load_captioned_shards
from ddm_models.configs import expert_config, router_config
from ddm_models.images import save_prompt_grid
from ddm_models.objectives import objective_for
from ddm_models.sampling import EnsembleSampler, LoadedExpert
from ddm_models.training import ExpertTrainer
from ddm_models.router_training import RouterTrainer
from tests.captioned_fixtures import COLOURS, SHAPES, write_shape_shard
from tests.ml_fixtures import text_encoder

torch.set_num_threads(1)
SIZE = 16
BACKGROUND = 40 / 255  # the fixtures' dark grey, in [0, 1]


def _rgb_expert_config():
    return expert_config("digits-8x8", in_channels=3, sample_size=SIZE, patch_size=4, width=32, depth=2, heads=2)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Cluster k holds every colour of shape k; each expert trains 80 steps (~3 s), the router 60
    on its own bounded sample across both clusters."""
    root = tmp_path_factory.mktemp("rgb")
    shards = [ShardFile(write_shape_shard(root / f"cluster-{k}.tar", [(c, shape) for c in COLOURS] * 6, seed=k),
                        cluster=k) for k, shape in enumerate(SHAPES)]
    text = text_encoder()
    experts = []
    for shard in shards:
        data = load_captioned_shards([shard], SIZE, 3, root / "cache", name=f"cluster-{shard.cluster}")
        trainer = ExpertTrainer(_rgb_expert_config(), data, text, seed=shard.cluster, batch_size=32, lr=3e-3,
                                warmup_steps=10, cluster=shard.cluster)
        stats = trainer.train_steps(80)
        assert stats.loss < 0.8 * stats.losses[0], "the expert did not learn"
        experts.append(LoadedExpert(shard.cluster, trainer.config, objective_for(trainer.config), trainer.ema))
    router_set = load_captioned_shards(shards, SIZE, 3, root / "cache", name="router", max_items=40)
    config = router_config("digits-8x8", in_channels=3, sample_size=SIZE, num_clusters=2, channels=(16, 32),
                           time_dim=32)
    router = RouterTrainer(config, router_set, None, text, seed=5, batch_size=64, lr=3e-3, warmup_steps=10)
    router.train_steps(60)
    return EnsembleSampler(experts, router.ema.eval(), "top2", text_encoder=text), router


def _main_colour(image: torch.Tensor) -> str:
    """The fixture colour nearest to the mean of the pixels that are not background; image (3, H, W) in [-1, 1]."""
    image = (image + 1) / 2
    foreground = (image - BACKGROUND).abs().sum(0) > 0.3
    mean = image[:, foreground].mean(1) if foreground.any() else image.flatten(1).mean(1)
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255
    return list(COLOURS)[int(((palette - mean) ** 2).sum(1).argmin())]


def test_rgb_ensemble_samples_rgb_images_in_the_colour_each_free_text_prompt_names(ensemble):
    sampler, _ = ensemble
    prompts = [f"a {colour} {shape}" for shape in SHAPES for colour in COLOURS]
    result = sampler.sample(prompts, num_steps=10, guidance_scale=3.0, seed=0)
    assert result.images.shape == (len(prompts), 3, SIZE, SIZE) and torch.isfinite(result.images).all()
    agreement = sum(_main_colour(image) == prompt.split()[1] for image, prompt in zip(result.images, prompts))
    assert agreement / len(prompts) >= 0.75  # chance: 0.25


def test_the_router_sends_each_shape_to_the_cluster_that_holds_it(ensemble):
    _, router = ensemble
    assert router.evaluate(num_bins=2).accuracy >= 0.9


def test_a_prompt_grid_of_rgb_samples_is_written_as_a_png_with_its_captions(ensemble, tmp_path):
    sampler, _ = ensemble
    prompts = ["a red circle", "a small blue square on a dark background", "something yellow"]
    images = sampler.sample(prompts, num_steps=5, seed=1).images
    path = save_prompt_grid(images, prompts, tmp_path / "grid.png", columns=3, scale=4)
    with Image.open(path) as grid:
        assert grid.mode == "RGB" and grid.width >= 3 * SIZE * 4
        pixels = torch.from_numpy(np.array(grid)).permute(2, 0, 1)
    caption_band = pixels[:, 4 + SIZE * 4 + 2:, :]  # under the first row of images: text, so not all white
    assert (caption_band < 128).any()
    assert not (pixels[0] == pixels[1]).all()  # colour, not grey
