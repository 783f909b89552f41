"""Progress bars for the operator's long steps (reading, embedding, clustering, writing shards).

One rich bar per step, on stderr so stdout stays for results; on a terminal it redraws in place,
elsewhere rich prints it once when the step ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

_CONSOLE = Console(stderr=True)


class _Bar:
    def __init__(self, progress: Progress, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, steps: int = 1) -> None:
        self._progress.advance(self._task, steps)


@contextmanager
def progress_bar(label: str, total: Optional[int]) -> Iterator[_Bar]:
    """A bar for `label` counting up to `total` (None: a spinner and a count)."""
    columns = [SpinnerColumn(), TextColumn(f"{label:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=_CONSOLE, refresh_per_second=4) as progress:
        yield _Bar(progress, progress.add_task(label, total=total))
