"""The `ddm-swarm` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

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


# Failures a user can meet and fix (bad files, bad input, a full disk, an unreachable swarm): one
# line on stderr and exit status 1. Anything else is a bug and keeps its traceback.
_ANTICIPATED_ELSEWHERE = {
    "ddm_models.configs": ("InvalidConfig",), "ddm_models.checkpoint": ("InvalidCheckpoint",),
    "ddm_models.data": ("DataSetError",), "ddm_models.clustering": ("ClusterSplitError",),
    "ddm_models.text": ("TextEncoderError",), "ddm_models.metrics": ("MetricUnavailable",),
    "ddm_models.image_embeddings": ("EmbedderUnavailable",),
}


def anticipated_errors() -> tuple:
    kinds = [ProtocolError, NodeError, OSError]
    for module, names in _ANTICIPATED_ELSEWHERE.items():
        loaded = sys.modules.get(module)  # an error of a module that was never imported cannot have happened
        if loaded is not None:
            kinds += [getattr(loaded, name) for name in names]
    return tuple(kinds)


def fail(error: Exception) -> None:
    """Report an anticipated failure in one line and exit 1; re-raise anything else."""
    if not isinstance(error, anticipated_errors()):
        raise error
    console.print(f"[bold red]error:[/] {escape(str(error) or type(error).__name__)}", soft_wrap=True)
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
    except Exception as error:
        fail(error)
    print(f"ddm-swarm bootstrap peer for swarm '{manifest.name}' ({manifest.swarm_id[:12]}…)", flush=True)
    print(f"peer id: {peer.membership.peer_id}", flush=True)
    print("nodes join with:", flush=True)
    for maddr in peer.maddrs:
        print(f"  --initial-peers {maddr}", flush=True)
    print("ready (Ctrl-C to stop)", flush=True)
    peer.run()


@app.command()
def node(
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    data_dir: Path = typer.Option(Path("ddm-node"), help="Where the node keeps its identity, state and blobs."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(0, help="TCP port to listen on (0 picks a free one)."),
    job: Optional[str] = typer.Option(None, help="Train this job ('expert/<k>' or 'router') instead of choosing."),
    model: Optional[str] = typer.Option(None, help="Expert model of the manifest to train (default: the cluster's)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop training at this step."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop training after this many minutes."),
    exit_when_done: bool = typer.Option(False, help="Exit when the budget is spent instead of serving on."),
    mirror: bool = typer.Option(True, help="Also keep and serve the latest checkpoint of every other job."),
    threads: int = typer.Option(1, help="torch threads (one per core; several nodes on a machine share them)."),
    device: str = typer.Option("cpu", help="torch device: cpu, cuda, cuda:1 …"),
    seed: int = typer.Option(0, help="Training seed (a restart must use the same one)."),
) -> None:
    """Join a swarm, claim the job that most needs work, train it, announce and serve checkpoints."""
    from node.node_view import NodeView
    from node.node_state import NodeOptions
    from node.peer import SwarmNode
    from node.swarm_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        peers = initial_peers or list(manifest.bootstrap_peers)
        options = NodeOptions(data_dir=data_dir, initial_peers=peers, host=host, port=port, job=job, model=model,
                              max_steps=max_steps, max_minutes=max_minutes, exit_when_done=exit_when_done,
                              mirror=mirror, threads=threads, seed=seed, device=device)
        if job is not None and job not in all_jobs_of(manifest):
            raise NodeError(f"--job {job!r} is not a job of swarm '{manifest.name}': {', '.join(all_jobs_of(manifest))}")
        swarm_node = SwarmNode(manifest, options)
        with NodeView(manifest.name, console) as view:
            swarm_node.on_status = view.update
            swarm_node.run()
    except Exception as error:
        fail(error)
    if swarm_node.summary is not None:  # one machine-readable line for scripts and benchmarks
        print(json.dumps({"node_summary": swarm_node.summary.to_dict()}), flush=True)


def all_jobs_of(manifest) -> List[str]:
    from node.claims import all_jobs

    return all_jobs(manifest)


@app.command()
def status(
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show who trains what: claims, latest checkpoints, held-out metrics, providers and peers."""
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
    except Exception as error:
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


@app.command()
def demo(
    minutes: float = typer.Option(6.0, help="Training time of the expert nodes (the whole demo takes ~3 min more)."),
    out: Path = typer.Option(Path("ddm-demo"), help="Folder for the nodes' data, logs and the result grid."),
    per_digit: int = typer.Option(8, help="Samples per digit in the grid and the accuracy measurement."),
    router_share: float = typer.Option(0.3, help="The router node trains this fraction of the time."),
    swarm: str = typer.Option("local", "--swarm", "-s", help="Bundled swarm name or manifest file."),
) -> None:
    """Run a whole swarm on this machine on the embedded default, then generate digits from it."""
    from rich.table import Table

    from node.demo import run_demo
    from node.swarm_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        if manifest.dataset.kind not in ("embedded-digits", "small-digits"):
            raise NodeError("the demo runs on swarms with embedded digit data (like 'local')")
        result = run_demo(manifest, swarm, out, minutes=minutes, router_share=router_share, per_digit=per_digit,
                          console=console)
    except Exception as error:
        fail(error)
    table = Table(title="conditional accuracy (the digit classifier agrees with the prompt)")
    table.add_column("routing")
    table.add_column("accuracy", justify="right")
    for routing, value in result.accuracy.items():
        table.add_row(routing, f"{value:.3f}")
    results = Console()
    results.print(table)
    results.print(f"grid of the digits 0-9 (top-2 routing): [bold]{result.grid}[/]")
    results.print(f"demo finished in {result.seconds / 60:.1f} minutes; every process it started is stopped")


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


@swarm_app.command("show")
def swarm_show(swarm: str = SwarmOption) -> None:
    """Print a swarm's manifest and its swarm id."""
    import yaml

    from node.swarm_files import load_manifest

    try:
        manifest = load_manifest(swarm)
    except Exception as error:
        fail(error)
    print(f"# swarm id: {manifest.swarm_id}")
    print(yaml.safe_dump(manifest.to_file_dict(), sort_keys=False, allow_unicode=True), end="")


from node.generate_cli import register as _register_generate  # noqa: E402

_register_generate(app, console, SwarmOption, InitialPeersOption, fail, setup_logging)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
