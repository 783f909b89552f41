"""Image embeddings for clustering: DINOv2 from local weights only, and the offline thumbnail PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bootstrap.create import create_swarm_from_data
from ddm_models.image_embeddings import (DINOv2Embedder, EmbedderUnavailable, ThumbnailEmbedder, embedder_for,
                                         pca_to_memmap)
from tests.captioned_data import write_image_folder


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A 1-layer, 32-wide Dinov2Model saved as a local folder, the way a Hugging Face cache holds one."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-dinov2")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(folder)
    return folder


def test_the_dinov2_embedder_loads_local_weights_and_gives_one_pooled_row_per_image(tiny_dinov2):
    embedder = DINOv2Embedder(str(tiny_dinov2), resolution=28)
    rows = embedder(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert embedder.dim == 32 and rows.shape == (3, 32) and torch.isfinite(rows).all()


def test_a_dinov2_model_missing_from_the_local_cache_is_an_error_naming_its_id():
    with pytest.raises(EmbedderUnavailable, match="no-such-org/dinov2-missing"):
        embedder_for("dinov2:no-such-org/dinov2-missing")


def test_an_unknown_embedding_name_is_refused_with_the_names_that_work():
    with pytest.raises(EmbedderUnavailable, match="thumbnail-pca"):
        embedder_for("clip-of-my-dreams")


def test_a_swarm_is_clustered_on_dinov2_features_when_the_manifest_asks_for_them(tmp_path, tiny_dinov2):
    write_image_folder(tmp_path / "photos", 16, layout="jsonl")
    created = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml", clusters=2, image_size=16,
                                     fine_clusters=4, router_samples=4, embedding=f"dinov2:{tiny_dinov2}")
    assert created.manifest.clustering.embedding == f"dinov2:{tiny_dinov2}"
    assert created.manifest.dataset.total_samples == 16


def test_thumbnails_keep_colour_and_coarse_layout():
    images = torch.full((2, 3, 16, 16), 1.0)
    images[1, 0] = -1.0  # the second image has no red
    rows = ThumbnailEmbedder(side=4)(images)
    assert rows.shape == (2, 48)
    assert torch.equal(rows[0], torch.ones(48)) and rows[1, :16].eq(-1).all()


def test_pca_over_a_memory_map_matches_pca_in_memory(tmp_path):
    from sklearn.decomposition import PCA

    rows = np.random.Generator(np.random.PCG64(0)).normal(size=(300, 12)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    projected = pca_to_memmap(np.load(tmp_path / "rows.npy", mmap_mode="r"), 4, tmp_path / "pca.npy", seed=0,
                              chunk=64)
    expected = PCA(4, svd_solver="full").fit_transform(rows.astype(np.float64))
    assert isinstance(projected, np.memmap) and projected.shape == (300, 4)
    np.testing.assert_allclose(np.abs(projected), np.abs(expected), atol=1e-4)
