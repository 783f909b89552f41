"""Captioned data sets read from WebDataset shards: decoded once, cached, sampled, kept aligned."""

import io
import random
import tarfile

import numpy as np
import pytest
import torch

from ddm_models.captioned_data import CaptionedDataset, ShardFile, file_blob_id, load_captioned_shards
from ddm_models.data import DataSetError, iter_webdataset_records, iter_webdataset_shard, subset
from tests.captioned_fixtures import shape_picture, write_shape_shard

torch.set_num_threads(1)
SAMPLES = [("red", "square"), ("blue", "circle"), ("green", "square")]


@pytest.fixture
def shard(tmp_path):
    return write_shape_shard(tmp_path / "shard-0.tar", SAMPLES)


def test_shard_records_take_captions_from_json_and_clusters_from_cls(tmp_path):
    path = write_shape_shard(tmp_path / "s.tar", SAMPLES[:2], caption_as="json", clusters=[3, 1])
    records = list(iter_webdataset_records(path, size=8))
    assert [(r.caption, r.cluster) for r in records] == [("a red square", 3), ("a blue circle", 1)]
    assert records[0].pixels.dtype == np.uint8 and records[0].pixels.shape == (3, 8, 8)


def test_a_sample_key_ends_at_the_first_dot_of_the_file_name_not_of_its_folder(tmp_path):
    path = tmp_path / "folders.tar"
    buffer = io.BytesIO()
    shape_picture("red", "circle", random.Random(0)).save(buffer, format="PNG")
    with tarfile.open(path, "w") as tar:
        for name, payload in (("v1.0/a.png", buffer.getvalue()), ("v1.0/a.txt", b"a red circle")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert [(r.key, r.caption) for r in iter_webdataset_records(path, size=8)] == [("v1.0/a", "a red circle")]


def test_shards_load_as_uint8_images_with_their_own_captions_in_shard_order(tmp_path, shard):
    data = load_captioned_shards([ShardFile(shard)], size=16, channels=3, cache_dir=tmp_path / "cache")
    assert data.pixels.dtype == torch.uint8 and data.pixels.shape == (3, 3, 16, 16)
    assert data.captions == ("a red square", "a blue circle", "a green square") and data.clusters is None
    images = data.images_at(torch.tensor([0, 2]))
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    streamed = [sample.image for sample in iter_webdataset_shard(shard, size=16)]
    assert torch.allclose(images, torch.stack([streamed[0], streamed[2]]), atol=1e-6)
    red = data.images_at(slice(0, 1))[0]
    assert red[0].max() > red[2].max()  # the red square is red


def test_a_shard_is_decoded_once_then_read_from_the_cache_even_without_the_file(tmp_path, shard):
    cache = tmp_path / "cache"
    pinned = ShardFile(shard, sha256=file_blob_id(shard))
    first = load_captioned_shards([pinned], size=16, channels=3, cache_dir=cache)
    entries = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert entries == [f"{pinned.sha256}-3x16x16-v1.json", f"{pinned.sha256}-3x16x16-v1.npy"]
    shard.unlink()  # nothing left to decode: the second read can only come from the cache
    again = load_captioned_shards([pinned], size=16, channels=3, cache_dir=cache)
    assert again.fingerprint() == first.fingerprint()


def test_another_image_size_is_another_cache_entry(tmp_path, shard):
    small = load_captioned_shards([ShardFile(shard)], size=8, channels=3, cache_dir=tmp_path)
    grey = load_captioned_shards([ShardFile(shard)], size=8, channels=1, cache_dir=tmp_path)
    assert small.image_shape == (3, 8, 8) and grey.image_shape == (1, 8, 8)


def test_a_torn_cache_entry_is_decoded_again(tmp_path, shard):
    cache = tmp_path / "cache"
    first = load_captioned_shards([ShardFile(shard)], size=16, channels=3, cache_dir=cache)
    (pixels,) = cache.glob("*.npy")
    pixels.write_bytes(pixels.read_bytes()[:200])
    assert load_captioned_shards([ShardFile(shard)], size=16, channels=3, cache_dir=cache).fingerprint() == \
        first.fingerprint()


def test_a_shard_whose_bytes_differ_from_the_pinned_sha256_is_refused(tmp_path, shard):
    with pytest.raises(DataSetError, match="pins " + "0" * 64):
        load_captioned_shards([ShardFile(shard, sha256="0" * 64)], size=8, channels=3, cache_dir=tmp_path)


def test_the_router_sample_is_bounded_reproducible_and_carries_each_shards_cluster(tmp_path):
    shards = [ShardFile(write_shape_shard(tmp_path / f"c{k}.tar", SAMPLES * 2, seed=k), cluster=k) for k in (0, 1)]
    sample = load_captioned_shards(shards, size=8, channels=3, cache_dir=tmp_path, max_items=5, seed=7)
    assert len(sample) == 5 and set(sample.clusters.tolist()) <= {0, 1}
    assert all(key.startswith(f"c{cluster}-") for key, cluster in zip(sample.keys, sample.clusters.tolist()))
    again = load_captioned_shards(shards, size=8, channels=3, cache_dir=tmp_path, max_items=5, seed=7)
    assert again.keys == sample.keys
    assert load_captioned_shards(shards, size=8, channels=3, cache_dir=tmp_path, max_items=5, seed=8).keys != \
        sample.keys


def test_cluster_ids_come_from_the_samples_and_only_when_every_sample_has_one(tmp_path):
    labelled = ShardFile(write_shape_shard(tmp_path / "a.tar", SAMPLES, clusters=[2, 0, 2]))
    unlabelled = ShardFile(write_shape_shard(tmp_path / "b.tar", SAMPLES))
    assert load_captioned_shards([labelled], 8, 3, tmp_path).clusters.tolist() == [2, 0, 2]
    assert load_captioned_shards([labelled, unlabelled], 8, 3, tmp_path).clusters is None


def test_subset_of_a_captioned_data_set_keeps_images_captions_and_clusters_aligned(tmp_path, shard):
    data = load_captioned_shards([ShardFile(shard, cluster=4)], 8, 3, tmp_path)
    part = subset(data, [2, 0], name="part")
    assert isinstance(part, CaptionedDataset) and part.name == "part"
    assert part.captions == (data.captions[2], data.captions[0]) and part.clusters.tolist() == [4, 4]
    assert torch.equal(part.pixels, data.pixels[[2, 0]])


def test_captioned_data_set_refuses_captions_that_do_not_match_its_images():
    with pytest.raises(DataSetError, match="2 captions for 3 images"):
        CaptionedDataset(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), ("a", "b"), "bad")
    with pytest.raises(DataSetError, match="uint8"):
        CaptionedDataset(torch.zeros(1, 3, 8, 8, dtype=torch.float64), ("a",), "bad")  # uint8 pixels or float32 latents only


def test_shards_without_captioned_images_are_an_error_naming_them(tmp_path):
    empty = write_shape_shard(tmp_path / "empty.tar", [])
    with pytest.raises(DataSetError, match="empty.tar"):
        load_captioned_shards([ShardFile(empty)], 8, 3, tmp_path)
