"""The operator's commands: `ddm-swarm bootstrap` (a long-lived bootstrap peer) and `ddm-swarm swarm
create` (a new manifest). Registered on node's command line through the entry-point group
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
) -> None:
    """Run a long-lived bootstrap peer with a stable peer id and print its multiaddrs."""
    from bootstrap.peer import BootstrapPeer
    from node.swarm.manifest_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        network = network_options(announce, "public", True, False, relay_service, nat_traversal, port_map)
        peer = BootstrapPeer(manifest, identity, host=host, port=port, initial_peers=initial_peers or (),
                             network=network)
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
) -> None:
    """Write a new swarm manifest (derived from a bundled one) and print its swarm id."""
    from bootstrap.create import create_swarm

    setup_logging()
    try:
        manifest = create_swarm(base, out, name=name, num_clusters=num_clusters, trust_signers=signer or (),
                                lease_s=lease_s, bootstrap_peers=bootstrap_peer or (), pin_split=pin_split,
                                description=description)
    except Exception as error:
        fail(error)
    print(f"wrote {out}: swarm '{manifest.name}' id {manifest.swarm_id}")
    if manifest.clustering.assignment_sha256:
        print(f"data split pinned: {manifest.clustering.assignment_sha256}")
