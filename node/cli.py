"""The `ddm-swarm` command line."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from node.errors import NodeError
from protocol.errors import ProtocolError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train a text-to-image diffusion model as a swarm of decentralized experts.")
swarm_app = typer.Typer(no_args_is_help=True, help="Swarm manifests: show or create.")
app.add_typer(swarm_app, name="swarm")
console = Console(stderr=True)

SwarmOption = typer.Option("local", "--swarm", "-s", help="Bundled swarm name or path to a manifest YAML file.")
InitialPeersOption = typer.Option(None, "--initial-peers", "-p",
                                  help="Multiaddr of a peer to join through (repeat for several).")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)], force=True)
    # hivemind is chatty at INFO; its warnings still show
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


def fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}")
    raise typer.Exit(1)


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
    from node.swarm_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        peer = BootstrapPeer(manifest, identity, host=host, port=port, initial_peers=initial_peers or (),
                             announce_maddrs=announce or ())
    except (ProtocolError, NodeError) as error:
        fail(error)
    print(f"ddm-swarm bootstrap peer for swarm '{manifest.name}' ({manifest.swarm_id[:12]}…)", flush=True)
    print(f"peer id: {peer.membership.peer_id}", flush=True)
    print("nodes join with:", flush=True)
    for maddr in peer.maddrs:
        print(f"  --initial-peers {maddr}", flush=True)
    print("ready (Ctrl-C to stop)", flush=True)
    peer.run()


@app.command()
def status(
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show who trains what: claims, latest checkpoints, held-out metrics, providers and peers."""
    import json

    from node.membership import SwarmMembership
    from node.status import collect_status, status_tables
    from node.swarm_files import load_manifest
    from protocol.identity import Identity

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        peers = initial_peers or list(manifest.bootstrap_peers)
        if not peers:
            raise NodeError("status needs --initial-peers: the multiaddr of a bootstrap peer or any node of the swarm")
        membership = SwarmMembership(manifest, Identity.generate(), initial_peers=peers, client_mode=True)
    except (ProtocolError, NodeError) as error:
        fail(error)
    try:
        snapshot = collect_status(membership)
    finally:
        membership.shutdown()
    if as_json:
        print(json.dumps(snapshot, indent=2))
        return
    out = Console()
    for table in status_tables(snapshot):
        out.print(table)
    for warning in snapshot["warnings"]:
        out.print(f"[yellow]warning:[/] {warning}")


@swarm_app.command("show")
def swarm_show(swarm: str = SwarmOption) -> None:
    """Print a swarm's manifest and its swarm id."""
    import yaml

    from node.swarm_files import load_manifest

    try:
        manifest = load_manifest(swarm)
    except (ProtocolError, NodeError) as error:
        fail(error)
    print(f"# swarm id: {manifest.swarm_id}")
    print(yaml.safe_dump(manifest.to_file_dict(), sort_keys=False, allow_unicode=True), end="")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
