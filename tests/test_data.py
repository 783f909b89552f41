"""Data sets: the embedded digits, the small digits, splits, subsets and the real-data readers."""

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddm_models.data import (
    DataSetError,
    ImageDataset,
    heldout_split,
    iter_webdataset_shard,
    load_embedded_digits,
    load_image_folder,
    load_small_digits,
    subset,
)

# sha256 of the 5,000 embedded digits as loaded here: a changed package or conversion shows up.
EMBEDDED_DIGITS_FINGERPRINT = "b33980939220919b654b856d73a486a4001bc9089daa22ff678a9aa1fd8c0392"


def test_embedded_digits_are_5000_mnist_images_in_unit_range_with_500_per_class():
    data = load_embedded_digits()
    assert data.images.shape == (5000, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert torch.bincount(data.labels).tolist() == [500] * 10
    assert data.class_names == [str(d) for d in range(10)]


def test_embedded_digits_load_identically_twice():
    first, second = load_embedded_digits(), load_embedded_digits()
    assert first.fingerprint() == second.fingerprint()
    first.images.zero_()  # a caller's edit must not leak into the next load
    assert load_embedded_digits().fingerprint() == second.fingerprint()


def test_embedded_digits_fingerprint_is_pinned():
    assert load_embedded_digits().fingerprint() == EMBEDDED_DIGITS_FINGERPRINT


def test_small_digits_are_1797_images_8x8_in_unit_range():
    data = load_small_digits()
    assert data.images.shape == (1797, 1, 8, 8)
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert set(data.labels.tolist()) == set(range(10))


def test_heldout_split_is_a_deterministic_partition():
    train, heldout = heldout_split(1000, 0.2, seed=3)
    assert len(heldout) == 200 and len(train) == 800
    assert np.array_equal(np.sort(np.concatenate([train, heldout])), np.arange(1000))
    again_train, again_heldout = heldout_split(1000, 0.2, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(heldout, again_heldout)
    assert not np.array_equal(heldout, heldout_split(1000, 0.2, seed=4)[1])


def test_heldout_split_rejects_a_fraction_of_one():
    with pytest.raises(ValueError):
        heldout_split(10, 1.0, seed=0)


def test_subset_keeps_images_and_labels_aligned():
    data = load_small_digits()
    part = subset(data, [5, 0, 17])
    assert torch.equal(part.images, data.images[[5, 0, 17]])
    assert part.labels.tolist() == [data.labels[5].item(), data.labels[0].item(), data.labels[17].item()]


def test_dataset_refuses_labels_that_do_not_match_images():
    with pytest.raises(DataSetError):
        ImageDataset(torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.int64), "bad", ["a"])
    with pytest.raises(DataSetError):
        ImageDataset(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), "bad", ["only one class"])


def _png_bytes(value: int, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_folder_reads_class_subfolders_resized_to_square(tmp_path):
    for name, value in [("cat", 0), ("dog", 255)]:
        (tmp_path / name).mkdir()
        for i in range(2):
            (tmp_path / name / f"{i}.png").write_bytes(_png_bytes(value))
    data = load_image_folder(tmp_path, size=8, channels=3)
    assert data.images.shape == (4, 3, 8, 8)
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1]
    assert data.images[0].max() == -1.0 and data.images[3].min() == 1.0


def test_image_folder_without_class_folders_is_refused(tmp_path):
    with pytest.raises(DataSetError, match="class sub-folders"):
        load_image_folder(tmp_path, size=8)


def test_webdataset_shard_streams_captioned_samples_and_skips_uncaptioned(tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in [("a.png", _png_bytes(255)), ("a.txt", b"a white square"),
                              ("b.png", _png_bytes(0)), ("c.png", _png_bytes(0)), ("c.txt", b"black ")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    samples = list(iter_webdataset_shard(shard, size=4, channels=1))
    assert [(s.key, s.caption) for s in samples] == [("a", "a white square"), ("c", "black")]
    assert samples[0].image.shape == (1, 4, 4) and samples[0].image.min() == 1.0


def test_webdataset_reader_names_a_corrupt_shard(tmp_path):
    shard = tmp_path / "broken.tar"
    shard.write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(DataSetError, match="broken.tar"):
        list(iter_webdataset_shard(shard, size=4))
