"""Offline quality metrics: the cached digit classifier, conditional accuracy and classifier FID.

The default classifier is trained into the real cache ($DDM_SWARM_CACHE or ~/.cache/ddm-swarm) the
first time (~15 s on one core) and loaded from there afterwards, as every other user of it does.
"""

import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from ddm_models.data import heldout_split, load_embedded_digits, load_small_digits, subset
from ddm_models.local_cache import default_cache_dir
from ddm_models.metrics import (
    DEFAULT_RECIPE,
    ClassifierRecipe,
    classifier_fid,
    conditional_accuracy,
    feature_fid,
    MetricUnavailable,
    ThumbnailPCAFeatures,
    heldout_reference,
    inception_fid,
    load_or_train_classifier,
    train_classifier,
)

torch.set_num_threads(1)
SMALL_RECIPE = ClassifierRecipe(dataset="sklearn-digits-8x8", epochs=6, width=8, max_rotation_deg=0.0,
                                max_shift_fraction=0.0)


@pytest.fixture(scope="module")
def classifier():
    return load_or_train_classifier()


@pytest.fixture(scope="module")
def heldout():
    data = load_embedded_digits()
    train_idx, _ = heldout_split(len(data), DEFAULT_RECIPE.heldout_fraction, DEFAULT_RECIPE.split_seed)
    # every 4th training image: 1,000 images spread over all classes (the data is sorted by class)
    return heldout_reference(), subset(data, train_idx[::4][:1000])


def test_default_classifier_reads_heldout_digits_at_least_97_percent(classifier, heldout):
    heldout_set, _ = heldout
    accuracy = conditional_accuracy(classifier, heldout_set.images, heldout_set.labels)
    assert accuracy >= 0.97 and accuracy == pytest.approx(classifier.heldout_accuracy)


def test_conditional_accuracy_counts_samples_read_as_the_asked_digit(classifier, heldout):
    heldout_set, _ = heldout
    wrong_labels = (heldout_set.labels + 1) % 10
    assert conditional_accuracy(classifier, heldout_set.images, wrong_labels) < 0.03


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    """A cache directory holding the small recipe's classifier, trained once for this module."""
    cache = tmp_path_factory.mktemp("classifier-cache")
    return cache, load_or_train_classifier(cache, SMALL_RECIPE)


def test_classifier_is_cached_and_loads_without_training(small_cache):
    cache, first = small_cache
    (cached,) = cache.glob("digit-classifier-*.safetensors")
    written = cached.stat().st_mtime_ns
    second = load_or_train_classifier(cache, SMALL_RECIPE)
    assert cached.stat().st_mtime_ns == written
    assert second.heldout_accuracy == first.heldout_accuracy > 0.9
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not list(cache.glob("*.tmp"))


def test_corrupt_cache_file_is_retrained_with_a_warning(small_cache, tmp_path):
    cache, _ = small_cache
    (cached,) = cache.glob("digit-classifier-*.safetensors")
    corrupt = tmp_path / cached.name
    corrupt.write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning, match="unreadable"):
        model = load_or_train_classifier(tmp_path, SMALL_RECIPE)
    assert model.heldout_accuracy > 0.9 and corrupt.stat().st_size > 100


def test_a_cache_file_whose_weights_rotted_on_disk_is_retrained_with_a_warning(small_cache, tmp_path):
    cache, first = small_cache
    (cached,) = cache.glob("digit-classifier-*.safetensors")
    rotted = bytearray(cached.read_bytes())
    rotted[-3] ^= 0x01  # a low bit of a weight: the file still loads, only the checksum can tell
    (tmp_path / cached.name).write_bytes(bytes(rotted))
    with pytest.warns(UserWarning, match="checksum"):
        model = load_or_train_classifier(tmp_path, SMALL_RECIPE)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_training_is_deterministic_for_a_recipe(small_cache):
    _, cached = small_cache
    retrained = train_classifier(load_small_digits(), SMALL_RECIPE)
    for name, tensor in cached.state_dict().items():
        assert torch.equal(tensor, retrained.state_dict()[name]), name


def test_swarm_heldout_images_are_among_those_the_classifier_never_saw():
    # configs/local.yaml holds out 10% with split seed 0; the classifier holds out 20% of the same
    # permutation, so generated digits are never judged against images the classifier learned.
    _, swarm_heldout = heldout_split(5000, 0.1, seed=DEFAULT_RECIPE.split_seed)
    _, classifier_heldout = heldout_split(5000, DEFAULT_RECIPE.heldout_fraction, DEFAULT_RECIPE.split_seed)
    assert np.isin(swarm_heldout, classifier_heldout).all()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DDM_SWARM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("DDM_SWARM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "ddm-swarm"


def _scipy_fid(classifier, real, fake):
    with torch.no_grad():
        a, b = (classifier.features(x).double().numpy() for x in (real, fake))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # dead ReLU units make the covariances singular; harmless here
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_classifier_fid_matches_the_reference_formula(classifier, heldout):
    heldout_set, train_part = heldout
    expected = _scipy_fid(classifier, heldout_set.images, train_part.images)
    assert classifier_fid(classifier, heldout_set.images, train_part.images) == pytest.approx(expected, rel=1e-3)


def test_classifier_fid_is_small_for_real_digits_and_large_for_blur_and_noise(classifier, heldout):
    heldout_set, train_part = heldout
    blurred = F.avg_pool2d(train_part.images, 5, stride=1, padding=2, count_include_pad=False)
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = classifier_fid(classifier, heldout_set.images, train_part.images)
    assert real < 30
    assert classifier_fid(classifier, heldout_set.images, blurred) > 10 * real
    assert classifier_fid(classifier, heldout_set.images, noise) > 100 * real


def test_classifier_fid_sees_a_missing_digit(classifier, heldout):
    heldout_set, train_part = heldout
    without_sevens = train_part.images[train_part.labels != 7]
    assert classifier_fid(classifier, heldout_set.images, without_sevens) > 2 * classifier_fid(
        classifier, heldout_set.images, train_part.images)


def test_inception_fid_without_local_weights_says_what_is_missing(tmp_path):
    images = torch.zeros(4, 1, 28, 28)
    with pytest.raises(MetricUnavailable, match="weights"):
        inception_fid(images, images, weights_path=tmp_path / "absent.pth")


def _colour_images(count: int, seed: int, red_bias: float = 0.0) -> torch.Tensor:
    """Random smooth 32x32 RGB images in [-1, 1] (upsampled 4x4 noise), optionally redder."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    small[:, 0] += red_bias
    return F.interpolate(small, size=32, mode="bilinear", align_corners=False).clamp(-1, 1)


def test_feature_fid_in_thumbnail_pca_space_matches_the_reference_formula():
    reference = _colour_images(200, 0)
    features = ThumbnailPCAFeatures(reference, dim=8)
    real, fake = _colour_images(80, 1), _colour_images(60, 2, red_bias=0.5)
    a, b = (features(x).double().numpy() for x in (real, fake))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert features(real).shape == (80, 8)
    assert feature_fid(features, real, fake) == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_feature_fid_is_near_zero_for_one_distribution_and_grows_with_a_colour_shift():
    features = ThumbnailPCAFeatures(_colour_images(200, 0), dim=8)
    same = feature_fid(features, _colour_images(300, 1), _colour_images(300, 2))
    shifted = feature_fid(features, _colour_images(300, 1), _colour_images(300, 2, red_bias=0.6))
    assert same < 0.05 * shifted
    assert shifted > 0.1
