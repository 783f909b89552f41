"""Training and measuring on captioned data: every image conditioned on its own caption, the
distinct captions encoded once when they fit, digit data sets unchanged."""

import pytest
import torch

from ddm_models.captioned_data import ShardFile, load_captioned_shards
from ddm_models.captions import sample_captions
from ddm_models.conditioning import batch_captions, caption_encoder
from ddm_models.evaluation import expert_loss, velocity_losses
from ddm_models.metrics import train_classifier
from ddm_models.objectives import objective_for
from ddm_models.sampling import LoadedExpert
from ddm_models.text import CachedTextEncoder
from ddm_models.training import ExpertTrainer
from ddm_models.router_training import RouterTrainer
from tests.captioned_fixtures import COLOURS, SHAPES, write_shape_shard
from tests.ml_fixtures import small_digits, text_encoder, tiny_config, tiny_router_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """24 captioned 8x8 RGB shapes, cluster = shape, and 8 held out."""
    root = tmp_path_factory.mktemp("shapes")
    every = [(colour, shape) for shape in SHAPES for colour in COLOURS]
    clusters = [SHAPES.index(shape) for _, shape in every]
    train, heldout = (
        load_captioned_shards([ShardFile(write_shape_shard(root / f"{name}.tar", every * copies, seed=copies,
                                                           clusters=clusters * copies))], 8, 3, root / "cache",
                              name=name)
        for name, copies in (("train", 3), ("heldout", 1)))
    return train, heldout


def _rgb_config(**overrides):
    return tiny_config(in_channels=3, **overrides)


def test_each_captioned_image_is_conditioned_on_its_own_caption(shapes):
    train, _ = shapes
    index = torch.tensor([5, 0, 5, 17])
    generator = torch.Generator().manual_seed(0)
    assert batch_captions(train, index, generator, sample_captions) == [train.captions[i] for i in (5, 0, 5, 17)]
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())  # no draws


def test_digit_images_still_get_template_captions_drawn_from_their_labels():
    digits = small_digits()
    index = torch.tensor([0, 1, 2])
    first = batch_captions(digits, index, torch.Generator().manual_seed(3), sample_captions)
    assert first == sample_captions(digits.labels[index], torch.Generator().manual_seed(3))


def test_distinct_captions_are_encoded_once_up_front_when_the_cache_holds_them(shapes):
    train, heldout = shapes
    cached = CachedTextEncoder(text_encoder().encoder)
    assert caption_encoder(cached, train, heldout) is cached and len(cached) == len(train.distinct_captions()) == 8


def test_more_distinct_captions_than_the_cache_holds_bypass_it(shapes):
    train, _ = shapes
    small = CachedTextEncoder(text_encoder().encoder, max_entries=4)
    assert caption_encoder(small, train) is small.encoder and len(small) == 0


def test_expert_trains_on_captioned_rgb_images_and_measures_its_heldout_loss(shapes):
    train, heldout = shapes
    trainer = ExpertTrainer(_rgb_config(), train, text_encoder(), batch_size=16, heldout=heldout, warmup_steps=5,
                            lr=3e-3)
    before = trainer.heldout_loss()
    stats = trainer.train_steps(30)
    assert all(torch.isfinite(torch.tensor(stats.losses))) and trainer.heldout_loss() < before


def test_expert_training_on_captions_is_reproducible(shapes):
    train, _ = shapes
    runs = [ExpertTrainer(_rgb_config(), train, text_encoder(), batch_size=8, seed=4).train_steps(3).losses
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_router_trains_on_the_cluster_ids_its_captioned_data_carry(shapes):
    train, heldout = shapes
    trainer = RouterTrainer(tiny_router_config(in_channels=3, num_clusters=2), train, None, text_encoder(),
                            batch_size=32, heldout=(heldout, None), warmup_steps=5, lr=3e-3)
    assert torch.equal(trainer.clusters, train.clusters)
    trainer.train_steps(40)
    assert trainer.evaluate(num_bins=2).accuracy > 0.6  # the caption names the shape; chance is 0.5


def test_router_without_cluster_ids_is_refused_with_the_data_sets_name(shapes, tmp_path):
    plain = load_captioned_shards([ShardFile(write_shape_shard(tmp_path / "plain.tar", [("red", "circle")]))], 8, 3,
                                  tmp_path)
    with pytest.raises(ValueError, match="shards has no cluster ids"):
        RouterTrainer(tiny_router_config(in_channels=3, num_clusters=2), plain, None, text_encoder())


def test_heldout_measures_work_on_captioned_data(shapes):
    train, heldout = shapes
    trainer = ExpertTrainer(_rgb_config(), train, text_encoder(), batch_size=8)
    expert = LoadedExpert(0, trainer.config, objective_for(trainer.config), trainer.ema)
    assert expert_loss(expert, heldout, text_encoder()) == pytest.approx(
        expert_loss(expert, heldout, text_encoder()))
    losses = velocity_losses(expert.velocity, heldout, text_encoder(), rows=torch.tensor([1, 3]))
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_the_digit_classifier_refuses_a_captioned_data_set_naming_what_to_use(shapes):
    with pytest.raises(ValueError, match="held-out loss"):
        train_classifier(shapes[0])
