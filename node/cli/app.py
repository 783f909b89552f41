"""The `ddm-swarm` typer app: shared options, logging, and the one way a command reports a failure.

Commands live one file per group beside this one (`peer_commands`, `generate_commands`, `demo`,
`swarm_commands`) and register themselves on `app`. The operator's commands (`bootstrap`, `swarm
create`) live in the `bootstrap` package, which sits above `node`: they are found through the Python
entry-point group `ddm_swarm.commands` (see pyproject.toml), so `node` never imports `bootstrap`.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from ddm_models.errors import ModelError
from node.errors import NodeError
from protocol.errors import ProtocolError

COMMAND_PLUGINS = "ddm_swarm.commands"

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train a text-to-image diffusion model as a swarm of decentralized experts.")
swarm_app = typer.Typer(no_args_is_help=True, help="Swarm manifests: show or create.")
app.add_typer(swarm_app, name="swarm")
console = Console(stderr=True)

SwarmOption = typer.Option("local", "--swarm", "-s", help="Bundled swarm name or path to a manifest YAML file.")
InitialPeersOption = typer.Option(None, "--initial-peers", "-p",
                                  help="Multiaddr of a peer to join through (repeat for several).")
DeviceOption = typer.Option("auto", help="torch device: auto (CUDA when present, else the CPU), cpu, cuda, cuda:1 …")

# Failures a user can meet and fix (bad files, bad input, a full disk, an unreachable swarm): one
# line on stderr and exit status 1. Anything else is a bug and keeps its traceback.
ANTICIPATED = (ProtocolError, NodeError, ModelError, OSError)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)], force=True)
    # hivemind is chatty at INFO; its warnings still show
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")


def checked_device(name: str) -> str:
    """--device as given, once checked to name a device this machine has (a typo, or cuda on a
    machine without a GPU, is a user's mistake and is said in one line, before anything starts)."""
    from ddm_models.devices import UnknownDevice, resolve_device

    try:
        resolve_device(name)
    except UnknownDevice as error:
        raise NodeError(f"--device: {error}") from None
    return name


def fail(error: Exception) -> None:
    """Report an anticipated failure in one line and exit 1; re-raise anything else."""
    if not isinstance(error, ANTICIPATED):
        raise error
    console.print(f"[bold red]error:[/] {escape(str(error) or type(error).__name__)}", soft_wrap=True)
    raise typer.Exit(1)


def load_command_plugins() -> None:
    """Import every module registered under the entry-point group `ddm_swarm.commands`; each adds
    its commands to `app` (or `swarm_app`) when imported."""
    for plugin in entry_points(group=COMMAND_PLUGINS):
        plugin.load()
