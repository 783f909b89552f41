"""What a running node shows: a live rich panel on a terminal, a log line now and then otherwise."""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.markup import escape
from rich.live import Live
from rich.table import Table

from node.trainer.state import NodeStatus

logger = logging.getLogger("ddm_swarm.node")


def status_table(status: NodeStatus, swarm: str) -> Table:
    table = Table(title=f"ddm-swarm node — swarm '{swarm}'", show_header=False, min_width=60)
    table.add_column(style="bold")
    table.add_column()
    rows = [("state", status.state), ("job", f"{status.job}  ({status.model})"), ("step", str(status.step)),
            ("loss", f"{status.loss:.4f}"), ("images/s", f"{status.images_per_s:.1f}"), ("peers", str(status.peers)),
            ("resumed from", status.resumed_from), ("last checkpoint", status.last_checkpoint),
            ("last announcement", status.last_announcement)]
    for name, value in rows:  # a resumed-from line names a peer's record: text, not markup
        table.add_row(name, escape(str(value)))
    return table


class NodeView:
    """Calls to `update(status)` refresh a Live panel (TTY) or log a line every `every_s` seconds."""

    def __init__(self, swarm: str, console: Console, every_s: float = 15.0):
        self.swarm, self.console, self.every_s = swarm, console, every_s
        self.live = Live(console=console, refresh_per_second=2, transient=False) if console.is_terminal else None
        self._last_line = 0.0
        self._last_state = ""

    def __enter__(self) -> "NodeView":
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self.live.__exit__(*exc)

    def update(self, status: NodeStatus) -> None:
        if self.live:
            self.live.update(status_table(status, self.swarm))
            return
        now = time.monotonic()
        if status.state != self._last_state or now - self._last_line >= self.every_s:
            self._last_line, self._last_state = now, status.state
            logger.info(f"[{status.state}] {status.job} step {status.step} loss {status.loss:.4f} "
                        f"{status.images_per_s:.0f} img/s peers {status.peers} ckpt {status.last_checkpoint}")
