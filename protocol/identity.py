"""ed25519 identities: who signs records. The signer id is the hex of the 32-byte public key.

This module is pure: keys go to and from bytes here, and `node/identity_files.py` stores them in files with
0600 permissions. hivemind's own peer identity (for libp2p) is a separate key.
"""

from __future__ import annotations

import re

from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import BadSignature, InvalidIdentity

_SIGNER_HEX = re.compile(r"^[0-9a-f]{64}$")
SIGNATURE_BYTES = 64


def is_signer_id(value: object) -> bool:
    return isinstance(value, str) and _SIGNER_HEX.fullmatch(value) is not None


class Identity:
    """An ed25519 key pair. `signer_id` is public; the private key never leaves this object."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private_key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.signer_id: str = raw.hex()

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> "Identity":
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm, InternalError) as error:  # OpenSSL fails in many ways
            raise InvalidIdentity(f"not a PEM ed25519 private key: {error}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise InvalidIdentity(f"identity key is {type(key).__name__}, expected ed25519")
        return cls(key)

    def to_pem(self) -> bytes:
        return self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

    def __repr__(self) -> str:
        return f"Identity(signer_id={self.signer_id[:16]}…)"


def verify_signature(signer_id: str, message: bytes, signature: bytes) -> None:
    """Raise `BadSignature` unless `signature` is `signer_id`'s ed25519 signature of `message`."""
    if not is_signer_id(signer_id):
        raise BadSignature("signer id must be 64 lowercase hex characters (an ed25519 public key)")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        raise BadSignature(f"signature must be {SIGNATURE_BYTES} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(signer_id)).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise BadSignature(f"signature does not verify for signer {signer_id[:16]}…") from None
