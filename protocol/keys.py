"""DHT key names. Every key of a swarm starts with its swarm id, so swarms never mix; the signer
goes into the *subkey* (hivemind protects owners only per subkey).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from protocol.errors import InvalidRecord
from protocol.hashing import BlobRef

BEACON_PREFIX = "ddm-swarm/beacon/"
_KEY = re.compile(
    r"^(?P<swarm>[0-9a-f]{64})/(?:(?P<simple>claims|router|peers)"
    r"|ckpt/(?P<cluster>0|[1-9][0-9]{0,3})|providers/(?P<ref>[0-9a-f]{64})"
    r"|audits/(?P<audited>[0-9a-f]{64})|revoked/(?P<revoked>[0-9a-f]{64}))$"
)
_BEACON = re.compile(r"^ddm-swarm/beacon/(?P<name>[A-Za-z0-9._-]{1,64})$")

# Which record kind may live under which key family.
KIND_OF_FAMILY = {"claims": "claim", "ckpt": "checkpoint", "router": "router", "providers": "provider",
                  "peers": "peer", "beacon": "beacon",
                  "audits": "audit", "revoked": "revocation"}


def claims_key(swarm_id: str) -> str:
    return f"{swarm_id}/claims"


def checkpoint_key(swarm_id: str, cluster: int) -> str:
    return f"{swarm_id}/ckpt/{cluster}"


def router_key(swarm_id: str) -> str:
    return f"{swarm_id}/router"


def providers_key(swarm_id: str, blob: BlobRef) -> str:
    """Providers of one blob reference, filed under its `ref_id` (the whole reference, not the sha256)."""
    return f"{swarm_id}/providers/{blob.ref_id}"


def audits_key(swarm_id: str, blob_sha256: str) -> str:
    """Audits of one checkpoint blob, one per auditor (the auditor's signer id is the subkey)."""
    return f"{swarm_id}/audits/{blob_sha256}"


def revocation_key(swarm_id: str, target: str) -> str:
    """The operator's revocation of one signer id or checkpoint sha256 (the operator is the subkey)."""
    return f"{swarm_id}/revoked/{target}"


def peers_key(swarm_id: str) -> str:
    return f"{swarm_id}/peers"


def beacon_key(swarm_name: str) -> str:
    return f"{BEACON_PREFIX}{swarm_name}"


@dataclass(frozen=True)
class ParsedKey:
    family: str  # claims | ckpt | router | providers | peers | beacon | audits | revoked
    swarm_id: str = ""
    cluster: int = -1
    ref_id: str = ""  # providers: the `BlobRef.ref_id` of the provided reference
    swarm_name: str = ""
    target: str = ""  # audits: the audited blob's sha256; revoked: the revoked signer id or sha256

    @property
    def record_kind(self) -> str:
        return KIND_OF_FAMILY[self.family]


def parse_key(key: str) -> ParsedKey:
    """Split a DHT key of this protocol into its parts; raise `InvalidRecord` for any other key."""
    if not isinstance(key, str):
        raise InvalidRecord(f"DHT key must be a string, got {type(key).__name__}")
    beacon = _BEACON.fullmatch(key)
    if beacon:
        return ParsedKey("beacon", swarm_name=beacon["name"])
    match = _KEY.fullmatch(key)
    if not match:
        raise InvalidRecord(f"DHT key {key[:80]!r} is not a ddm-swarm key")
    if match["simple"]:
        return ParsedKey(match["simple"], swarm_id=match["swarm"])
    if match["cluster"] is not None:
        return ParsedKey("ckpt", swarm_id=match["swarm"], cluster=int(match["cluster"]))
    if match["audited"] is not None:
        return ParsedKey("audits", swarm_id=match["swarm"], target=match["audited"])
    if match["revoked"] is not None:
        return ParsedKey("revoked", swarm_id=match["swarm"], target=match["revoked"])
    return ParsedKey("providers", swarm_id=match["swarm"], ref_id=match["ref"])
