"""`ddm-swarm node` (a training peer) and `ddm-swarm status` (who trains what)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from node.cli.app import (DeviceOption, InitialPeersOption, SwarmOption, app, checked_device, console, fail,
                          setup_logging)
from node.cli.network_options import (AnnounceOption, AutoRelayOption, DirectPortOption, NatTraversalOption,
                                      PortMapOption, ReachabilityOption, RelayOption, RelayServiceOption,
                                      network_options)
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
    audit: bool = typer.Option(True, help="Audit other signers' expert checkpoints in the background (a low-priority "
                               "thread measuring held-out loss; with --mirror only)."),
    threads: int = typer.Option(1, help="torch threads (one per core; several nodes on a machine share them)."),
    seed: int = typer.Option(0, help="Training seed (a restart must use the same one)."),
    init_from: Optional[str] = typer.Option(
        None, "--init-from", help="Start an expert with nothing to resume from pretrained weights: a DDPM expert "
                                  "checkpoint file (converted to flow matching; trains that checkpoint's cluster), "
                                  "'swarm' (the best DDPM checkpoint of the claimed cluster in the swarm), or a "
                                  "facebookresearch DiT .pt file. Checked before joining; resuming always wins."),
    announce: Optional[List[str]] = AnnounceOption,
    reachability: str = ReachabilityOption,
    relay: bool = RelayOption,
    auto_relay: Optional[bool] = AutoRelayOption,
    relay_service: Optional[bool] = RelayServiceOption,
    nat_traversal: bool = NatTraversalOption,
    port_map: bool = PortMapOption,
    direct_port: int = DirectPortOption,
    # devices and processes
    device: str = DeviceOption,
    gpus: int = typer.Option(1, min=1, help="Training processes, one per GPU (DDP; rank 0 alone joins the swarm); "
                                            "on a CPU-only machine N CPU processes with gloo (for testing). Under "
                                            "torchrun the launch's WORLD_SIZE is used instead."),
) -> None:
    """Join a swarm, claim the job that most needs work, train it, announce and serve checkpoints."""
    from node.swarm.manifest_files import load_manifest

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        peers = initial_peers or list(manifest.bootstrap_peers)
        forced = parse_job(job, manifest)
        # torch and hivemind come in once the manifest and the job are known good
        from node.cli.node_view import NodeView
        from node.trainer.initialisation import read_init_source
        from node.trainer.peer import SwarmNode
        from node.trainer.ranks import start_ranks
        from node.trainer.state import NodeOptions

        source = read_init_source(init_from, manifest, forced, model) if init_from is not None else None
        forced = forced or (source.pinned_job if source else None)  # a DDPM checkpoint is of one cluster
        options = NodeOptions(data_dir=data_dir, initial_peers=peers, host=host, port=port,
                              job=forced, model=model, max_steps=max_steps, max_minutes=max_minutes,
                              exit_when_done=exit_when_done, mirror=mirror, audit=audit, threads=threads, seed=seed,
                              device=checked_device(device), init_from=source,
                              network=network_options(announce, reachability, relay, auto_relay, relay_service,
                                                      nat_traversal, port_map, direct_port))
        ranks = start_ranks(manifest, options, gpus)
        if ranks is None:  # a follower rank under torchrun: it trained with rank 0 and is done
            return
        try:
            swarm_node = SwarmNode(manifest, options, ranks=ranks)
            with NodeView(manifest.name, console) as view:
                swarm_node.on_status = view.update
                swarm_node.run()
        finally:
            ranks.close()
    except Exception as error:
        fail(error)
    if swarm_node.summary is not None:  # one machine-readable line for scripts and benchmarks
        print(json.dumps({"node_summary": swarm_node.summary.to_dict()}), flush=True)


@app.command()
def status(
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    serve: Optional[int] = typer.Option(None, "--serve", help="Serve a live status page (and /api/status) on this port."),
    web_host: str = typer.Option("127.0.0.1", help="Address the status page listens on (with --serve)."),
    samples_every: Optional[float] = typer.Option(None, help="With --serve: sample the ensemble every this many seconds "
                                                            "(default: only when asked on the page)."),
    cache_dir: Optional[Path] = typer.Option(None, help="With --serve: cache of the checkpoints sampled from."),
) -> None:
    """Show who trains what: claims, latest checkpoints, held-out metrics, providers and peers."""
    from node.swarm.manifest_files import load_manifest
    from protocol.identity import Identity

    setup_logging()
    try:
        manifest = load_manifest(swarm)
        peers = initial_peers or list(manifest.bootstrap_peers)
        if not peers:
            raise NodeError("status needs --initial-peers: the multiaddr of a bootstrap peer or any node of the swarm")
        from node.swarm.membership import SwarmMembership  # hivemind, once the arguments are known good
        from node.swarm.status import collect_status, status_tables

        membership = SwarmMembership(manifest, Identity.generate(), initial_peers=peers, client_mode=True)
    except Exception as error:
        fail(error)
    if serve is not None:
        try:
            serve_status(membership, peers, host=web_host, port=serve, samples_every_s=samples_every,
                         cache_dir=cache_dir)
        except Exception as error:
            fail(error)
        finally:
            membership.shutdown()
        return
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


@app.command()
def seed(
    folder: Path = typer.Argument(..., help="Folder of data shards (<sha256>.tar, as `swarm create` writes them)."),
    swarm: str = SwarmOption,
    initial_peers: Optional[List[str]] = InitialPeersOption,
    data_dir: Path = typer.Option(Path("ddm-seed"), help="Where this peer keeps its identity and blob store."),
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(0, help="TCP port to listen on (0 picks a free one)."),
) -> None:
    """Serve a swarm's data shards from a folder (only the shards its manifest pins) until Ctrl-C."""
    import signal
    import threading

    from node.data.seeding import ShardSeeder
    from node.identity_files import identities_for_join
    from node.swarm.manifest_files import load_manifest
    from node.swarm.membership import SwarmMembership
    from node.swarm.presence import Presence

    setup_logging()
    stop = threading.Event()
    try:
        manifest = load_manifest(swarm)
        peers = initial_peers or list(manifest.bootstrap_peers)
        if not peers:
            raise NodeError("seed needs --initial-peers: the multiaddr of a bootstrap peer or any node of the swarm")
        with identities_for_join(data_dir / "identity.pem", data_dir / "p2p.key") as (identity, p2p_key):
            membership = SwarmMembership(manifest, identity, initial_peers=peers, host=host, port=port,
                                         p2p_identity_path=p2p_key)
        try:
            presence = Presence(membership, role="seeder")
            presence.announce("online")
            seeder = ShardSeeder(membership, presence, folder, data_dir / "blobs")
        except BaseException:
            membership.shutdown()
            raise
    except Exception as error:
        fail(error)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"seeding {len(seeder.held)} shards of swarm '{manifest.name}' as {membership.peer_id} (Ctrl-C to stop)",
          flush=True)
    try:
        stop.wait()
    finally:
        seeder.stop()
        presence.leave()
        membership.shutdown()


def serve_status(membership, initial_peers: List[str], *, host: str, port: int, samples_every_s: Optional[float],
                 cache_dir: Optional[Path]) -> None:
    """Serve the status page until Ctrl-C (see `node.web.server`)."""
    import signal
    import threading

    from node.web.samples import SampleGrid
    from node.web.server import StatusServer

    samples = SampleGrid(membership.manifest, initial_peers, cache_dir=cache_dir)
    server = StatusServer(membership, host=host, port=port, samples=samples, samples_every_s=samples_every_s).start()
    print(f"status page: {server.url} (JSON: {server.url}api/status; Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        server.stop()
