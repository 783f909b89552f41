"""Where ddm_models keeps files it can recompute (the evaluation classifier), and how it writes them:
atomically, so that a crash or a concurrent writer never leaves a half-written file in place."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

CACHE_ENV = "DDM_SWARM_CACHE"


def default_cache_dir() -> Path:
    """$DDM_SWARM_CACHE if set, else ~/.cache/ddm-swarm."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddm-swarm")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)`, fsync the result, then rename it over `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`.lock: processes that would build the same cache file wait for
    the first one instead of all building it at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
