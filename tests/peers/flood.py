"""Valid-looking records from fresh identities, by the thousand: what a Sybil flooder of an open
swarm can publish. Every record is well-formed and correctly signed by its own new key."""

from __future__ import annotations

import os
import time
from typing import List, Optional, Tuple

from hivemind.p2p import PeerID

from protocol.hashing import BlobRef, blob_ref_of
from protocol.identity import Identity
from protocol.manifest import SwarmManifest
from protocol.policy import key_for_record
from protocol.records import CheckpointRecord, Claim, ProviderRecord, SignedRecord

# (key, subkey, value, expiration) as hivemind's store takes them
Entry = Tuple[str, str, bytes, float]


def random_peer_id() -> str:
    # an ed25519 libp2p public key (protobuf), inlined as an identity multihash: a well-formed peer id
    key = b"\x08\x01\x12\x20" + os.urandom(32)
    return PeerID(b"\x00" + bytes([len(key)]) + key).to_base58()


def flood_record(manifest: SwarmManifest, family: str, index: int, *, job: str = "expert/0", cluster: int = 0,
                 ref: Optional[dict] = None, ttl: float = 600.0) -> SignedRecord:
    now = time.time()
    if family == "claims":
        record = Claim(manifest.swarm_id, job, manifest.expert_for_cluster(0).name, random_peer_id(), 10**6,
                       "training", now + min(ttl, 800))
    elif family == "checkpoints":
        spec = manifest.expert_for_cluster(cluster)
        record = CheckpointRecord(manifest.swarm_id, cluster, spec.name, spec.objective, spec.spec_hash, 10**6 + index,
                                  32 * 10**6, 0.001, blob_ref_of(os.urandom(64)), blob_ref_of(os.urandom(64)), "",
                                  now, now + ttl)
    elif family == "providers":
        peer = random_peer_id()
        record = ProviderRecord(manifest.swarm_id, BlobRef(**ref), peer, (f"/ip4/127.0.0.1/tcp/9/p2p/{peer}",), now + min(ttl, 3600))
    else:
        raise ValueError(f"cannot flood {family}")
    return record.signed_by(Identity.generate())


def flood_entries(manifest: SwarmManifest, family: str, count: int, **options) -> List[Entry]:
    entries = []
    for index in range(count):
        record = flood_record(manifest, family, index, **options)
        entries.append((key_for_record(record), record.signer, record.encode(), record.expires_at))
    return entries
