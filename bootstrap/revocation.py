"""The operator withdraws a signer or a checkpoint: a `Revocation` signed with the key the manifest
names as `trust.operator`, stored under `<swarm>/revoked/<target>`. Every peer's policy accepts
revocations from that key only; readers leave what is revoked out of every ranking (see
`node.checkpoints.audits`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from hivemind.utils.timed_storage import get_dht_time

from node.errors import NodeError
from node.identity_files import load_identity
from node.swarm.membership import SwarmMembership
from protocol.identity import is_signer_id
from protocol.limits import MAX_EXPIRATION_AHEAD_S
from protocol.manifest import SwarmManifest
from protocol.records import Revocation


class RevocationRefused(NodeError):
    """The revocation cannot be made: no operator in the manifest, another key, a malformed target."""


def revocation_for(manifest: SwarmManifest, *, signer: Optional[str], checkpoint: Optional[str], reason: str,
                   now: float) -> Revocation:
    """The unsigned revocation of exactly one of `signer` (a signer id) or `checkpoint` (a blob sha256)."""
    if (signer is None) == (checkpoint is None):
        raise RevocationRefused("name exactly one of --signer ID or --checkpoint SHA256")
    target = (signer or checkpoint or "").lower()
    if not is_signer_id(target):  # signer ids and sha256s are both 64 hex chars
        raise RevocationRefused(f"{target[:80]!r} is not 64 hex characters")
    return Revocation(manifest.swarm_id, "signer" if signer else "checkpoint", target, reason[:200], now,
                      now + MAX_EXPIRATION_AHEAD_S["revocation"])


def publish_revocation(manifest: SwarmManifest, key: Path, *, signer: Optional[str] = None,
                       checkpoint: Optional[str] = None, reason: str = "",
                       initial_peers: Sequence[str] = ()) -> Revocation:
    """Sign with the operator's key and store in the swarm (confirmed by reading it back)."""
    operator = manifest.trust.operator
    if not operator:
        raise RevocationRefused(f"swarm '{manifest.name}' names no operator (manifest trust.operator): "
                                "nobody can revoke in it")
    identity = load_identity(key)
    if identity.signer_id != operator:
        raise RevocationRefused(f"{key} is signer {identity.signer_id[:16]}…, the swarm's operator is "
                                f"{operator[:16]}…")
    record = revocation_for(manifest, signer=signer, checkpoint=checkpoint, reason=reason,
                            now=get_dht_time()).signed_by(identity)
    membership = SwarmMembership(manifest, identity, initial_peers=initial_peers or manifest.bootstrap_peers,
                                 client_mode=True)
    try:
        membership.publish(record)
    finally:
        membership.shutdown()
    return record
