"""Identity key files: created once with 0600 permissions, refused if others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from node.files import atomic_write_bytes
from protocol.errors import InvalidIdentity
from protocol.identity import Identity


def save_identity(identity: Identity, path: Path) -> None:
    """Write the private key atomically; the file is never readable by anyone but its owner."""
    atomic_write_bytes(Path(path), identity.to_pem(), mode=0o600)


def check_private_file(path: Path) -> None:
    """Refuse a secret file that group or others may read or write (as ssh does)."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidIdentity(f"identity file {path} has permissions {oct(mode & 0o777)}; "
                              f"it must be private: run `chmod 600 {path}`")


def load_identity(path: Path) -> Identity:
    path = Path(path)
    if not path.exists():
        raise InvalidIdentity(f"identity file {path} does not exist")
    check_private_file(path)
    try:
        return Identity.from_pem(path.read_bytes())
    except InvalidIdentity as error:
        raise InvalidIdentity(f"identity file {path}: {error}") from None


def load_or_create_identity(path: Path) -> Identity:
    """The node's signing identity: loaded from `path`, or generated and saved there on first run."""
    path = Path(path)
    if path.exists():
        return load_identity(path)
    identity = Identity.generate()
    save_identity(identity, path)
    return identity


def prepare_p2p_identity_path(path: Path) -> str:
    """hivemind writes its libp2p key to `path` on first start; keep it private across restarts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        check_private_file(path)
    return str(path)
