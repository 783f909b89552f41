"""The generator's side: join a swarm as a client, assemble the ensemble, sample locally.

    from node.generator.client import assemble_ensemble
    ensemble = assemble_ensemble("local", initial_peers=[...])
    result = ensemble.sample(["the digit 7"] * 4, routing="top2", seed=0)

Downloaded checkpoints are cached (content-addressed, verified, resumable) under `cache_dir`, so a
second call fetches nothing that is still current.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from node.generator.assembly import Assembler, Ensemble
from node.blobs.service import BlobService
from node.blobs.store import BlobStore
from node.errors import NodeError
from node.swarm.membership import SwarmMembership
from node.network import NetworkLoop
from node.swarm.manifest_files import load_manifest
from protocol.identity import Identity
from protocol.manifest import SwarmManifest

logger = logging.getLogger("ddm_swarm.client")


DEFAULT_CACHE_QUOTA_GB = 20.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("DDM_SWARM_CACHE", Path.home() / ".cache" / "ddm-swarm"))


def cache_quota_bytes() -> int:
    """The most bytes of checkpoints a generator's cache keeps: `DDM_SWARM_CACHE_QUOTA_GB` (default
    20). The ensemble just assembled is always kept, even above it."""
    try:
        return int(float(os.environ.get("DDM_SWARM_CACHE_QUOTA_GB", DEFAULT_CACHE_QUOTA_GB)) * 1e9)
    except ValueError:
        raise NodeError("DDM_SWARM_CACHE_QUOTA_GB must be a number of gigabytes") from None


def assemble_ensemble(swarm: Union[str, SwarmManifest], *, initial_peers: Sequence[str] = (),
                      cache_dir: Optional[Path] = None, verify: bool = False, require_all: bool = False,
                      progress: Optional[Callable[[str, int, int], None]] = None, device: str = "cpu") -> Ensemble:
    """The best acceptable checkpoint of every cluster plus the router, fetched from the swarm (with
    `verify`, held-out losses measured on `device`)."""
    manifest = swarm if isinstance(swarm, SwarmManifest) else load_manifest(swarm)
    peers = list(initial_peers) or list(manifest.bootstrap_peers)
    if not peers:
        raise NodeError("joining a swarm needs --initial-peers (the multiaddr of a bootstrap peer or any node)")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    membership = SwarmMembership(manifest, Identity.generate(), initial_peers=peers, client_mode=True)
    loop = NetworkLoop()
    blobs = None
    try:
        for problem in membership.beacon_problems():
            logger.warning(problem)
        store = BlobStore(cache / "blobs")
        quota = cache_quota_bytes()
        blobs = BlobService(membership, store, loop, serve=False)
        heldout = router_heldout = None
        if verify:
            from node.data.swarm_data import prepare_swarm_data

            data = prepare_swarm_data(manifest, cache)
            heldout = lambda cluster: data.expert_data(cluster)[1]  # noqa: E731
            router_heldout = lambda: data.router_data()[2]  # noqa: E731
        assembler = Assembler(manifest, membership, blobs, verify=verify, heldout=heldout,
                              router_heldout=router_heldout, progress=progress, device=device)
        ensemble = assembler.assemble(require_all=require_all)
        used = {record.blob.sha256 for record in ensemble.records}
        for sha in used:
            store.touch(sha)
        collected = store.collect(quota, keep=used)  # old checkpoints and abandoned partials go
        if collected.blobs or collected.partials:
            logger.info(f"checkpoint cache: removed {len(collected.blobs)} old blobs and {len(collected.partials)} "
                        f"partial downloads ({collected.bytes_freed / 1e6:.0f} MB)")
        return ensemble
    finally:
        if blobs is not None:
            blobs.stop()
        loop.stop()
        membership.shutdown()
