"""`create_swarm_from_data`: captioned images in, clustered content-addressed shards and a manifest out."""

from __future__ import annotations

import functools
import http.server
import tarfile
import threading
from collections import Counter
from pathlib import Path

import pytest

from bootstrap.create import create_swarm_from_data
from bootstrap.shards import shard_path
from ddm_models.configs import InvalidConfig
from ddm_models.sources import EmptySource, SourceError
from node.swarm.manifest_files import read_manifest_file
from protocol.errors import InvalidManifest
from protocol.hashing import blob_ref_of
from tests.captioned_data import write_image_folder, write_parquet, write_tar_shard

SMALL = dict(clusters=2, image_size=16, fine_clusters=6, router_samples=10)


def shard_contents(folder: Path, shards) -> list[tuple[str, str, int]]:
    """(key, caption, cluster) of every sample in `shards`, in order."""
    samples = []
    for shard in shards:
        with tarfile.open(shard_path(folder, shard.blob.sha256)) as archive:
            files = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        keys = sorted({name.split(".")[0] for name in files})
        assert len(keys) == shard.samples
        samples += [(key, files[f"{key}.txt"].decode(), int(files[f"{key}.cls"])) for key in keys]
    return samples


def test_a_folder_with_metadata_jsonl_becomes_a_swarm_whose_manifest_pins_every_shard_file(tmp_path):
    write_image_folder(tmp_path / "photos", 30, layout="jsonl")
    created = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml", **SMALL)
    manifest = read_manifest_file(tmp_path / "swarm.yaml")
    assert manifest.swarm_id == created.manifest.swarm_id
    assert created.shard_folder == tmp_path / "swarm.shards"
    assert manifest.dataset.kind == "shards" and manifest.dataset.channels == 3
    assert manifest.clustering.assignment_sha256 and manifest.clustering.num_clusters == 2
    for shard in manifest.dataset.all_shards():
        data = shard_path(created.shard_folder, shard.blob.sha256).read_bytes()
        assert blob_ref_of(data) == shard.blob
    assert created.report.kept == 30 and created.report.total_skipped == 0


def test_every_image_is_in_exactly_one_cluster_shard_either_for_training_or_held_out(tmp_path):
    write_image_folder(tmp_path / "photos", 30, layout="jsonl")
    created = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml", **SMALL)
    placed = []
    for cluster in created.manifest.dataset.clusters:
        for part in (cluster.train, cluster.heldout):
            contents = shard_contents(created.shard_folder, part)
            assert {c for _, _, c in contents} == {cluster.cluster}
            placed += [key for key, _, _ in contents]
        assert cluster.heldout_samples >= 1
    assert sorted(placed) == [f"{i:09d}" for i in range(30)]


def test_the_router_sample_is_bounded_and_labels_each_training_image_with_its_cluster(tmp_path):
    write_image_folder(tmp_path / "photos", 30, layout="jsonl")
    created = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml", **SMALL)
    cluster_of = {key: c for cluster in created.manifest.dataset.clusters
                  for key, _, c in shard_contents(created.shard_folder, cluster.train)}
    router = shard_contents(created.shard_folder, created.manifest.dataset.router_sample)
    assert 2 <= len(router) <= SMALL["router_samples"]
    assert all(cluster_of[key] == cluster for key, _, cluster in router)
    assert set(Counter(cluster for _, _, cluster in router)) == {0, 1}


def test_creating_a_swarm_twice_from_the_same_images_gives_the_same_swarm_id(tmp_path):
    write_image_folder(tmp_path / "photos", 24, layout="jsonl")
    first = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "a" / "swarm.yaml", **SMALL)
    second = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "b" / "swarm.yaml", **SMALL)
    assert first.manifest.swarm_id == second.manifest.swarm_id
    assert sorted(p.name for p in first.shard_folder.iterdir()) == sorted(p.name for p in second.shard_folder.iterdir())


def test_shard_members_carry_no_time_owner_or_mode_of_the_machine_that_wrote_them(tmp_path):
    write_image_folder(tmp_path / "photos", 12, layout="jsonl")
    created = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml", **SMALL)
    for shard in created.manifest.dataset.all_shards():
        with tarfile.open(shard_path(created.shard_folder, shard.blob.sha256)) as archive:
            members = archive.getmembers()
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
        keys = [m.name.split(".")[0] for m in members]
        assert keys == sorted(keys) and [m.name.split(".")[1] for m in members[:3]] == ["png", "txt", "cls"]


@pytest.mark.parametrize("layout", ["csv", "sidecar"])
def test_captions_come_from_metadata_csv_or_sidecar_txt_files(tmp_path, layout):
    write_image_folder(tmp_path / "photos", 20, layout=layout)
    created = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml", **SMALL)
    captions = {caption for cluster in created.manifest.dataset.clusters
                for caption in (c for _, c, _ in shard_contents(created.shard_folder, cluster.train))}
    assert created.report.kept == 20
    assert all(caption.startswith("a ") and caption.split()[-1] in ("circle", "square", "triangle")
               for caption in captions)


def test_shards_are_closed_before_they_pass_the_byte_bound(tmp_path):
    write_image_folder(tmp_path / "photos", 30, layout="jsonl")
    created = create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml",
                                     **{**SMALL, "router_samples": 4}, max_shard_bytes=8 * 1024)
    shards = created.manifest.dataset.all_shards()
    assert len(shards) > 4
    # a shard's samples stay under the bound; tar's end-of-archive padding (up to 10 KiB) comes on top
    assert all(shard.blob.size <= 8 * 1024 + tarfile.RECORDSIZE for shard in shards)


def test_webdataset_shards_from_a_folder_and_a_file_url_create_a_swarm(tmp_path):
    write_tar_shard(tmp_path / "shards" / "000000.tar", 0, 12)
    write_tar_shard(tmp_path / "shards" / "000001.tar", 12, 12, caption_as="json")
    from_folder = create_swarm_from_data(str(tmp_path / "shards"), tmp_path / "a.yaml", **SMALL)
    assert from_folder.report.kept == 24
    from_url = create_swarm_from_data((tmp_path / "shards" / "000000.tar").as_uri(), tmp_path / "b.yaml", **SMALL)
    assert from_url.report.kept == 12 and from_url.manifest.dataset.total_samples == 12


def test_a_webdataset_shard_is_streamed_from_an_http_url(tmp_path):
    write_tar_shard(tmp_path / "served" / "000000.tar", 0, 12)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/000000.tar"
        created = create_swarm_from_data(url, tmp_path / "swarm.yaml", **SMALL)
    finally:
        server.shutdown()
    assert created.report.kept == 12


def test_a_parquet_file_as_hugging_face_datasets_exports_it_creates_a_swarm(tmp_path):
    write_parquet(tmp_path / "data" / "train-00000.parquet", 20)
    created = create_swarm_from_data(str(tmp_path / "data"), tmp_path / "swarm.yaml", **SMALL)
    assert created.report.kept == 20 and created.manifest.dataset.total_samples == 20
    assert created.manifest.dataset.source.startswith("parquet ")


def test_broken_images_and_missing_captions_are_skipped_and_reported(tmp_path):
    root = write_image_folder(tmp_path / "photos", 20, layout="sidecar")
    (root / "images" / "0003.png").write_bytes(b"not a png at all")
    (root / "images" / "0004.png").write_bytes((root / "images" / "0005.png").read_bytes()[:60])  # truncated
    (root / "images" / "0007.txt").unlink()
    (root / "images" / "0008.txt").write_text("   \n")
    created = create_swarm_from_data(str(root), tmp_path / "swarm.yaml", **SMALL)
    assert created.report.kept == 16 and created.manifest.dataset.total_samples == 16
    assert created.report.skipped == {"unreadable image": 2, "missing caption": 2}
    assert any("0003.png" in where for where in created.report.examples["unreadable image"])
    assert "skipped 4 (missing caption: 2, unreadable image: 2)" in created.summary()


def test_a_source_without_one_usable_captioned_image_is_a_clear_error(tmp_path):
    root = write_image_folder(tmp_path / "photos", 3, layout="sidecar")
    for caption in (root / "images").glob("*.txt"):
        caption.unlink()
    with pytest.raises(EmptySource, match="no usable captioned image.*missing caption: 3"):
        create_swarm_from_data(str(root), tmp_path / "swarm.yaml", **SMALL)
    assert not (tmp_path / "swarm.yaml").exists()


def test_a_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        create_swarm_from_data(str(tmp_path / "empty"), tmp_path / "swarm.yaml", **SMALL)


def test_more_clusters_than_images_can_fill_is_refused_with_the_largest_number_that_works(tmp_path):
    write_image_folder(tmp_path / "photos", 7, layout="jsonl")
    with pytest.raises(SourceError, match="at most 3 clusters"):
        create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml", **{**SMALL, "clusters": 4})


@pytest.mark.parametrize("option, phrase", [({"name": "my swarm"}, "'name'"), ({"expert_size": "huge"}, "huge"),
                                            ({"trust_signers": ["not-a-key"]}, "trust.signers")])
def test_a_bad_name_model_size_or_signer_is_refused_before_any_image_is_read(tmp_path, option, phrase):
    write_image_folder(tmp_path / "photos", 12, layout="jsonl")
    with pytest.raises((InvalidManifest, InvalidConfig), match=phrase):
        create_swarm_from_data(str(tmp_path / "photos"), tmp_path / "swarm.yaml", **SMALL, **option)
    assert not (tmp_path / "swarm.shards").exists() and not (tmp_path / "swarm.yaml").exists()


def test_with_faiss_installed_the_fine_centroids_come_from_faiss_and_the_manifest_says_so(tmp_path):
    pytest.importorskip("faiss")
    write_image_folder(tmp_path / "photos", 24, layout="jsonl")
    runs = [create_swarm_from_data(str(tmp_path / "photos"), tmp_path / run / "swarm.yaml", **SMALL,
                                   kmeans_backend="faiss") for run in ("a", "b")]
    assert runs[0].manifest.clustering.method == "kmeans-2stage-faiss"
    assert runs[0].manifest.swarm_id == runs[1].manifest.swarm_id


@pytest.mark.parametrize("cut", [20480 + 100, 7000], ids=["in-a-header", "in-an-image"])
def test_a_webdataset_shard_cut_off_part_way_keeps_the_samples_before_the_cut_and_reports_it(tmp_path, cut):
    whole = write_tar_shard(tmp_path / "shards" / "000000.tar", 0, 16).read_bytes()
    (tmp_path / "shards" / "000000.tar").write_bytes(whole[:cut])
    write_tar_shard(tmp_path / "shards" / "000001.tar", 16, 8)
    created = create_swarm_from_data(str(tmp_path / "shards"), tmp_path / "swarm.yaml", **SMALL)
    assert created.report.skipped["unreadable shard"] == 1
    assert 8 + 2 <= created.report.kept < 24
