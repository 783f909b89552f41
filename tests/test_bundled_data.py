"""Bundled swarms' shards are re-created from their source and accepted only if every byte matches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bootstrap.bundled_data import BundledDataMismatch, BundledRecipe, ensure_bundled_shards, missing_shards
from bootstrap.create import create_swarm_from_data
from ddm_models.sources import SkipReport
from ddm_models.sources.openmoji import OpenMojiSource, attribution, caption_for
from ddm_models.sources.prepare import prepare_image
from node.swarm.manifest_files import load_manifest
from protocol.hashing import blob_ref_of
from protocol.manifest_data import ShardRef
from tests.captioned_data import write_image_folder


def small_recipe(tmp_path) -> BundledRecipe:
    write_image_folder(tmp_path / "photos", 16, layout="jsonl")
    return BundledRecipe(str(tmp_path / "photos"), dict(clusters=2, image_size=16, fine_clusters=4,
                                                        router_samples=4), {"pillow": "0.0-of-the-recipe"})


def test_missing_shards_are_re_created_and_accepted_when_every_hash_matches(tmp_path):
    recipe = small_recipe(tmp_path)
    manifest = create_swarm_from_data(recipe.data, tmp_path / "made" / "swarm.yaml", **recipe.options).manifest
    folder = ensure_bundled_shards("test", manifest, tmp_path / "served", recipe=recipe)
    assert missing_shards(manifest, folder) == []
    assert len(list(folder.glob("*.tar"))) == len(manifest.dataset.all_shards())


def test_re_created_shards_with_other_bytes_are_refused_naming_the_library_versions(tmp_path):
    recipe = small_recipe(tmp_path)
    manifest = create_swarm_from_data(recipe.data, tmp_path / "made" / "swarm.yaml", **recipe.options).manifest
    other = ShardRef(blob_ref_of(b"bytes some other Pillow wrote"), 3)
    router = dataclasses.replace(manifest.dataset, router_sample=(other,))
    tampered = dataclasses.replace(manifest, dataset=router)
    with pytest.raises(BundledDataMismatch, match=r"1 of 5 pinned shards.*pillow 1.* \(made with 0\.0-of-the-recipe\)"):
        ensure_bundled_shards("test", tampered, tmp_path / "served", recipe=recipe)
    assert not (tmp_path / "served").exists()  # nothing accepted


def test_emoji_captions_are_lower_cased_unicode_names():
    assert caption_for(0x1F34E) == "red apple"
    assert caption_for(0x1F938) == "person doing cartwheel"
    assert caption_for(0x1FACE) == "moose"  # Unicode 15: from the emoji package where unicodedata is older
    assert caption_for(0xE000) is None  # OpenMoji's private-use glyphs have no name


def test_openmoji_renders_every_single_code_point_emoji_on_white_and_names_its_licence():
    source = OpenMojiSource()
    report = SkipReport()
    samples = [sample for _, sample in zip(range(40), source.samples(report))]
    pixels = np.stack([prepare_image(sample.image, 32) for sample in samples])
    assert pixels.shape == (40, 32, 32, 3)
    assert (pixels[:, 0, 0] == 255).all()  # corners are white, not black
    assert pixels.reshape(40, -1).min(axis=1).max() < 200  # and every emoji draws something dark
    assert "CC BY-SA 4.0" in attribution()
    assert "CC BY-SA 4.0" in load_manifest("emoji").description


@pytest.mark.slow
def test_the_bundled_emoji_shards_are_re_created_byte_identically_from_the_wheel(tmp_path):
    manifest = load_manifest("emoji")
    folder = ensure_bundled_shards("emoji", manifest, tmp_path / "emoji.shards")
    assert missing_shards(manifest, folder) == []
    assert manifest.dataset.total_samples >= 1463
