"""Swarm creation, two ways.

`create_swarm_from_data`: the operator's own captioned images -> clustered, content-addressed
webdataset shards beside the manifest, and a manifest (`dataset.kind: shards`) that pins every
shard, the held-out shards, the router sample and the clustering. The steps are rooms of their own:
`ingest` (read and prepare every image once, into a spool on disk), `clustering_step` (embed into
a memory map, two-stage k-means), `sharding` (held-out split, router sample, shard files),
`shards` (the deterministic tar format).

`create_swarm`: derive a manifest from a bundled one, optionally pinning the data split. Pinning
computes the cluster split once (as every node will) and writes its sha256 into the manifest, so a
node whose numeric libraries would split the data differently refuses to train instead of
silently training on another cluster.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from bootstrap.clustering_step import cluster_spool
from bootstrap.ingest import spool_source
from bootstrap.shards import DEFAULT_MAX_SHARD_BYTES, shard_folder_beside
from bootstrap.sharding import DEFAULT_ROUTER_SAMPLES, lay_out_shards
from ddm_models.clustering import FINE_CENTROIDS
from ddm_models.configs import expert_config, router_config
from ddm_models.image_embeddings import OFFLINE_EMBEDDING
from ddm_models.sources import CaptionedImageSource, SkipReport, open_source
from node.data.swarm_data import prepare_swarm_data
from node.swarm.manifest_files import load_manifest, write_manifest_file
from node.swarm.membership import check_initial_peers
from protocol.manifest import SwarmManifest


def create_swarm(base: str, out: Path, *, name: Optional[str] = None, num_clusters: Optional[int] = None,
                 trust_signers: Sequence[str] = (), lease_s: Optional[float] = None,
                 bootstrap_peers: Sequence[str] = (), pin_split: bool = False, cache_dir: Optional[Path] = None,
                 description: Optional[str] = None, operator: Optional[str] = None) -> SwarmManifest:
    """Write a new manifest to `out` (validated by reading it back) and return it."""
    manifest = load_manifest(base)
    data = manifest.to_file_dict()
    if name:
        data["name"] = name
    if description is not None:
        data["description"] = description
    if num_clusters:
        data["clustering"] = {**data["clustering"], "num_clusters": num_clusters, "assignment_sha256": ""}
        data["cluster_experts"] = {k: v for k, v in data["cluster_experts"].items() if int(k) < num_clusters}
    _set_trust_and_timing(data, trust_signers, operator, lease_s)
    if bootstrap_peers:
        data["bootstrap_peers"] = check_initial_peers(bootstrap_peers)
    manifest = SwarmManifest.from_dict(data)
    if pin_split:
        split = prepare_swarm_data(dataclasses.replace(manifest, clustering=dataclasses.replace(
            manifest.clustering, assignment_sha256="")), cache_dir or out.parent / ".ddm-cache").split
        manifest = dataclasses.replace(manifest, clustering=dataclasses.replace(manifest.clustering,
                                                                                assignment_sha256=split.sha256))
    write_manifest_file(manifest, out)
    return manifest


# --- a swarm from the operator's own captioned images ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class CreatedSwarm:
    """What `create_swarm_from_data` made: the manifest (written to `manifest_path`), the folder
    of `<sha256>.tar` shards beside it, and what was kept and skipped while reading."""

    manifest: SwarmManifest
    manifest_path: Path
    shard_folder: Path
    report: SkipReport
    images_read: int
    seconds: float

    def summary(self) -> str:
        """A few lines for the operator: the swarm id, what went where, what was skipped."""
        dataset = self.manifest.dataset
        shards = dataset.all_shards()
        sizes = ", ".join(str(c.train_samples + c.heldout_samples) for c in dataset.clusters)
        return (f"swarm {self.manifest.name} {self.manifest.swarm_id}\n"
                f"  {dataset.total_samples} images in {len(dataset.clusters)} clusters ({sizes}), "
                f"{sum(c.heldout_samples for c in dataset.clusters)} held out, "
                f"{sum(s.samples for s in dataset.router_sample)} in the router sample\n"
                f"  {len(shards)} shards, {sum(s.blob.size for s in shards) / 2**20:.1f} MiB in {self.shard_folder}\n"
                f"  read {self.images_read} samples in {self.seconds:.1f} s: {self.report.summary()}\n"
                f"  manifest: {self.manifest_path}")


def create_swarm_from_data(data: str | CaptionedImageSource, out: Path, *, clusters: int, image_size: int = 32,
                           name: Optional[str] = None, description: Optional[str] = None,
                           embedding: str = OFFLINE_EMBEDDING, fine_clusters: int = FINE_CENTROIDS,
                           kmeans_backend: str = "auto", seed: int = 0, heldout_fraction: float = 0.1,
                           router_samples: int = DEFAULT_ROUTER_SAMPLES,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, caption_column: str = "text",
                           image_column: str = "image", models_from: str = "local",
                           text_encoder: Optional[str] = None, expert_size: Optional[str] = None,
                           router_size: Optional[str] = None, trust_signers: Sequence[str] = (),
                           lease_s: Optional[float] = None, bootstrap_peers: Sequence[str] = (),
                           shard_urls: Sequence[str] = (), operator: Optional[str] = None) -> CreatedSwarm:
    """Make a swarm of a captioned image collection and write its manifest to `out`.

    `data` is a source spec for `ddm_models.sources.open_source` (a folder, a .tar shard or a folder
    of them, a URL, a .parquet file, "openmoji") or a source object. Every image is read once,
    prepared to (image_size, image_size) RGB, embedded (`embedding`: "thumbnail-pca" or
    "dinov2:<model id>"), clustered into `clusters`, split into train and held-out parts and written
    as webdataset shards of at most `max_shard_bytes` into `<out stem>.shards/` beside `out`. Model
    specs, timing and sampling come from the swarm `models_from`, with sizes overridden by
    `expert_size` / `router_size`. Raises `SourceError` subclasses (`EmptySource`, `TooFewImages`,
    ...) for data that cannot make a swarm.
    """
    started = time.monotonic()
    out = Path(out)
    source = open_source(data, caption_column=caption_column, image_column=image_column) \
        if isinstance(data, str) else data
    # everything but the data is checked before the data is read: a typo should not cost an hour
    data_dict = _models_section(load_manifest(models_from).to_file_dict(), clusters, text_encoder, expert_size,
                                router_size)
    data_dict.update(name=name or out.stem, description=description if description is not None
                     else f"{source.description}, {clusters} clusters")
    _set_trust_and_timing(data_dict, trust_signers, operator, lease_s)
    data_dict["bootstrap_peers"] = check_initial_peers(bootstrap_peers) if bootstrap_peers else []
    SwarmManifest.from_dict({**data_dict, "clustering": {**data_dict["clustering"], "num_clusters": clusters,
                                                         "fine_clusters": max(clusters, fine_clusters)}})

    report = SkipReport()
    work = out.parent / f".{out.stem}.create-work"
    shutil.rmtree(work, ignore_errors=True)
    shard_folder = shard_folder_beside(out)
    try:
        with spool_source(source, work / "spool", image_size, report) as spool:
            clustering = cluster_spool(spool, clusters=clusters, embedding=embedding, fine_clusters=fine_clusters,
                                       seed=seed, work=work, backend=kmeans_backend)
            layout = lay_out_shards(spool, clustering.split, shard_folder, heldout_fraction=heldout_fraction,
                                    split_seed=seed, router_samples=router_samples, max_shard_bytes=max_shard_bytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data_dict["dataset"] = {
        "kind": "shards", "image_size": image_size, "channels": 3, "heldout_fraction": heldout_fraction,
        "split_seed": seed, "source": source.description[:256], "clusters": [c.to_dict() for c in layout.clusters],
        "router_sample": [s.to_dict() for s in layout.router_sample], "shard_urls": list(shard_urls)}
    data_dict["clustering"] = {"num_clusters": clusters, "method": clustering.method, "embedding": embedding,
                               "fine_clusters": clustering.fine_clusters, "seed": seed,
                               "assignment_sha256": clustering.split.sha256}
    manifest = SwarmManifest.from_dict(data_dict)
    write_manifest_file(manifest, out)
    return CreatedSwarm(manifest, out, shard_folder, report, spool.samples_read, time.monotonic() - started)


def _models_section(data: dict, clusters: int, text_encoder: Optional[str], expert_size: Optional[str],
                    router_size: Optional[str]) -> dict:
    """The base swarm's models, text encoder, timing and sampling, with the sizes asked for."""
    data = dict(data)
    if expert_size:
        expert_config(expert_size)  # InvalidConfig names the sizes there are
    if router_size:
        router_config(router_size)
    data["cluster_experts"] = {k: v for k, v in data["cluster_experts"].items() if int(k) < clusters}
    if text_encoder:
        data["text_encoder"] = text_encoder
    if expert_size:
        data["experts"] = [{**spec, "architecture": {**spec["architecture"], "size": expert_size}}
                           for spec in data["experts"]]
    if router_size:
        data["router"] = {**data["router"], "architecture": {**data["router"]["architecture"], "size": router_size}}
    return data


def _set_trust_and_timing(data: dict, trust_signers: Sequence[str], operator: Optional[str],
                          lease_s: Optional[float]) -> None:
    """Apply `swarm create`'s --signer, --operator and --lease-s to a manifest dict, in place."""
    if trust_signers:
        data["trust"] = {"mode": "allowlist", "signers": list(trust_signers)}
    if operator:  # the key whose revocations every peer applies (`ddm-swarm revoke`)
        data["trust"] = {**data["trust"], "operator": operator}
    if lease_s:
        data["timing"] = {**data["timing"], "lease_s": lease_s}
