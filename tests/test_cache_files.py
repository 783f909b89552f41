"""Cache files a node can rebuild are rebuilt when damaged, never trusted: the cluster split."""

import logging

from ddm_models.clustering import ClusterSplit
from node.data.swarm_data import prepare_swarm_data
from node.swarm.manifest_files import load_manifest
from tests.swarm_harness import ROOT

TINY = ROOT / "tests" / "manifests" / "tiny.yaml"


def test_a_damaged_cluster_split_cache_is_rebuilt_with_a_warning_naming_it(tmp_path, caplog):
    manifest = load_manifest(str(TINY))
    first = prepare_swarm_data(manifest, tmp_path)
    (cache,) = tmp_path.glob("split-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])  # a torn zip: numpy raises zipfile's own error type
    with caplog.at_level(logging.WARNING, logger="ddm_swarm.jobs"):
        second = prepare_swarm_data(manifest, tmp_path)
    assert "rebuilding the cluster split" in caplog.text and str(cache) in caplog.text
    assert second.split.sha256 == first.split.sha256 == ClusterSplit.load(cache).sha256
