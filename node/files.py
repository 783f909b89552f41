"""Atomic file writes: a reader sees the old content or the new, never a partial file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from node.errors import NodeError


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself is data)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a full disk (or a signal) must not leave the half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def hold_exclusive_lock(path: Path, what: str) -> int:
    """Lock `path` (flock) for as long as this process lives; return the descriptor. Raise `NodeError`
    if another process holds it. Take it after forking children: a child would inherit the lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise NodeError(f"{what} is in use by another running ddm-swarm process (it holds {path}); stop that "
                        "process or give this one another --data-dir") from None
    return fd
