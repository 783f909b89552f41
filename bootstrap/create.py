"""Swarm creation: derive a manifest from a bundled one, optionally pinning the data split.

Pinning computes the cluster split once (as every node will) and writes its sha256 into the
manifest, so a node whose numeric libraries would split the data differently refuses to train
instead of silently training on another cluster.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

from node.data.swarm_data import prepare_swarm_data
from node.swarm.membership import check_initial_peers
from node.swarm.manifest_files import load_manifest, write_manifest_file
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
    if trust_signers:
        data["trust"] = {"mode": "allowlist", "signers": list(trust_signers)}
    if operator:  # the key whose revocations every peer applies (`ddm-swarm revoke`)
        data["trust"] = {**data["trust"], "operator": operator}
    if lease_s:
        data["timing"] = {**data["timing"], "lease_s": lease_s}
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
