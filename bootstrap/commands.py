"""The operator's commands: `ddm-swarm bootstrap` (a long-lived bootstrap peer) and `ddm-swarm swarm
create` (a new manifest). Registered on node's command line through the entry-point group
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
    web: Optional[int] = typer.Option(None, help="Serve the swarm's live status page (and /api/status) on this port."),
    web_host: str = typer.Option("127.0.0.1", help="Address the status page listens on (with --web)."),
    samples_every: Optional[float] = typer.Option(None, help="With --web: sample the ensemble every this many seconds "
                                                            "(default: only when asked on the page)."),
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
