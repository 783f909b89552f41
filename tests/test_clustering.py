"""Two-stage k-means splits of a data set into expert clusters."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from ddm_models.clustering import ClusterSplit, ClusterSplitError, cluster_embeddings, cluster_images
from ddm_models.data import load_embedded_digits, load_small_digits

# The embedded default's split (K=4, seed 0). Every peer must compute exactly this one; if it
# changes, a peer with the other version trains another cluster's data under the same name.
EMBEDDED_K4_SEED0_SHA256 = "f18db07b499cddbd11937677aa2bf69777e8245d1bc242c3609a8610be88acbf"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded():
    return load_embedded_digits()


@pytest.fixture(scope="module")
def embedded_split(embedded):
    return cluster_images(embedded.images, k=4, seed=0)


def test_embedded_default_split_is_pinned(embedded_split):
    assert embedded_split.num_clusters == 4 and embedded_split.assignments.shape == (5000,)
    assert embedded_split.sha256 == EMBEDDED_K4_SEED0_SHA256


def test_same_seed_gives_the_same_split_and_another_seed_another(embedded):
    small = load_small_digits()
    first, again = cluster_images(small.images, 4, seed=7), cluster_images(small.images, 4, seed=7)
    assert first.sha256 == again.sha256 and np.array_equal(first.assignments, again.assignments)
    assert cluster_images(small.images, 4, seed=8).sha256 != first.sha256


def test_clusters_group_similar_digits_far_better_than_a_random_split(embedded, embedded_split):
    labels = embedded.labels.numpy()
    random_split = np.random.default_rng(0).integers(0, 4, len(labels))
    assert normalized_mutual_info_score(labels, embedded_split.assignments) > 0.4
    assert normalized_mutual_info_score(labels, random_split) < 0.01
    table = embedded_split.label_table(labels, 10)
    assert (table.max(axis=0) >= 0.4 * 500).all()  # every digit has a home cluster


def test_clusters_are_not_degenerate(embedded_split):
    assert min(embedded_split.sizes) >= 0.1 * 5000 and sum(embedded_split.sizes) == 5000


def test_cluster_ids_are_numbered_in_order_of_first_appearance(embedded_split):
    _, first = np.unique(embedded_split.assignments, return_index=True)
    assert np.all(np.diff(first) > 0) and embedded_split.assignments[0] == 0


def test_indices_partition_the_data(embedded_split):
    parts = [embedded_split.indices(k) for k in range(4)]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(5000))
    assert [len(p) for p in parts] == embedded_split.sizes


def test_saved_split_loads_back_identical(tmp_path, embedded_split):
    embedded_split.save(tmp_path / "split.npz")
    loaded = ClusterSplit.load(tmp_path / "split.npz")
    assert loaded.sha256 == embedded_split.sha256 and np.array_equal(loaded.assignments, embedded_split.assignments)


def test_tampered_split_file_is_refused(tmp_path, embedded_split):
    tampered = embedded_split.assignments.copy()
    tampered[0] = 3
    np.savez(tmp_path / "split.npz", assignments=tampered, num_clusters=4, sha256=embedded_split.sha256)
    with pytest.raises(ClusterSplitError, match="recompute"):
        ClusterSplit.load(tmp_path / "split.npz")


@pytest.mark.parametrize("damage", ["truncate", "zip directory", "array header"])
def test_a_split_file_damaged_anywhere_is_refused_as_a_cluster_split_error(tmp_path, embedded_split, damage):
    path = tmp_path / "split.npz"
    embedded_split.save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "zip directory":
        data[-30] ^= 0xFF
    else:
        data[data.index(b"{'descr'") + 3] ^= 0x20  # numpy's header dict no longer parses
    path.write_bytes(bytes(data))
    with pytest.raises(ClusterSplitError, match=str(path)):
        ClusterSplit.load(path)


def test_memory_mapped_embeddings_split_like_in_memory_ones(tmp_path):
    points = np.random.default_rng(1).standard_normal((3000, 16)).astype(np.float32)
    points[:1000] += 4.0
    mapped = np.lib.format.open_memmap(tmp_path / "embeddings.npy", mode="w+", dtype=np.float32, shape=points.shape)
    mapped[:] = points
    mapped.flush()
    from_disk = cluster_embeddings(np.load(tmp_path / "embeddings.npy", mmap_mode="r"), k=3, seed=0, fine=32)
    assert from_disk.sha256 == cluster_embeddings(points, k=3, seed=0, fine=32).sha256


def test_an_embedding_other_than_pixel_pca_points_to_the_real_data_path():
    with pytest.raises(ValueError, match="embed_to_memmap"):
        cluster_images(load_small_digits().images, 4, 0, embedding="dinov2:facebook/dinov2-small")


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="faiss"):
        cluster_embeddings(np.zeros((100, 4)), k=2, seed=0, fine=8, backend="annoy")


def test_default_path_imports_no_real_data_library():
    code = ("import sys; from ddm_models.clustering import cluster_images; from ddm_models.data import "
            "load_small_digits; cluster_images(load_small_digits().images, 4, 0); "
            "print(sorted(m for m in ('faiss', 'open_clip', 'transformers', 'webdataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""}, timeout=60)
    assert result.stdout.strip() == "[]"


def test_embeddings_stream_into_a_memory_mapped_file_that_clusters(tmp_path):
    from ddm_models.image_embeddings import embed_to_memmap

    class MeanColour:  # a real, if trivial, embedding: per-channel means
        dim = 1

        def __call__(self, images):
            return images.mean(dim=(1, 2, 3))[:, None]

    images = load_small_digits().images
    rows = embed_to_memmap(MeanColour(), images.split(500), len(images), tmp_path / "emb.npy")
    assert isinstance(rows, np.memmap) and rows.shape == (1797, 1)
    assert np.allclose(rows[:, 0], images.mean(dim=(1, 2, 3)).numpy())
    assert sum(cluster_embeddings(rows, k=2, seed=0, fine=8).sizes) == 1797


def test_dinov2_without_local_weights_is_a_clear_error():
    from ddm_models.image_embeddings import DINOv2Embedder, EmbedderUnavailable

    with pytest.raises(EmbedderUnavailable, match="local"):
        DINOv2Embedder("facebook/dinov2-small")
