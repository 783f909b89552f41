"""The operator's commands: `ddm-swarm bootstrap` (a long-lived bootstrap peer), `ddm-swarm swarm
create` (a new manifest) and `ddm-swarm revoke` (withdraw a signer or a checkpoint). Registered on node's command line through the entry-point group
`ddm_swarm.commands` (pyproject.toml): `bootstrap` sits above `node`, so it imports node's app and
adds to it, never the other way round."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from node.cli.app import InitialPeersOption, SwarmOption, app, fail, setup_logging, swarm_app


@app.command()
def bootstrap(
    identity: Path = typer.Option(Path("bootstrap.key"), help="libp2p key file (created on first run); keeps the peer id stable."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(31337, help="TCP port to listen on (0 picks a free one)."),
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    announce: Optional[List[str]] = typer.Option(None, help="Multiaddr to announce instead of the listening one."),
) -> None:
    """Run a long-lived bootstrap peer with a stable peer id and print its multiaddrs."""
    from bootstrap.peer import BootstrapPeer
    from node.swarm.manifest_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        peer = BootstrapPeer(manifest, identity, host=host, port=port, initial_peers=initial_peers or (),
                             announce_maddrs=announce or ())
    except Exception as error:
        fail(error)
    print(f"ddm-swarm bootstrap peer for swarm '{manifest.name}' ({manifest.swarm_id[:12]}…)", flush=True)
    print(f"peer id: {peer.membership.peer_id}", flush=True)
    print("nodes join with:", flush=True)
    for maddr in peer.maddrs:
        print(f"  --initial-peers {maddr}", flush=True)
    print("ready (Ctrl-C to stop)", flush=True)
    peer.run()


@swarm_app.command("create")
def swarm_create(
    out: Path = typer.Option(..., help="Manifest file to write."),
    base: str = typer.Option("local", "--from", help="Bundled swarm or manifest to start from."),
    name: Optional[str] = typer.Option(None, help="Name of the new swarm."),
    description: Optional[str] = typer.Option(None, help="One line saying what the swarm trains."),
    num_clusters: Optional[int] = typer.Option(None, help="Number of clusters (experts)."),
    signer: Optional[List[str]] = typer.Option(None, help="Allowed signer id (repeat); makes the swarm allow-list only."),
    lease_s: Optional[float] = typer.Option(None, help="Lease period T in seconds (claims expire after 3T)."),
    bootstrap_peer: Optional[List[str]] = typer.Option(None, help="Bootstrap multiaddr nodes join through (repeat)."),
    pin_split: bool = typer.Option(True, help="Compute the data split now and pin its sha256 in the manifest."),
    operator: Optional[str] = typer.Option(None, help="Signer id of the operator, whose revocations every peer applies."),
) -> None:
    """Write a new swarm manifest (derived from a bundled one) and print its swarm id."""
    from bootstrap.create import create_swarm

    setup_logging()
    try:
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
