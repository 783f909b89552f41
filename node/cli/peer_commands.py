"""`ddm-swarm node` (a training peer) and `ddm-swarm status` (who trains what)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from node.cli.app import InitialPeersOption, SwarmOption, app, console, fail, setup_logging
from node.errors import NodeError
from protocol.errors import ProtocolError
from protocol.jobs import Job


def parse_job(text: Optional[str], manifest) -> Optional[Job]:
    """--job as given on the command line -> a job of this swarm (or None: the node chooses)."""
    if text is None:
        return None
    names = ", ".join(map(str, manifest.jobs))
    try:
        job = Job.parse(text)
    except ProtocolError:
        job = None
    if job not in manifest.jobs:
        raise NodeError(f"--job {text!r:.40} is not a job of swarm '{manifest.name}': {names}")
    return job


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
    from node.cli.node_view import NodeView
    from node.swarm.manifest_files import load_manifest
    from node.trainer.peer import SwarmNode
    from node.trainer.state import NodeOptions

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        peers = initial_peers or list(manifest.bootstrap_peers)
        options = NodeOptions(data_dir=data_dir, initial_peers=peers, host=host, port=port,
                              job=parse_job(job, manifest), model=model, max_steps=max_steps, max_minutes=max_minutes,
                              exit_when_done=exit_when_done, mirror=mirror, threads=threads, seed=seed, device=device)
        swarm_node = SwarmNode(manifest, options)
        with NodeView(manifest.name, console) as view:
            swarm_node.on_status = view.update
            swarm_node.run()
    except Exception as error:
        fail(error)
    if swarm_node.summary is not None:  # one machine-readable line for scripts and benchmarks
        print(json.dumps({"node_summary": swarm_node.summary.to_dict()}), flush=True)


@app.command()
def status(
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Show who trains what: claims, latest checkpoints, held-out metrics, providers and peers."""
    from node.swarm.manifest_files import load_manifest
    from node.swarm.membership import SwarmMembership
    from node.swarm.status import collect_status, status_tables
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
        out.print(f"[yellow]warning:[/] {escape(warning)}")  # quotes peers' beacons
