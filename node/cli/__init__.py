"""The `ddm-swarm` command line: `app` with every command registered (see `node.cli.app`)."""

from node.cli import demo, generate_commands, peer_commands, swarm_commands  # noqa: F401  (they register)
from node.cli.app import app, load_command_plugins

load_command_plugins()


def main() -> None:  # pragma: no cover - console entry point
    app()
