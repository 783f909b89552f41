"""The operator's commands: `ddm-swarm bootstrap` (a long-lived bootstrap peer), `ddm-swarm swarm
create` (a new manifest) and `ddm-swarm revoke` (withdraw a signer or a checkpoint). Registered on node's command line through the entry-point group
`ddm_swarm.commands` (pyproject.toml): `bootstrap` sits above `node`, so it imports node's app and
adds to it, never the other way round."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from node.cli.app import InitialPeersOption, SwarmOption, app, fail, setup_logging, swarm_app
from node.cli.network_options import AnnounceOption, NatTraversalOption, PortMapOption, network_options


@app.command()
def bootstrap(
    identity: Path = typer.Option(Path("bootstrap.key"), help="libp2p key file (created on first run); keeps the peer id stable."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(31337, help="TCP port to listen on (0 picks a free one)."),
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    announce: Optional[List[str]] = AnnounceOption,
    relay_service: Optional[bool] = typer.Option(True, help="Relay for peers behind NATs, with p2pd's limits."),
    nat_traversal: bool = NatTraversalOption,
    port_map: bool = PortMapOption,
    shards: Optional[Path] = typer.Option(None, help="Folder of the swarm's data shards to seed (default: the one "
                                          "`swarm create` wrote beside the manifest; a bundled swarm's is re-created "
                                          "from its package)."),
    web: Optional[int] = typer.Option(None, help="Serve the swarm's live status page (and /api/status) on this port."),
    web_host: str = typer.Option("127.0.0.1", help="Address the status page listens on (with --web)."),
    samples_every: Optional[float] = typer.Option(None, help="With --web: sample the ensemble every this many seconds "
                                                            "(default: only when asked on the page)."),
) -> None:
    """Run a long-lived bootstrap peer with a stable peer id, seeding the swarm's data shards, and print its multiaddrs."""
    from bootstrap.peer import BootstrapPeer
    from node.swarm.manifest_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        network = network_options(announce, "public", True, False, relay_service, nat_traversal, port_map)
        folder = shard_folder_for(swarm, manifest, shards)
        peer = BootstrapPeer(manifest, identity, host=host, port=port, initial_peers=initial_peers or (),
                             network=network, shards=folder)
    except Exception as error:
        fail(error)
    print(f"ddm-swarm bootstrap peer for swarm '{manifest.name}' ({manifest.swarm_id[:12]}…)", flush=True)
    print(f"peer id: {peer.membership.peer_id}", flush=True)
    print("nodes join with:", flush=True)
    for maddr in peer.maddrs:
        print(f"  --initial-peers {maddr}", flush=True)
    server = None
    if web is not None:
        from node.web.samples import SampleGrid
        from node.web.server import StatusServer

        try:
            samples = SampleGrid(manifest, peer.maddrs, cache_dir=identity.parent / "web-cache")
            server = StatusServer(peer.membership, host=web_host, port=web, samples=samples,
                                  samples_every_s=samples_every).start()
        except Exception as error:
            peer.close()
            fail(error)
        print(f"status page: {server.url}", flush=True)
    print("ready (Ctrl-C to stop)", flush=True)
    try:
        peer.run()
    finally:
        if server is not None:
            server.stop()


def shard_folder_for(swarm: str, manifest, given: Optional[Path]) -> Optional[Path]:
    """The folder of data shards a bootstrap peer seeds: `given`, else the one beside the manifest
    file; a bundled swarm's shards are re-created from its package source (and checked against the
    pinned hashes) when the folder lacks them. None when the swarm has no shards."""
    from bootstrap.bundled_data import RECIPES, ensure_bundled_shards
    from bootstrap.shards import shard_folder_beside

    if manifest.dataset.kind != "shards":
        return None
    bundled = not Path(swarm).is_file()
    folder = given or (Path(f"{manifest.name}.shards") if bundled else shard_folder_beside(swarm))
    if bundled and manifest.name in RECIPES:
        ensure_bundled_shards(manifest.name, manifest, folder)
    return folder


@swarm_app.command("create")
def swarm_create(
    out: Path = typer.Option(..., help="Manifest file to write (the shards go beside it: swarm.yaml -> swarm.shards/)."),
    data: Optional[str] = typer.Option(None, help="Captioned images: an imagefolder (metadata.jsonl/.csv or .txt "
                                       "sidecars), webdataset .tar files (path, folder, file:// or https://), a "
                                       "parquet file, or 'openmoji'. Without it, a manifest is derived from --from."),
    base: str = typer.Option("local", "--from", help="Bundled swarm or manifest whose models, timing and sampling to use."),
    name: Optional[str] = typer.Option(None, help="Name of the new swarm."),
    description: Optional[str] = typer.Option(None, help="One line saying what the swarm trains."),
    num_clusters: Optional[int] = typer.Option(None, "--clusters", "--num-clusters", help="Number of clusters (experts)."),
    image_size: int = typer.Option(32, help="Side of the square RGB images the swarm trains on (with --data)."),
    embedding: str = typer.Option("thumbnail-pca", help="Image embedding to cluster by: thumbnail-pca (no weights) "
                                  "or dinov2:<model id> (from the local Hugging Face cache)."),
    fine_clusters: int = typer.Option(64, help="Fine k-means centroids, merged into --clusters."),
    kmeans_backend: str = typer.Option("auto", help="auto (faiss when installed), faiss or sklearn."),
    seed: int = typer.Option(0, help="Seed of the clustering and the held-out split."),
    heldout_fraction: float = typer.Option(0.1, help="Fraction of every cluster held out for losses and audits."),
    router_samples: int = typer.Option(4096, help="Size of the router's sample across clusters."),
    max_shard_mib: float = typer.Option(64.0, help="Largest data shard, MiB."),
    caption_column: str = typer.Option("text", help="Caption column of metadata.jsonl/.csv or parquet."),
    image_column: str = typer.Option("image", help="Image column of parquet files."),
    text_encoder: Optional[str] = typer.Option(None, help="Text encoder: minilm, clip:<model id> … (default: --from's)."),
    expert_size: Optional[str] = typer.Option(None, help="Named expert size (tiny, small, DiT-B/2 …; default: --from's)."),
    router_size: Optional[str] = typer.Option(None, help="Named router size (default: --from's)."),
    signer: Optional[List[str]] = typer.Option(None, help="Allowed signer id (repeat); makes the swarm allow-list only."),
    lease_s: Optional[float] = typer.Option(None, help="Lease period T in seconds (claims expire after 3T)."),
    bootstrap_peer: Optional[List[str]] = typer.Option(None, help="Bootstrap multiaddr nodes join through (repeat)."),
    shard_url: Optional[List[str]] = typer.Option(None, help="Mirror serving <url>/<sha256>.tar (repeat)."),
    pin_split: bool = typer.Option(True, help="Without --data: compute the data split now and pin its sha256."),
    operator: Optional[str] = typer.Option(None, help="Signer id of the operator, whose revocations every peer applies."),
) -> None:
    """Make a swarm: from your captioned images (--data: embed, cluster, shard, pin), or derived from a bundled one."""
    setup_logging()
    try:
        if data is not None:
            from bootstrap.create import create_swarm_from_data

            created = create_swarm_from_data(
                data, out, clusters=num_clusters or 8, image_size=image_size, name=name, description=description,
                embedding=embedding, fine_clusters=fine_clusters, kmeans_backend=kmeans_backend, seed=seed,
                heldout_fraction=heldout_fraction, router_samples=router_samples,
                max_shard_bytes=int(max_shard_mib * 2**20), caption_column=caption_column, image_column=image_column,
                models_from=base, text_encoder=text_encoder, expert_size=expert_size, router_size=router_size,
                trust_signers=signer or (), lease_s=lease_s, bootstrap_peers=bootstrap_peer or (),
                shard_urls=shard_url or (), operator=operator)
            print(created.summary())
            print(f"next: ddm-swarm bootstrap --swarm {out}   (it seeds the shards in {created.shard_folder})")
            return
        from bootstrap.create import create_swarm

        manifest = create_swarm(base, out, name=name, num_clusters=num_clusters, trust_signers=signer or (),
                                lease_s=lease_s, bootstrap_peers=bootstrap_peer or (), pin_split=pin_split,
                                description=description, operator=operator)
    except Exception as error:
        fail(error)
    print(f"wrote {out}: swarm '{manifest.name}' id {manifest.swarm_id}")
    if manifest.clustering.assignment_sha256:
        print(f"data split pinned: {manifest.clustering.assignment_sha256}")


@app.command()
def revoke(
    key: Path = typer.Option(..., help="The operator's identity file (its signer id is the manifest's trust.operator)."),
    signer: Optional[str] = typer.Option(None, help="Signer id to revoke: every checkpoint and audit it signed."),
    checkpoint: Optional[str] = typer.Option(None, help="sha256 of one checkpoint blob to revoke."),
    reason: str = typer.Option("", help="One line saying why (shown to peers)."),
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
) -> None:
    """Sign a revocation and store it in the swarm: every peer then refuses what it names, generators
    assemble without it and mirrors stop serving it."""
    from bootstrap.revocation import publish_revocation
    from node.swarm.manifest_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        record = publish_revocation(manifest, key, signer=signer, checkpoint=checkpoint, reason=reason,
                                    initial_peers=initial_peers or ())
    except Exception as error:
        fail(error)
    print(f"revoked {record.target_kind} {record.target} in swarm '{manifest.name}' until "
          f"{record.expires_at:.0f} (run again before then to keep it revoked)")
