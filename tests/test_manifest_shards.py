"""The manifest's `dataset.kind: shards` section: every shard pinned, every field checked at load time."""

from __future__ import annotations

import copy
import re

import pytest

from node.swarm.manifest_files import load_manifest
from protocol.errors import InvalidManifest
from protocol.hashing import blob_ref_of
from protocol.manifest import SwarmManifest
from protocol.manifest_data import MAX_HELDOUT_SHARDS_PER_CLUSTER


def shard(seed: int, samples: int = 5) -> dict:
    return {**blob_ref_of(f"shard {seed}".encode()).to_wire(), "samples": samples}


def shards_manifest(**dataset) -> dict:
    data = load_manifest("local").to_file_dict()
    data["dataset"] = {"kind": "shards", "image_size": 32, "channels": 3, "source": "a test",
                       "clusters": [{"cluster": k, "train": [shard(10 * k), shard(10 * k + 1)],
                                     "heldout": [shard(10 * k + 2, 1)]} for k in range(4)],
                       "router_sample": [shard(99, 8)], **dataset}
    data["clustering"] = {**data["clustering"], "embedding": "thumbnail-pca", "assignment_sha256": "ab" * 32}
    return data


def test_a_shards_manifest_reads_back_from_its_file_form_with_the_same_swarm_id():
    manifest = SwarmManifest.from_dict(shards_manifest())
    again = SwarmManifest.from_dict(copy.deepcopy(manifest.to_file_dict()))
    assert again == manifest and again.swarm_id == manifest.swarm_id
    assert manifest.dataset.clusters[2].train_samples == 10 and manifest.dataset.total_samples == 44
    assert len(manifest.dataset.all_shards()) == 13


def test_changing_one_shard_hash_changes_the_swarm_id():
    data = shards_manifest()
    other = copy.deepcopy(data)
    other["dataset"]["clusters"][3]["heldout"][0] = shard(12345, 1)
    assert SwarmManifest.from_dict(data).swarm_id != SwarmManifest.from_dict(other).swarm_id


def test_the_bundled_kinds_encode_as_before_so_their_swarm_ids_do_not_change():
    assert set(load_manifest("local").to_dict()["dataset"]) == {"kind", "image_size", "channels", "uri",
                                                                "heldout_fraction", "split_seed", "shards"}


@pytest.mark.parametrize("change, field", [
    (lambda d: d["dataset"]["clusters"][1]["train"][0].update(sha256="XYZ"), "dataset.clusters[1].train[0]"),
    (lambda d: d["dataset"]["clusters"][0]["heldout"][0].update(samples=0), "dataset.clusters[0].heldout[0].samples"),
    (lambda d: d["dataset"]["clusters"][0]["train"][0].update(size=-1), "dataset.clusters[0].train[0]"),
    (lambda d: d["dataset"]["clusters"][0]["train"][0].update(colour="red"), "dataset.clusters[0].train[0].colour"),
    (lambda d: d["dataset"]["clusters"].reverse(), "dataset.clusters[0].cluster"),
    (lambda d: d["dataset"]["clusters"].pop(), "dataset.clusters"),
    (lambda d: d["dataset"]["clusters"][2].update(heldout=[]), "dataset.clusters[2].heldout"),
    (lambda d: d["dataset"].update(router_sample=[]), "dataset.router_sample"),
    (lambda d: d["dataset"].update(shard_urls=["ftp://mirror.example/shards"]), "dataset.shard_urls"),
    (lambda d: d["dataset"].update(source="x" * 300), "dataset.source"),
    (lambda d: d["dataset"]["clusters"][0].update(
        heldout=[shard(7, 1)] * (MAX_HELDOUT_SHARDS_PER_CLUSTER + 1)), "dataset.clusters[0].heldout"),
])
def test_a_bad_shards_section_is_refused_naming_the_field(change, field):
    data = shards_manifest()
    change(data)
    with pytest.raises(InvalidManifest, match=re.escape(field)):
        SwarmManifest.from_dict(data)


def test_shard_fields_are_refused_in_a_data_set_that_pins_no_shards():
    data = load_manifest("local").to_file_dict()
    data["dataset"]["clusters"] = []
    with pytest.raises(InvalidManifest, match="unknown field.*dataset.clusters"):
        SwarmManifest.from_dict(data)
