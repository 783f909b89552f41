"""Whether a record is acceptable to this swarm, here and now.

`decode_record` answers "is this a well-formed record signed by its signer?"; `RecordPolicy`
answers "may it live under this DHT key, in this swarm, until then?". Every peer runs the same
policy on every record it is asked to store and on every record it reads, so a forged, squatting
or foreign record is refused by all honest peers.
"""

from __future__ import annotations

import math
from typing import Optional

from protocol.errors import ExpirationTooFar, InvalidRecord, RecordExpired, SwarmVersionMismatch, UntrustedSigner
from protocol import keys
from protocol.keys import ParsedKey, parse_key
from protocol.limits import CLOCK_SKEW_S, MAX_EXPIRATION_AHEAD_S
from protocol.manifest import SwarmManifest
from protocol.records import (AuditRecord, CheckpointRecord, Claim, PeerRecord, ProviderRecord, Revocation,
                              RouterRecord, SignedRecord, SwarmBeacon, decode_record)

# A DHT entry may not outlive the expiration its author signed; allow float rounding only.
_EXPIRY_SLACK_S = 1.0


class RecordPolicy:
    """The swarm's acceptance rules for DHT entries, bound to one manifest."""

    def __init__(self, manifest: SwarmManifest):
        self.manifest = manifest
        self.swarm_id = manifest.swarm_id

    def accept(self, key: str, subkey: Optional[str], value: bytes, expiration_time: float, now: float) -> SignedRecord:
        """Decode and check one DHT entry; return the record or raise a typed `ProtocolError`."""
        parsed = parse_key(key)
        record = decode_record(value)
        self.check(parsed, subkey, record, expiration_time, now)
        return record

    def check(self, parsed: ParsedKey, subkey: Optional[str], record: SignedRecord,
              expiration_time: float, now: float) -> None:
        if record.KIND != parsed.record_kind:
            raise InvalidRecord(f"a {record.KIND} record cannot be stored under a '{parsed.family}' key")
        if subkey != record.signer:  # type: ignore[attr-defined]
            raise InvalidRecord("the DHT subkey must be the record's signer id")
        self._check_time(record, expiration_time, now)
        if isinstance(record, SwarmBeacon):
            if record.name != parsed.swarm_name:
                raise InvalidRecord(f"beacon for swarm '{record.name}' stored under the name '{parsed.swarm_name}'")
            # beacons of other versions and manifests are informative (see describe_beacon); in an
            # allow-list swarm only from its signers, or a stranger could make every peer warn
            self._check_signer(record)
            return
        if parsed.swarm_id != self.swarm_id or record.swarm_id != self.swarm_id:  # type: ignore[attr-defined]
            raise SwarmVersionMismatch("record belongs to another swarm (its manifest differs from ours)")
        self._check_signer(record)
        self._check_content(parsed, record, now)

    def check_saved(self, record: SignedRecord) -> None:
        """`check` but for time, for a record kept offline past its TTL (an ensemble saved by `fetch`):
        this swarm, a trusted signer, an allowed model. Raises a typed `ProtocolError`."""
        if isinstance(record, SwarmBeacon) or not hasattr(record, "swarm_id"):
            raise InvalidRecord(f"a {record.KIND} record is not a checkpoint")
        if record.swarm_id != self.swarm_id:  # type: ignore[attr-defined]
            raise SwarmVersionMismatch("record belongs to another swarm (its manifest differs from ours)")
        self._check_signer(record)
        self._check_content(parse_key(key_for_record(record)), record, now=0.0)

    def _check_signer(self, record: SignedRecord) -> None:
        if not self.manifest.trust.allows(record.signer):  # type: ignore[attr-defined]
            raise UntrustedSigner(f"signer {record.signer[:16]}… is not in swarm '{self.manifest.name}''s "  # type: ignore[attr-defined]
                                  "allowed signers")

    def _check_time(self, record: SignedRecord, expiration_time: float, now: float) -> None:
        expires_at = record.expires_at  # type: ignore[attr-defined]
        if isinstance(expiration_time, bool) or not isinstance(expiration_time, (int, float)) \
                or not math.isfinite(expiration_time):
            raise InvalidRecord(f"the DHT entry's expiration time must be a finite number, got {expiration_time!r:.40}")
        if expiration_time > expires_at + _EXPIRY_SLACK_S:
            raise InvalidRecord("the DHT entry would outlive the expiration its author signed")
        if expires_at < now - CLOCK_SKEW_S:
            raise RecordExpired(f"{record.KIND} record expired {now - expires_at:.0f} s ago")
        limit = MAX_EXPIRATION_AHEAD_S[record.KIND]
        if expires_at > now + limit + CLOCK_SKEW_S:
            raise ExpirationTooFar(f"{record.KIND} record asks to live {expires_at - now:.0f} s, "
                                   f"more than the {limit} s allowed")
        created_at = getattr(record, "created_at", None)
        if created_at is not None and created_at > now + CLOCK_SKEW_S:
            raise InvalidRecord(f"{record.KIND} record claims to be created {created_at - now:.0f} s in the future")

    def _check_content(self, parsed: ParsedKey, record: SignedRecord, now: float) -> None:
        k = self.manifest.num_clusters
        if isinstance(record, (Claim, PeerRecord)) and record.job is not None and not record.job.is_router:
            if record.job.cluster >= k:
                raise InvalidRecord(f"job {record.job} does not exist: the swarm has clusters 0..{k - 1}")
        if isinstance(record, CheckpointRecord):
            if record.cluster != parsed.cluster or record.cluster >= k:
                raise InvalidRecord(f"checkpoint for cluster {record.cluster} stored under cluster {parsed.cluster}")
            spec = self.manifest.spec_by_hash(record.spec_hash)
            if spec is None or spec.objective != record.objective or spec.name != record.model:
                raise InvalidRecord(f"checkpoint model '{record.model}' ({record.objective}, spec "
                                    f"{record.spec_hash[:12]}) is not an expert this swarm allows")
        if isinstance(record, RouterRecord):
            if record.spec_hash != self.manifest.router.spec_hash or record.num_clusters != k:
                raise InvalidRecord("router checkpoint does not match this swarm's router spec or cluster count")
        if isinstance(record, ProviderRecord) and record.blob.ref_id != parsed.ref_id:
            raise InvalidRecord("provider record stored under another blob reference's key")
        if isinstance(record, AuditRecord):
            if record.checkpoint != parsed.target or record.cluster >= k:
                raise InvalidRecord("audit stored under another checkpoint's key, or of a cluster the swarm lacks")
            if record.signer == record.checkpoint_signer:
                raise InvalidRecord("a signer may not audit its own checkpoint")
        if isinstance(record, Revocation):
            operator = self.manifest.trust.operator
            if not operator or record.signer != operator:
                raise UntrustedSigner("only the swarm's operator (manifest trust.operator) may revoke")
            if record.target != parsed.target:
                raise InvalidRecord("revocation stored under another target's key")


def describe_beacon(beacon: SwarmBeacon, manifest: SwarmManifest) -> Optional[str]:
    """A message for the user if `beacon` shows peers of `manifest.name` running something else."""
    if beacon.protocol_version != manifest.protocol_version:
        return (f"peers of swarm '{beacon.name}' speak protocol version {beacon.protocol_version}, this node "
                f"speaks {manifest.protocol_version}: upgrade ddm-swarm to join them")
    if beacon.swarm_id != manifest.swarm_id:
        return (f"peers of swarm '{beacon.name}' run manifest {beacon.swarm_id[:12]}…, yours is "
                f"{manifest.swarm_id[:12]}…: fetch the swarm's manifest file (ddm-swarm swarm show)")
    return None




def key_for_record(record: SignedRecord) -> str:
    """The one DHT key a record may live under, derived from its content."""
    if isinstance(record, SwarmBeacon):
        return keys.beacon_key(record.name)
    if isinstance(record, Claim):
        return keys.claims_key(record.swarm_id)
    if isinstance(record, CheckpointRecord):
        return keys.checkpoint_key(record.swarm_id, record.cluster)
    if isinstance(record, RouterRecord):
        return keys.router_key(record.swarm_id)
    if isinstance(record, ProviderRecord):
        return keys.providers_key(record.swarm_id, record.blob)
    if isinstance(record, PeerRecord):
        return keys.peers_key(record.swarm_id)
    if isinstance(record, AuditRecord):
        return keys.audits_key(record.swarm_id, record.checkpoint)
    if isinstance(record, Revocation):
        return keys.revocation_key(record.swarm_id, record.target)
    raise InvalidRecord(f"no DHT key for records of kind {record.KIND}")
