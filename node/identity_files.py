"""Identity key files: created once with 0600 permissions, refused if others can read them.

A peer's two keys (its ed25519 signing identity and hivemind's libp2p key) are written to its data
folder only once it has joined: a first start that cannot reach the swarm leaves nothing behind.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Tuple

from cryptography.hazmat.primitives import serialization
from hivemind.proto import crypto_pb2

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
        raise InvalidIdentity(f"identity file {path} is unusable ({error}); restore it from a backup, or move it "
                              "away to start as a new signer (an allow-list swarm must then allow the new one)") from None


def load_or_create_identity(path: Path) -> Identity:
    """The node's signing identity: loaded from `path`, or generated and saved there on first run."""
    path = Path(path)
    if path.exists():
        return load_identity(path)
    identity = Identity.generate()
    save_identity(identity, path)
    return identity


def check_p2p_key_file(path: Path) -> None:
    """Refuse a libp2p key file that p2pd could not parse (it would fail with a message that does
    not name the file), saying what to do."""
    try:
        key = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        if not key.data:
            raise ValueError("it holds no key")
        if key.key_type == crypto_pb2.KeyType.RSA:
            serialization.load_der_private_key(key.data, password=None)
    except Exception as error:  # protobuf's DecodeError, cryptography's ValueError and kin: all mean "damaged"
        raise InvalidIdentity(f"libp2p key file {path} is unusable ({type(error).__name__}: {error}); delete it and "
                              "restart: the node gets a new peer id, its signing identity stays") from None


@contextmanager
def identities_for_join(signer_path: Path, p2p_path: Path) -> Iterator[Tuple[Identity, str]]:
    """(signing identity, libp2p key path) to join with; new keys are kept only if the block succeeds.

    Existing key files are used in place. A new libp2p key is written by hivemind into a private
    temporary folder (p2pd reads it once, at start); on success both new keys move to their paths.
    """
    signer_path, p2p_path = Path(signer_path), Path(p2p_path)
    identity = load_identity(signer_path) if signer_path.exists() else Identity.generate()
    if p2p_path.exists():
        check_private_file(p2p_path)
        check_p2p_key_file(p2p_path)
    with tempfile.TemporaryDirectory(prefix="ddm-swarm-join-") as staging:
        staged = Path(staging) / p2p_path.name
        yield identity, str(p2p_path if p2p_path.exists() else staged)
        if staged.exists():
            atomic_write_bytes(p2p_path, staged.read_bytes(), mode=0o600)
    if not signer_path.exists():
        save_identity(identity, signer_path)
