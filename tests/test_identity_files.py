"""Identity key files: private permissions, stable across restarts, clear errors."""

import os

import pytest

from node.identity_files import load_identity, load_or_create_identity
from protocol.errors import InvalidIdentity


def test_identity_is_created_private_and_loads_back_the_same(tmp_path):
    path = tmp_path / "keys" / "node.pem"
    first = load_or_create_identity(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_identity(path).signer_id == first.signer_id


def test_identity_readable_by_others_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "node.pem"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(InvalidIdentity, match="chmod 600"):
        load_identity(path)


def test_corrupted_identity_file_is_refused_clearly(tmp_path):
    path = tmp_path / "node.pem"
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(InvalidIdentity, match=str(path)):
        load_identity(path)
